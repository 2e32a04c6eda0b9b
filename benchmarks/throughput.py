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

With ``--memory-table`` it measures instead whole training iterations (``TempFlowGRPOTrainer.training_step``:
branched rollout, decoding, reward, advantages, LoRA updates with the KL term) under the size's recipe
(``recipes/sd35_pickscore.yaml``, ``recipes/flux_pickscore.yaml``, ``recipes/wan21_1_3b_pickscore.yaml``; one
prompt per iteration, N and G from the flags), with gradient checkpointing and the EMA offload each on and off
(``--checkpointing-only``: checkpointing on, offload off): peak GPU memory and seconds per iteration.

Random weights at real sizes (`--size sd35m`, `--size flux-dev`, `--size wan-1.3b` with `--width` and
`--num-frames`; built from configs, nothing downloaded, prompt embeddings random, a tiny stand-in VAE) on a GPU, or
the tiny test pipeline on the CPU (`--size tiny`, the default: seconds). `--cut-layers` keeps a real size's widths
with one or two blocks (the GPU suite's CPU dry run).

    python benchmarks/throughput.py --size sd35m --device cuda --dtype bf16
    python benchmarks/throughput.py --size flux-dev --dtype bf16 --memory-table --steps 3 --children 2
    python benchmarks/throughput.py --size wan-1.3b --dtype bf16 --memory-table --num-frames 17 --checkpointing-only
    python benchmarks/throughput.py --compile                       # + eager vs compiled (tiny, CPU)
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import yaml
from torch._dynamo.utils import counters

from tempflow.policies import SD3Policy
from tempflow.rollout import RolloutEngine, seeded_noise
from tempflow.sampling import ode_step, sde_step
from tempflow.testing import build_real_size_policy, build_tiny_sd3_pipeline

PROMPT = "benchmark prompt"
RECIPES = {"sd35m": "sd35_pickscore.yaml", "flux-dev": "flux_pickscore.yaml", "wan-1.3b": "wan21_1_3b_pickscore.yaml"}
RECIPE_DIR = Path(__file__).parents[1] / "recipes"


def build_policy(size: str, resolution: int, device: str, dtype: torch.dtype, cut: bool = False,
                 text_tokens: int | None = None, **video):
    """The tiny test pipeline's policy, or a real size's (random weights; prompt embeddings are cached random
    tensors of the real shapes, so no text encoder is needed). ``video``: Wan's ``width`` and ``num_frames``."""
    if size == "tiny":
        policy = SD3Policy(build_tiny_sd3_pipeline(0), resolution=resolution, guidance_scale=4.5, max_sequence_length=16)
        return policy.to(device)
    return build_real_size_policy(size, resolution, device, dtype, cut=cut, text_tokens=text_tokens, prompts=[PROMPT],
                                  **video)


def video_settings(args) -> dict:
    """Wan's frame size and count (none for image sizes)."""
    return dict(width=args.width, num_frames=args.num_frames) if args.size == "wan-1.3b" else {}


def timed(fn, repeats: int, device: str, warm_up: list | None = None) -> float:
    """Median wall time of ``fn`` in seconds, after one warm-up call (whose time is appended to ``warm_up``)."""
    first = synchronized_seconds(fn, device)
    if warm_up is not None:
        warm_up.append(first)
    times = sorted(synchronized_seconds(fn, device) for _ in range(repeats))
    return times[len(times) // 2]


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


def synchronized_seconds(fn, device: str) -> float:
    """Wall time of one call of ``fn``, the accelerator's queued work included."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def release_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def memory_table(args, resolution: int, dtype: torch.dtype) -> list[dict]:
    """One training iteration per setting of (gradient checkpointing, EMA offload), each with a freshly built model
    and trainer: its seconds and peak GPU memory (weights included), or why it could not run. On a GPU the first
    setting runs one uncounted iteration before, so one-time costs (kernel choices, allocator growth) stay out of
    the rows.
    """
    from accelerate.state import AcceleratorState, GradientState

    from tempflow.config import TempFlowGRPOConfig
    from tempflow.trainer import TempFlowGRPOTrainer

    recipe = yaml.safe_load((RECIPE_DIR / RECIPES[args.size]).read_text())
    rows = []
    offloads = (True, False) if recipe.get("use_ema") else (False,)  # EMA offload needs an EMA
    settings = [(True, False)] if args.checkpointing_only else itertools.product((True, False), offloads)
    for index, (checkpointing, offload) in enumerate(settings):
        row = {"gradient_checkpointing": checkpointing, "ema_offload": offload}
        with tempfile.TemporaryDirectory() as output_dir:
            config = TempFlowGRPOConfig.from_dict({
                **recipe, "output_dir": output_dir, "resolution": resolution,
                "mixed_precision": "bf16" if dtype == torch.bfloat16 else "no", "num_inference_steps": args.steps,
                "num_generations": args.children, "prompts_per_iteration": 1, "seeds_per_prompt": 1,
                "gradient_checkpointing": checkpointing,
                "ema_offload": offload, "reward_funcs": ["brightness"], "reward_weights": None, "reward_kwargs": None,
                "reward_frames": None, "num_branch_steps_per_iteration": None, "child_num_inference_steps": None, "eval_prompts": None,
                "report_to": "none", "disable_progress_bar": True, **video_settings(args),
            })
            policy = build_policy(args.size, resolution, args.device, dtype, args.cut_layers, args.text_tokens,
                                  **video_settings(args))
            trainer = TempFlowGRPOTrainer(config, policy=policy, train_prompts=[{"prompt": PROMPT}])
            try:
                for _ in range(2 if index == 0 and args.device.startswith("cuda") else 1):
                    reset_peak(args.device)
                    row["seconds"] = synchronized_seconds(trainer.training_step, args.device)
                row["peak_gb"] = peak_memory_gb(args.device)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            del trainer, policy
            release_memory(args.device)
            AcceleratorState._reset_state(reset_partial_state=True)  # the next trainer makes its own Accelerator
            GradientState._reset_state()
        rows.append(row)
        print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def write_json(results: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "sd35m", "flux-dev", "wan-1.3b"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None,
                        help="default: 64 tiny, 512 sd35m, 1024 flux-dev, 480 wan-1.3b (its height)")
    parser.add_argument("--width", type=int, default=832, help="wan-1.3b: video width (default 832, its card's)")
    parser.add_argument("--num-frames", type=int, default=81, help="wan-1.3b: frames (default 81, its card's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--cut-layers", action="store_true",
                        help="real sizes: the real widths with one or two blocks (the GPU suite's CPU dry run)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="real sizes: text tokens of the random prompt embeddings (default 333 sd35m, 512 flux-dev)")
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
    parser.add_argument("--memory-table", action="store_true",
                        help="measure whole training iterations under the size's recipe instead (real sizes only)")
    parser.add_argument("--checkpointing-only", action="store_true",
                        help="memory table: only the gradient-checkpointing row without EMA offload")
    parser.add_argument("--output", help="also write the results as JSON here (the eager results before compiling)")
    args = parser.parse_args(argv)
    resolution = args.resolution or {"tiny": 64, "sd35m": 512, "flux-dev": 1024, "wan-1.3b": 480}[args.size]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.memory_table and args.size == "tiny":
        parser.error("--memory-table needs a real size (its recipe): --size sd35m or flux-dev")
    results = {"size": args.size, "resolution": resolution, "device": device_name(args.device), "dtype": args.dtype,
               "cut_layers": args.cut_layers, "N": args.steps, "G": args.children, **video_settings(args)}
    if args.memory_table:
        print(f"{args.size} @ {resolution}px on {results['device']} ({args.dtype}): one training iteration "
              f"(recipe {RECIPES[args.size]}, 1 prompt, 1 ODE path, N={args.steps}, G={args.children}) per setting")
        results["memory_table"] = memory_table(args, resolution, dtype)
        results["process_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        write_json(results, args.output)
        return results

    policy = build_policy(args.size, resolution, args.device, dtype, args.cut_layers, args.text_tokens,
                          **video_settings(args))
    policy.transformer.eval()
    prompts = [PROMPT] * args.seeds if args.size != "tiny" else ["a red square"] * args.seeds
    embeds = policy.encode_prompts(prompts)
    n, g = args.steps, args.children
    evals_per_seed = n + g * n * (n - 1) // 2
    images = args.seeds * g * (n - 1)

    floor = measure_floor(policy, embeds, args.floor_batch_sizes, args.repeats, args.device)
    best_batch = min(floor, key=floor.get)
    floor_s = floor[best_batch] * evals_per_seed * args.seeds

    engine = RolloutEngine(policy, noise_level=0.7, batch_size=args.rollout_batch_size)
    seeds = list(range(args.seeds))

    def rollout():
        return engine.branched(embeds, list(range(args.seeds)), seeds, n, list(range(n - 1)), g)

    reset_peak(args.device)
    tempflow_s = timed(rollout, max(1, args.repeats - 1), args.device)
    tempflow_peak = peak_memory_gb(args.device)
    reset_peak(args.device)
    reference_s = timed(lambda: reference_rollout(policy, embeds, seeds, n, g, 0.7), max(1, args.repeats - 1),
                        args.device)
    reference_peak = peak_memory_gb(args.device)

    policy.add_lora(r=args.lora_rank, alpha=2 * args.lora_rank)
    training = {f"checkpointing_{flag}": training_ratio(policy, embeds, args.train_batch_size, args.device, flag,
                                                        args.repeats) for flag in (False, True)}
    results |= {
        "seeds": args.seeds, "evals_per_seed": evals_per_seed,
        "floor_ms_per_latent_eval": {b: 1000 * s for b, s in floor.items()}, "floor_best_batch": best_batch,
        "floor_s": floor_s, "tempflow_s": tempflow_s, "tempflow_images_per_s": images / tempflow_s,
        "tempflow_vs_floor": floor_s / tempflow_s, "reference_s": reference_s,
        "speedup_vs_reference": reference_s / tempflow_s, "tempflow_peak_gb": tempflow_peak,
        "reference_peak_gb": reference_peak, "training": training,
    }
    print(f"{args.size} @ {resolution}px on {results['device']} ({args.dtype}), N={n}, G={g}, {args.seeds} seeds, "
          f"{evals_per_seed} evaluations per seed")
    print("floor ms per latent-eval by batch: " + ", ".join(f"B{b} {1000 * s:.2f}" for b, s in floor.items()))
    print(f"floor {floor_s:.3f}s | tempflow {tempflow_s:.3f}s ({images / tempflow_s:.1f} images/s, "
          f"{results['tempflow_vs_floor']:.2f} of floor) | reference loop {reference_s:.3f}s "
          f"(tempflow {results['speedup_vs_reference']:.2f}x faster)")
    for name, t in training.items():
        print(f"training inner step ({name}): {t['inner_step_s'] * 1000:.1f} ms vs plain fwd+bwd "
              f"{t['plain_fwd_bwd_s'] * 1000:.1f} ms → {t['ratio']:.2f}x", flush=True)
    write_json(results, args.output)  # kept if compiling fails or runs out of time
    if args.compile:
        results["compile"] = c = compiled_vs_eager(policy, embeds, args.floor_batch_sizes, args.repeats, args.device,
                                                   rollout, args.compile_backend, args.compile_mode,
                                                   args.compile_batch_buckets)
        print(f"compiled ({c['backend']}, {c['mode']}, buckets {c['batch_buckets'] or 'none: dynamic batch'}), "
              f"LoRA r{args.lora_rank} attached, ms per latent-eval eager → compiled: "
              + ", ".join(f"B{b} {c['eager_ms_per_latent_eval'][b]:.2f} → {c['compiled_ms_per_latent_eval'][b]:.2f}"
                          for b in args.floor_batch_sizes))
        print(f"rollout eager {c['eager_rollout_s']:.3f}s → compiled {c['compiled_rollout_s']:.3f}s "
              f"({c['rollout_speedup']:.2f}x) | compile {c['compile_s']:.1f}s, {c['graphs_compiled']} graph(s)")
        write_json(results, args.output)
    return results


if __name__ == "__main__":
    main()
