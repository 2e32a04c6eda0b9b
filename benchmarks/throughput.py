"""Rollout and training throughput against the hardware floor and against the reference loop.

Reports, in one run and one process:

- **floor**: the best time per latent of one transformer evaluation over a sweep of batch sizes (mixed
  timesteps, CFG's doubled batch included) × the evaluations a branched rollout needs;
- **tempflow**: the packed branched rollout (N steps, G children) in images per second and as a ratio to
  the floor;
- **reference loop**: the same rollout done as the reference TempFlow code does it — the main path one
  step at a time, and at each branch step one batch of G children run to completion — as a ratio to tempflow;
- **training inner step**: log-prob recomputation + backward of a batch of transitions (LoRA) as a ratio to a
  plain forward + backward of the same batch, with gradient checkpointing off and on;
- peak GPU memory of each (CUDA only);
- with ``--compile``: **eager vs compiled** (``policy.compile_transformer``, LoRA attached as in training
  rollouts): ms per latent-evaluation at each swept batch size and the branched rollout, as ratios, plus the
  compile time (first calls beyond a steady call) and the number of graphs compiled.

Random weights at real sizes (`--size sd35m`, `--size flux-dev`; built from configs, nothing downloaded) on a
GPU, or the tiny test pipeline on the CPU (`--size tiny`, the default: seconds).

    python benchmarks/throughput.py --size sd35m --device cuda --dtype bf16
    python benchmarks/throughput.py --compile                       # + eager vs compiled (tiny, CPU)
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from torch._dynamo.utils import counters

from tempflow.policies import FluxPolicy, PromptEmbeds, SD3Policy
from tempflow.rollout import RolloutEngine, seeded_noise
from tempflow.sampling import ode_step, sde_step

SD35M = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
             dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def build_policy(size: str, resolution: int, device: str, dtype: torch.dtype):
    """A policy whose transformer has the named size (random weights) and whose prompt embeddings are cached
    random tensors of the right shapes, so no text encoder is needed."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if size == "tiny":
        from tempflow.testing import build_tiny_sd3_pipeline

        policy = SD3Policy(build_tiny_sd3_pipeline(0), resolution=resolution, guidance_scale=4.5, max_sequence_length=16)
        return policy.to(device)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    empty = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if size == "sd35m":
        transformer = SD3Transformer2DModel(**SD35M)
        pipeline = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                            text_encoder_3=None, tokenizer_3=None, **empty)
        policy = SD3Policy(pipeline, resolution=resolution, guidance_scale=4.5)
        shapes = {"prompt_embeds": (1, 77 + 256, 4096), "pooled_prompt_embeds": (1, 2048)}
    else:
        transformer = FluxTransformer2DModel(**FLUX_DEV)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        pipeline = FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, **empty)
        policy = FluxPolicy(pipeline, resolution=resolution, guidance_scale=3.5)
        shapes = {"prompt_embeds": (1, 512, 4096), "pooled_prompt_embeds": (1, 768)}
    pipeline.transformer.to(device, dtype)
    pipeline.vae.to(device)
    for prompt in ("", "benchmark prompt"):
        policy._embed_cache[prompt] = PromptEmbeds({k: torch.randn(s, dtype=dtype) for k, s in shapes.items()})
    return policy


def timed(fn, repeats: int, device: str, warm_up: list | None = None) -> float:
    """Median wall time of ``fn`` in seconds, after one warm-up call (whose time is appended to ``warm_up``)."""
    start = time.perf_counter()
    fn()
    if warm_up is not None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        warm_up.append(time.perf_counter() - start)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def measure_floor(policy, embeds, batch_sizes, repeats, device, warm_up: list | None = None) -> dict:
    """Seconds per latent-evaluation for each batch size (mixed timesteps)."""
    per_latent = {}
    for batch in batch_sizes:
        latents = torch.randn(batch, *policy.initial_noise(torch.Generator()).shape[1:], device=device)
        sigmas = torch.linspace(0.95, 0.05, batch)
        batch_embeds = embeds[[0] * batch]
        with torch.no_grad():
            seconds = timed(partial(policy.velocity, latents, sigmas, batch_embeds), repeats, device, warm_up)
        per_latent[batch] = seconds / batch
    return per_latent


def reference_rollout(policy, embeds, seeds, num_steps, num_children, noise_level) -> int:
    """The reference implementation's order of work: per seed, the main path one step at a time, and at each
    branch step the G children as one batch run to completion. Returns the number of images."""
    sigmas = policy.sigma_schedule(num_steps)
    device = policy.device
    images = 0
    with torch.no_grad():
        for seed in seeds:
            latents = policy.initial_noise(torch.Generator().manual_seed(seed)).to(device)
            for i in range(num_steps):
                sigma, sigma_next = sigmas[i : i + 1], sigmas[i + 1 : i + 2]
                velocity = policy.velocity(latents, sigma, embeds[[0]])
                if i < num_steps - 1:
                    noise = seeded_noise((num_children, *latents.shape[1:]), seed, i).to(device)
                    g = num_children
                    children = sde_step(latents.expand(g, *latents.shape[1:]), velocity.expand(g, *velocity.shape[1:]),
                                        sigma.expand(g), sigma_next.expand(g), noise_level, noise=noise).next_latents
                    for j in range(i + 1, num_steps):
                        s, s_next = sigmas[j].expand(g), sigmas[j + 1].expand(g)
                        children = ode_step(children, policy.velocity(children, s, embeds[[0] * g]), s, s_next).next_latents
                    images += g
                latents = ode_step(latents, velocity, sigma, sigma_next).next_latents
    return images


def training_ratio(policy, embeds, batch, device, checkpointing: bool, repeats: int) -> dict:
    """Log-prob recomputation + backward vs a plain forward + backward of the same batch (LoRA trainable)."""
    transformer = policy.transformer
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    transformer.train()
    shape = policy.initial_noise(torch.Generator()).shape[1:]
    latents = torch.randn(batch, *shape, device=device)
    next_latents = torch.randn(batch, *shape, device=device)
    sigmas, sigmas_next = torch.linspace(0.9, 0.2, batch), torch.linspace(0.8, 0.1, batch)
    batch_embeds = embeds[[0] * batch]

    def plain():
        policy.velocity(latents, sigmas, batch_embeds).float().pow(2).mean().backward()

    def inner_step():
        velocity = policy.velocity(latents, sigmas, batch_embeds)
        out = sde_step(latents, velocity, sigmas, sigmas_next, 0.7, next_latents=next_latents)
        (-torch.exp(out.log_prob - out.log_prob.detach()).mean()).backward()

    reset_peak(device)
    plain_s = timed(plain, repeats, device)
    reset_peak(device)
    inner_s = timed(inner_step, repeats, device)
    transformer.eval()
    return {"plain_fwd_bwd_s": plain_s, "inner_step_s": inner_s, "ratio": inner_s / plain_s,
            "peak_gb": peak_memory_gb(device)}


def compiled_vs_eager(policy, embeds, batch_sizes, repeats, device, rollout, backend, mode, buckets) -> dict:
    """Eager, then ``compile_transformer`` and the same again: per-latent time at each batch size and the rollout.
    The compile time is each first call's excess over its steady time (sizes and rollout shapes not compiled yet
    compile there)."""
    policy.transformer.disable_gradient_checkpointing()
    policy.transformer.eval()
    eager = measure_floor(policy, embeds, batch_sizes, repeats, device)
    eager_rollout_s = timed(rollout, max(1, repeats - 1), device)
    graphs = counters["stats"]["unique_graphs"]
    policy.compile_transformer(backend, mode, buckets)
    first: list[float] = []
    compiled = measure_floor(policy, embeds, batch_sizes, repeats, device, first)
    first_rollout: list[float] = []
    compiled_rollout_s = timed(rollout, max(1, repeats - 1), device, first_rollout)
    compile_s = sum(first) - sum(compiled[b] * b for b in batch_sizes) + first_rollout[0] - compiled_rollout_s
    return {
        "backend": backend, "mode": mode, "batch_buckets": list(buckets),
        "eager_ms_per_latent_eval": {b: 1000 * s for b, s in eager.items()},
        "compiled_ms_per_latent_eval": {b: 1000 * s for b, s in compiled.items()},
        "speedup_by_batch": {b: eager[b] / compiled[b] for b in batch_sizes},
        "eager_rollout_s": eager_rollout_s, "compiled_rollout_s": compiled_rollout_s,
        "rollout_speedup": eager_rollout_s / compiled_rollout_s,
        "first_call_s": dict(zip(batch_sizes, first)), "first_rollout_s": first_rollout[0],
        "compile_s": compile_s, "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sd35m", "flux-dev"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 512 sd35m, 1024 flux-dev")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=10, help="N")
    parser.add_argument("--children", type=int, default=6, help="G")
    parser.add_argument("--seeds", type=int, default=2, help="(prompt, seed) main paths per rollout")
    parser.add_argument("--rollout-batch-size", type=int, default=48)
    parser.add_argument("--floor-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 48])
    parser.add_argument("--train-batch-size", type=int, default=6)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure eager vs compiled (compile_transformer)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--compile-batch-buckets", type=int, nargs="*", default=[],
                        help="static graphs for these batch sizes (default: one graph, dynamic batch)")
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    resolution = args.resolution or {"tiny": 64, "sd35m": 512, "flux-dev": 1024}[args.size]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    policy = build_policy(args.size, resolution, args.device, dtype)
    policy.transformer.eval()
    prompts = ["benchmark prompt"] * args.seeds if args.size != "tiny" else ["a red square"] * args.seeds
    embeds = policy.encode_prompts(prompts)
    n, g = args.steps, args.children
    evals_per_seed = n + g * n * (n - 1) // 2
    images = args.seeds * g * (n - 1)

    floor = measure_floor(policy, embeds, args.floor_batch_sizes, args.repeats, args.device)
    best_batch = min(floor, key=floor.get)
    floor_s = floor[best_batch] * evals_per_seed * args.seeds

    engine = RolloutEngine(policy, noise_level=0.7, batch_size=args.rollout_batch_size)
    seeds = list(range(args.seeds))
    reset_peak(args.device)
    tempflow_s = timed(lambda: engine.branched(embeds, list(range(args.seeds)), seeds, n, list(range(n - 1)), g),
                       max(1, args.repeats - 1), args.device)
    tempflow_peak = peak_memory_gb(args.device)
    reset_peak(args.device)
    reference_s = timed(lambda: reference_rollout(policy, embeds, seeds, n, g, 0.7), max(1, args.repeats - 1),
                        args.device)
    reference_peak = peak_memory_gb(args.device)

    policy.add_lora(r=args.lora_rank, alpha=2 * args.lora_rank)
    training = {f"checkpointing_{flag}": training_ratio(policy, embeds, args.train_batch_size, args.device, flag,
                                                        args.repeats) for flag in (False, True)}
    results = {
        "size": args.size, "resolution": resolution, "device": str(torch.cuda.get_device_name() if
                                                                  args.device.startswith("cuda") else "cpu"),
        "dtype": args.dtype, "N": n, "G": g, "seeds": args.seeds, "evals_per_seed": evals_per_seed,
        "floor_ms_per_latent_eval": {b: 1000 * s for b, s in floor.items()}, "floor_best_batch": best_batch,
        "floor_s": floor_s, "tempflow_s": tempflow_s, "tempflow_images_per_s": images / tempflow_s,
        "tempflow_vs_floor": floor_s / tempflow_s, "reference_s": reference_s,
        "speedup_vs_reference": reference_s / tempflow_s, "tempflow_peak_gb": tempflow_peak,
        "reference_peak_gb": reference_peak, "training": training,
    }
    if args.compile:
        def rollout():
            return engine.branched(embeds, list(range(args.seeds)), seeds, n, list(range(n - 1)), g)

        results["compile"] = compiled_vs_eager(policy, embeds, args.floor_batch_sizes, args.repeats, args.device,
                                               rollout, args.compile_backend, args.compile_mode,
                                               args.compile_batch_buckets)
    print(f"{args.size} @ {resolution}px on {results['device']} ({args.dtype}), N={n}, G={g}, {args.seeds} seeds, "
          f"{evals_per_seed} evaluations per seed")
    print("floor ms per latent-eval by batch: " + ", ".join(f"B{b} {1000 * s:.2f}" for b, s in floor.items()))
    print(f"floor {floor_s:.3f}s | tempflow {tempflow_s:.3f}s ({images / tempflow_s:.1f} images/s, "
          f"{results['tempflow_vs_floor']:.2f} of floor) | reference loop {reference_s:.3f}s "
          f"(tempflow {results['speedup_vs_reference']:.2f}x faster)")
    for name, t in training.items():
        print(f"training inner step ({name}): {t['inner_step_s'] * 1000:.1f} ms vs plain fwd+bwd "
              f"{t['plain_fwd_bwd_s'] * 1000:.1f} ms → {t['ratio']:.2f}x")
    if args.compile:
        c = results["compile"]
        print(f"compiled ({c['backend']}, {c['mode']}, buckets {c['batch_buckets'] or 'none: dynamic batch'}), "
              f"LoRA r{args.lora_rank} attached, ms per latent-eval eager → compiled: "
              + ", ".join(f"B{b} {c['eager_ms_per_latent_eval'][b]:.2f} → {c['compiled_ms_per_latent_eval'][b]:.2f}"
                          for b in args.floor_batch_sizes))
        print(f"rollout eager {c['eager_rollout_s']:.3f}s → compiled {c['compiled_rollout_s']:.3f}s "
              f"({c['rollout_speedup']:.2f}x) | compile {c['compile_s']:.1f}s, {c['graphs_compiled']} graph(s)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
