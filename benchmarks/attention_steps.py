"""Whole transformer steps of every attention method at the sizes the recipes train at, and the decision
``attention_backend: auto`` makes for each: the GPU suite's ``attention-auto`` part (issue 27).

Per shape (SD3.5-M 512/1024 px, FLUX.1-dev 1024/2048 px, Wan 2.1 1.3B at 448x832 with 29 and 77 frames, the frame
counts nearest 33 and 81 whose latents 4x4x4 tiles divide), on random-weight models of the real configs: one rollout
step (``policy.velocity``, CFG where the family uses it, no gradient) with dense attention (the policy's ``auto``
kernel: cuDNN SDPA on Hopper), the other dense kernels (flash SDPA; flash-attn when installed), block-sparse attention
(FlexAttention at densities 0.25 and 0.125, the Triton kernel at 0.125) and token pruning (keep 0.7). Times come from
:func:`tempflow.attention.auto.step_seconds`, the measurement ``auto`` itself takes, so the table's ``auto`` column is
what a training run at that shape would choose: the fastest approximate method at ≥ MIN_SPEEDUP x the dense step, else
dense. A rollout's time is its steps' (the engine packs them at one batch size), so its ratio is the step's.

    python benchmarks/attention_steps.py --output results.json             # on the GPU (bf16)
    python benchmarks/attention_steps.py --dry-run --output results.json   # the plumbing, on the CPU at cut sizes
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import time
from pathlib import Path

import torch

from tempflow.attention.auto import MIN_SPEEDUP, step_seconds
from tempflow.attention.block_sparse import BlockSparse
from tempflow.attention.pruning import TokenPruning
from tempflow.testing import build_real_size_policy

PROMPT = "a photo of a cat"
GPU_SHAPES = {
    "sd35m-512": dict(size="sd35m", resolution=512, batch=8, tile=(8, 8)),
    "sd35m-1024": dict(size="sd35m", resolution=1024, batch=4, tile=(8, 8)),
    "flux-dev-1024": dict(size="flux-dev", resolution=1024, batch=4, tile=(8, 8)),
    "flux-dev-2048": dict(size="flux-dev", resolution=2048, batch=1, tile=(8, 8)),
    "wan-1.3b-448x832x29": dict(size="wan-1.3b", resolution=448, width=832, num_frames=29, batch=1, tile=(4, 4, 4)),
    "wan-1.3b-448x832x77": dict(size="wan-1.3b", resolution=448, width=832, num_frames=77, batch=1, tile=(4, 4, 4)),
}
CPU_SHAPES = {  # cut models (real widths, two blocks) at toy sizes: every call is made, nothing is timed usefully
    "sd35m-64": dict(size="sd35m", resolution=64, batch=2, tile=(2, 2)),
    "wan-1.3b-64x64x5": dict(size="wan-1.3b", resolution=64, width=64, num_frames=5, batch=1, tile=(1, 2, 2)),
}
PRUNE_AFTER_BLOCK = 4


def methods(shape: dict, on_gpu: bool) -> dict:
    """name → (attention backend, token pruning, block-sparse setting); the first is the dense baseline."""
    tile, prune_layer = shape["tile"], PRUNE_AFTER_BLOCK if on_gpu else 0
    chosen = {"dense": ("auto", None, None), "dense (flash SDPA)": ("sdpa_flash", None, None)}
    if importlib.util.find_spec("flash_attn") is not None:
        chosen["dense (flash-attn)"] = ("flash_attn", None, None)
    for density in (0.25, 0.125):
        chosen[f"block-sparse {density:g}, flex"] = ("auto", None, BlockSparse(density, tile, kernel="flex"))
    if on_gpu:
        chosen["block-sparse 0.125, triton"] = ("auto", None, BlockSparse(0.125, tile, kernel="triton"))
    chosen[f"token pruning keep 0.7 after block {prune_layer}"] = ("auto", TokenPruning((prune_layer,), 0.7), None)
    return chosen


def measure_shape(name: str, shape: dict, device: torch.device, dtype: torch.dtype, on_gpu: bool,
                  repeats: int, warmup: int) -> dict:
    extra = {k: shape[k] for k in ("width", "num_frames") if k in shape}
    policy = build_real_size_policy(shape["size"], shape["resolution"], device, dtype, cut=not on_gpu, prompts=[PROMPT],
                                    **extra)
    batch = shape["batch"]
    noise = policy.initial_noise(torch.Generator().manual_seed(0)).to(device)
    latents = noise.expand(batch, *noise.shape[1:]).contiguous()
    sigmas = torch.full((batch,), 0.5, device=device)
    embeds = policy.encode_prompts([PROMPT]).expand(batch)

    def step():
        with torch.no_grad():
            policy.velocity(latents, sigmas, embeds)

    rows = []
    for method, (backend, pruning, sparse) in methods(shape, on_gpu).items():
        row = {"method": method}
        try:
            policy.set_attention_backend(backend)
            policy.set_token_pruning(pruning)
            policy.set_block_sparse(sparse)
            row["ms"] = 1000 * step_seconds(step, device, warmup=warmup, repeats=repeats)
        except (RuntimeError, ValueError, NotImplementedError) as err:  # a kernel this shape or device lacks
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        finally:
            policy.set_token_pruning(None)
            policy.set_block_sparse(None)
        rows.append(row)
    dense_ms = rows[0].get("ms")
    for row in rows:
        row["vs_dense"] = dense_ms / row["ms"] if dense_ms and "ms" in row else None
    approximate = [r for r in rows if r["vs_dense"] and ("block-sparse" in r["method"] or "pruning" in r["method"])]
    best = max(approximate, key=lambda r: r["vs_dense"], default=None)
    auto = best["method"] if best and best["vs_dense"] >= MIN_SPEEDUP else "dense"
    result = {"shape": name, **{k: v for k, v in shape.items() if k != "tile"}, "tile": list(shape["tile"]),
              "tokens": policy.image_seq_len, "cfg": policy.do_cfg, "rows": rows, "auto": auto,
              "auto_vs_dense": best["vs_dense"] if auto != "dense" else 1.0}
    return result


def markdown(results: dict) -> str:
    lines = [f"## Attention per transformer step, and `auto` ({results['device']}, {results['dtype']})", "",
             "| shape | tokens | batch | method | ms | vs dense |", "|---|---|---|---|---|---|"]
    for shape in results["shapes"]:
        for row in shape["rows"]:
            ms = f"{row['ms']:.1f}" if "ms" in row else row.get("error", "")
            ratio = f"{row['vs_dense']:.2f}" if row.get("vs_dense") else ""
            lines.append(f"| {shape['shape']} | {shape['tokens']} | {shape['batch']} | {row['method']} | {ms} | {ratio} |")
    lines += ["", f"`auto` (≥ {MIN_SPEEDUP}x on the whole step, else dense):", ""]
    lines += [f"- {s['shape']}: {s['auto']} ({s['auto_vs_dense']:.2f}x)" for s in results["shapes"]]
    lines += [f"- not measured (time limit): {', '.join(results['skipped'])}"] if results["skipped"] else []
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="cut models at toy sizes on the CPU (float32)")
    parser.add_argument("--shapes", nargs="+", help="a subset of the shapes (default all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--time-limit", type=float, default=180, help="seconds; shapes not started by then are skipped")
    parser.add_argument("--output", help="write the results (with their Markdown table) as JSON here")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.dry_run
    device, dtype = (torch.device("cuda"), torch.bfloat16) if on_gpu else (torch.device("cpu"), torch.float32)
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    chosen = args.shapes or list(shapes)
    unknown = sorted(set(chosen) - set(shapes))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {list(shapes)}")
    results = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "dtype": str(dtype).removeprefix("torch."),
               "min_speedup": MIN_SPEEDUP, "shapes": [], "skipped": []}
    start = time.monotonic()
    for name in chosen:
        if time.monotonic() - start > args.time_limit:
            results["skipped"].append(name)
            continue
        repeats, warmup = (1, 1) if args.dry_run else (args.repeats, 2)
        results["shapes"].append(measure_shape(name, shapes[name], device, dtype, on_gpu, repeats, warmup))
        gc.collect()  # the shape's model is gone with measure_shape's frame
        if on_gpu:
            torch.cuda.empty_cache()
        print(f"{name}: auto -> {results['shapes'][-1]['auto']}", flush=True)
        if args.output:  # after every shape: a part killed at its limit keeps what it measured
            Path(args.output).write_text(json.dumps({**results, "markdown": markdown(results)}, indent=2))
    results["markdown"] = markdown(results)
    print(results["markdown"])
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
