"""Efficient attention against dense attention, measured in one run: speed and accuracy.

Three sections, each a ratio to the dense baseline of the same run:

- **kernels**: at SD3.5-M (1024 px), FLUX-dev (1024 px) and video (≈20k tokens) attention shapes, the best
  dense torch SDPA kernel against block-sparse joint attention (coarse tile selection + fine kernel + dense text)
  at several densities, with and without delta correction; time and relative error of the image output
  ``‖O − O_dense‖ / ‖O_dense‖``. Image Q/K/V are random but smooth over the token grid, so attention is local
  as in image models; the errors still only indicate what a trained model gives, which the ShapesWorld section
  measures.
- **transformer**: one FLUX-dev-sized transformer step (random weights, 1024 px) dense against token pruning
  (keep 0.7) and block-sparse attention.
- **shapes**: ODE samples of the held-out ShapesWorld prompts with the shipped pipeline under each method:
  strict accuracy, and the relative error of the final latents against dense sampling from the same noise.

On the CPU (``--device cpu``, the default without CUDA) the kernel and transformer sections use small shapes and
the PyTorch fine kernel, which builds a dense mask: they check the plumbing, not the speed.

    python benchmarks/attention.py --device cuda --dtype bf16 --output benchmarks/results/attention_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from throughput import timed  # noqa: E402

from tempflow.attention.block_sparse import BlockSparse, apply_block_sparse, joint_sparse_attention  # noqa: E402
from tempflow.attention.pruning import TokenPruning, apply_token_pruning  # noqa: E402
from tempflow.model_configs import FLUX_DEV  # noqa: E402
from tempflow.testing import build_real_size_transformer  # noqa: E402

GPU_SHAPES = {
    "sd35m-1024px": dict(grid=(64, 64), text=333, heads=24, dim=64, tile=(8, 8)),
    "flux-dev-1024px": dict(grid=(64, 64), text=512, heads=24, dim=128, tile=(8, 8)),
    # 49×480×832 video: 13×30×52 latent tokens, here 12×32×52 so that 4×4×4 tiles divide it (19968 + 512 text)
    "video-20k": dict(grid=(12, 32, 52), text=512, heads=24, dim=128, tile=(4, 4, 4)),
}
CPU_SHAPES = {
    "image-256": dict(grid=(16, 16), text=16, heads=2, dim=32, tile=(4, 4)),
    "video-256": dict(grid=(4, 8, 8), text=16, heads=2, dim=32, tile=(2, 4, 4)),
}
TINY_FLUX = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(8, 12, 12))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def local_qkv(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """Image Q/K/V that vary smoothly over the token grid (random Fourier features of the positions plus noise),
    so attention is local as in image models rather than flat; text Q/K/V are plain Gaussian."""
    generator = torch.Generator(device).manual_seed(seed)
    heads, dim = shape["heads"], shape["dim"]
    axes = [torch.linspace(0, 1, g, device=device) for g in shape["grid"]]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).flatten(0, -2)  # [N, dims]

    def features():
        frequencies = 6.0 * torch.randn(heads, positions.shape[1], dim // 2, generator=generator, device=device)
        phase = positions @ frequencies  # [H, N, dim/2]
        noise = 0.3 * torch.randn(1, heads, len(positions), dim, generator=generator, device=device)
        return (torch.cat([phase.sin(), phase.cos()], dim=-1)[None] * 2.0 + noise).to(dtype)

    def randn(length):
        return torch.randn(1, heads, length, dim, generator=generator, device=device).to(dtype)

    return [features() for _ in range(3)], [randn(shape["text"]) for _ in range(3)]


def best_dense(query, key, value, device: str, repeats: int) -> tuple[str, float]:
    """The fastest torch SDPA kernel for this shape (every kernel that runs), and its time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"default": None}
    if device.startswith("cuda"):
        kernels |= {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION}
    times = {}
    for name, kernel in kernels.items():
        def run(kernel=kernel):
            if kernel is None:
                return F.scaled_dot_product_attention(query, key, value)
            with sdpa_kernel([kernel]):
                return F.scaled_dot_product_attention(query, key, value)
        try:
            times[name] = timed(run, repeats, device)
        except RuntimeError:  # kernel not available for this shape/dtype/device
            continue
    name = min(times, key=times.get)
    return name, times[name]


def kernel_section(shapes, densities, kernel, device, dtype, repeats) -> list[dict]:
    rows = []
    for shape_name, shape in shapes.items():
        image, text = local_qkv(shape, device, dtype)
        tokens = image[0].shape[2]
        joint = [torch.cat([t, i], dim=2) for t, i in zip(text, image)]
        dense_kernel, dense_s = best_dense(*joint, device, repeats)
        dense_image = F.scaled_dot_product_attention(*joint)[:, :, shape["text"]:]
        rows.append(dict(shape=shape_name, tokens=tokens + shape["text"], method=f"dense ({dense_kernel})",
                         ms=1000 * dense_s, speedup=1.0, rel_error=0.0))
        for density in densities:
            for delta in (False, True):
                sparse = BlockSparse(density, shape["tile"], delta_correction=delta, kernel=kernel)

                def run(sparse=sparse, image=image, text=text, grid=shape["grid"]):
                    return joint_sparse_attention(image, text, grid, sparse)

                seconds = timed(run, repeats, device)
                out = run()[0]
                rows.append(dict(shape=shape_name, tokens=tokens + shape["text"],
                                 method=f"block-sparse {density:g}" + (" + delta" if delta else ""),
                                 ms=1000 * seconds, speedup=dense_s / seconds, rel_error=relative_error(out, dense_image)))
    return rows


def transformer_section(size, keep_ratio, density, kernel, device, dtype, repeats) -> list[dict]:
    """One transformer step, dense vs pruned vs block-sparse (the same random weights and inputs)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    if size == "flux-dev":
        config, grid, text = FLUX_DEV, 64, 512
        model = build_real_size_transformer("flux-dev", device, dtype)
    else:
        config, grid, text = TINY_FLUX, 16, 16
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**config).to(device, dtype).eval()
    tokens = grid * grid
    inputs = dict(
        hidden_states=torch.randn(1, tokens, config["in_channels"], device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], device=device, dtype=dtype),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype),
        timestep=torch.tensor([0.5], device=device), guidance=torch.tensor([3.5], device=device),
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, grid, grid, device, dtype),
    )
    blocks = config["num_layers"] + config["num_single_layers"]

    def step():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    dense_s, dense = timed(step, repeats, device), step()
    rows = [dict(method="dense", ms=1000 * dense_s, speedup=1.0, rel_error=0.0)]
    pruning = TokenPruning((blocks // 8,), keep_ratio)
    apply_token_pruning(model, "flux", pruning)
    seconds = timed(step, repeats, device)
    rows.append(dict(method=f"token pruning keep {keep_ratio:g} after block {blocks // 8}", ms=1000 * seconds,
                     speedup=dense_s / seconds, rel_error=relative_error(step(), dense)))
    apply_token_pruning(model, "flux", None)
    tile = (8, 8) if size == "flux-dev" else (4, 4)
    apply_block_sparse(model, "flux", BlockSparse(density, tile, kernel=kernel), (grid, grid))
    seconds = timed(step, repeats, device)
    rows.append(dict(method=f"block-sparse {density:g}", ms=1000 * seconds, speedup=dense_s / seconds,
                     rel_error=relative_error(step(), dense)))
    return rows


def shapes_section(limit, num_steps, kernel, device) -> list[dict]:
    """Held-out ShapesWorld accuracy of the shipped pipeline under each method, from the same noise."""
    from tempflow.evaluation import evaluation_seeds
    from tempflow.policies import load_policy
    from tempflow.prompts import load_prompts, metadata_columns
    from tempflow.rewards.combined import CombinedReward
    from tempflow.rollout import RolloutEngine
    from tempflow.shapes import pipeline_path

    records = load_prompts("shapes:eval")[:limit]
    seeds = evaluation_seeds(0, list(range(len(records))))
    reward = CombinedReward.from_names(["shapes_strict"])
    policy = load_policy(str(pipeline_path()), resolution=64, guidance_scale=4.5).to(device)
    embeds = policy.encode_records(records)
    engine = RolloutEngine(policy, noise_level=0.0, batch_size=64)
    grid = policy.token_grid
    methods = {
        "dense": lambda: None,
        "token pruning keep 0.7 after block 2": lambda: policy.set_token_pruning(TokenPruning((2,), 0.7)),
        "token pruning keep 0.7 after block 4": lambda: policy.set_token_pruning(TokenPruning((4,), 0.7)),
        "block-sparse 0.75 (2×2 tiles)": lambda: policy.set_block_sparse(BlockSparse(0.75, (2, 2), kernel=kernel)),
        "block-sparse 0.5 (2×2 tiles)": lambda: policy.set_block_sparse(BlockSparse(0.5, (2, 2), kernel=kernel)),
        "block-sparse 0.5 + delta": lambda: policy.set_block_sparse(
            BlockSparse(0.5, (2, 2), delta_correction=True, kernel=kernel)),
    }
    rows, dense_latents = [], None
    for name, install in methods.items():
        install()
        with torch.no_grad():
            latents = engine.sample(embeds, list(range(len(records))), seeds, num_steps)
            images = policy.decode(latents).cpu()
        policy.set_token_pruning(None)
        policy.set_block_sparse(None)
        dense_latents = latents if dense_latents is None else dense_latents
        _, parts = reward(images, [r["prompt"] for r in records], **metadata_columns(records))
        rows.append(dict(method=name, strict_accuracy=float(parts["shapes_strict"].mean()),
                         latent_rel_error=relative_error(latents, dense_latents)))
    for row in rows:
        row["accuracy_change"] = row["strict_accuracy"] - rows[0]["strict_accuracy"]
    print(f"ShapesWorld: {len(records)} held-out prompts, {num_steps} ODE steps, token grid {grid}")
    return rows


def _print(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    for row in rows:
        print("  " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--sections", nargs="+", choices=["kernels", "transformer", "shapes"],
                        default=["kernels", "transformer", "shapes"])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--kernel", default="auto", choices=["auto", "triton", "flex", "torch"],
                        help="block-sparse fine kernel (auto: Triton on CUDA)")
    parser.add_argument("--keep-ratio", type=float, default=0.7, help="token pruning keep ratio (transformer section)")
    parser.add_argument("--shapes-limit", type=int, default=200, help="held-out ShapesWorld prompts")
    parser.add_argument("--shapes-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: torch.bfloat16 if on_gpu else torch.float32}[args.dtype]
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    results = {"device": device_name, "dtype": str(dtype).removeprefix("torch."), "kernel": args.kernel}

    if "kernels" in args.sections:
        results["kernels"] = kernel_section(GPU_SHAPES if on_gpu else CPU_SHAPES, args.densities, args.kernel,
                                            args.device, dtype, args.repeats)
        _print(f"attention kernels on {device_name} ({results['dtype']})", results["kernels"])
    if "transformer" in args.sections:
        size = "flux-dev" if on_gpu else "tiny"
        results["transformer"] = transformer_section(size, args.keep_ratio, min(args.densities), args.kernel,
                                                     args.device, dtype, args.repeats)
        _print(f"one {size} FLUX transformer step", results["transformer"])
    if "shapes" in args.sections:
        results["shapes"] = shapes_section(args.shapes_limit, args.shapes_steps, args.kernel, args.device)
        _print("ShapesWorld held-out strict accuracy", results["shapes"])
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
