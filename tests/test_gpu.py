"""GPU checks (issue 17) of what had never run on a GPU, at real sizes:

- the Triton block-sparse kernels, forward and backward, against the PyTorch reference at the SD3.5-M and FLUX-dev
  1024 px and the 20k-token video attention shapes, in bf16 and fp16; the FlexAttention path, compiled;
- the compiled transformer against the eager one;
- a random-weight SD3.5-M and FLUX.1-dev, built from their configs: the first inner step is on-policy, and one
  full training iteration (LoRA, bf16 autocast, gradient checkpointing, KL term, EMA) stays under a stated peak
  memory;
- token pruning and SoftPAG on the device; DeepSpeed's fused Adam builds and steps as torch's AdamW does.

All are marked ``gpu`` and skipped without CUDA. ``benchmarks/gpu_suite.py`` runs them on a GPU; its ``--dry-run``
runs them on the CPU (``TEMPFLOW_GPU_DRY_RUN=1``) at :data:`DRY_RUN_SIZES`: the real widths cut to one or two blocks,
small shapes, float32 models and Triton's interpreter, so they cannot rot between GPU sessions.

Tolerances, as relative errors ``‖x − x_ref‖ / ‖x_ref‖``:

- kernels, against the reference computed in float32 from the same half-precision inputs: output 2e-3 in fp16 and
  1.5e-2 in bf16, gradients 5e-3 and 3e-2 (rounding P and the outputs to fp16 or bf16 alone gives 3e-4 and 2.4e-3,
  emulated in float32 at these shapes); the log-sum-exp, accumulated in float32 by both, within 1e-3;
- a model output that should not change (compiled vs eager, nothing pruned, SoftPAG with u = 0): within
  ``rounding`` (bf16 on the GPU: 5e-2, for a stack of bf16 blocks whose kernels differ with the batch size and
  fusion; float32 on the CPU: 1e-4); a change that should show (pruning 30 % of the tokens, u = 1 in one block)
  must exceed twice what the no-op setting moved: on SD3.5-M in bf16 (CPU, 128 px) they moved the velocity by 0.25
  and 0.045, the no-op settings by 0;
- the first inner step's ratio: within ε = 1e-4 of 1 on the GPU (a larger drift would clip on-policy rows), 1e-5
  in float32 as tests/test_trainer.py;
- peak memory of the training iteration (512 px, micro-batches of 4 rows, doubled by SD3's CFG): SD3.5-M below
  10 GiB (bf16 weights and position table 4.6 GiB, activations kept at block boundaries about 1, one block's
  recomputation and LoRA with Adam about 1), FLUX.1-dev below 32 GiB (weights 22.2 GiB, block-boundary activations 2,
  one block's recomputation 0.5, LoRA with Adam 0.8).
"""

import math
import os
from dataclasses import dataclass

import pytest
import torch
from torch._dynamo.utils import counters

from tempflow.attention.block_sparse_kernels import block_sparse_attention
from tempflow.attention.mmdit import mmdit_blocks
from tempflow.attention.pruning import TokenPruning
from tempflow.attention.softpag import SoftPAG
from tempflow.config import TempFlowGRPOConfig
from tempflow.testing import REAL_SIZES, build_real_size_policy
from tempflow.trainer import TempFlowGRPOTrainer

ON_GPU = torch.cuda.is_available()
DRY_RUN = not ON_GPU and os.environ.get("TEMPFLOW_GPU_DRY_RUN") == "1"
if DRY_RUN:  # small ops: one thread each, or OpenMP's waits multiply their time on a shared CPU
    torch.set_num_threads(1)
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_GPU or DRY_RUN), reason="needs a CUDA GPU (benchmarks/gpu_suite.py runs these)"),
]
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs CUDA even in the dry run")
triton_runs = pytest.mark.skipif(
    DRY_RUN and os.environ.get("TRITON_INTERPRET") != "1",
    reason="on the CPU the Triton kernels run in Triton's interpreter: set TRITON_INTERPRET=1 as the process starts",
)

PROMPT = "a photo"
BLOCK = 64  # 8×8 image tiles, 4×4×4 video tiles
KERNEL_TOLERANCES = {torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.5e-2, 3e-2)}  # (output, gradients)
PEAK_MEMORY_BOUND_GIB = {"sd35m": 10, "flux-dev": 32}
REFERENCE_HEADS = 2  # per chunk of the reference's dense float32 scores (20k tokens: 1.6 GB a head)


@dataclass(frozen=True)
class Sizes:
    """What the checks run at."""

    cut: bool
    """Real widths with one or two blocks instead of the real depth."""
    dtype: torch.dtype
    resolution: int
    text_tokens: int | None
    """Text length of the random prompt embeddings; None: the real one."""
    steps: int
    kernel_shapes: dict[str, tuple[int, int, int, int]]
    """Image tokens (in 64-token tiles), text tokens, heads, head dim."""
    kernel_dtypes: tuple[torch.dtype, ...]
    rounding: float
    ratio_tolerance: float
    compile_backend: str


GPU_SIZES = Sizes(
    cut=False, dtype=torch.bfloat16, resolution=512, text_tokens=None, steps=3,
    kernel_shapes={"sd35m-1024px": (4096, 333, 24, 64), "flux-dev-1024px": (4096, 512, 24, 128),
                   "video-20k": (19968, 512, 24, 128)},  # as benchmarks/attention.py's GPU shapes
    kernel_dtypes=(torch.bfloat16, torch.float16), rounding=5e-2, ratio_tolerance=1e-4,
    compile_backend="inductor",
)
DRY_RUN_SIZES = Sizes(
    cut=True, dtype=torch.float32, resolution=64, text_tokens=16, steps=2,
    kernel_shapes={"head-dim-64": (256, 13, 2, 64), "head-dim-128": (128, 20, 1, 128)},
    # Triton 3.8's interpreter multiplies bf16 tl.dot operands wrongly (a 16×16 product comes out near 1e10)
    kernel_dtypes=(torch.float16,), rounding=1e-4, ratio_tolerance=1e-5,
    compile_backend="eager",  # dynamo traces the model; no code generation
)
SIZES = GPU_SIZES if ON_GPU else DRY_RUN_SIZES


@torch.no_grad()
def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


# --- attention kernels ---------------------------------------------------------------------------------------


def _kernel_inputs(shape, dtype, seed=0):
    """q over the image tokens, k/v over text then image tokens, a random 25 % of key blocks per query block, and
    random output gradients for both outputs (so the lse path of the backward is checked too)."""
    image, text, heads, dim = shape
    generator = torch.Generator(DEVICE).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=generator, device=DEVICE)

    q, k, v = randn(1, heads, image, dim), randn(1, heads, text + image, dim), randn(1, heads, text + image, dim)
    blocks = image // BLOCK
    scores = torch.rand(1, heads, blocks, blocks, generator=generator, device=DEVICE)
    index = scores.argsort(dim=-1)[..., : math.ceil(0.25 * blocks)]
    return [t.to(dtype) for t in (q, k, v)], index, randn(1, heads, image, dim), randn(1, heads, image)


def _reference(qkv, index, text, d_out, d_lse):
    """The PyTorch reference in float32 from the same inputs, a few heads at a time: (out, lse, dq, dk, dv)."""
    parts = []
    for start in range(0, qkv[0].shape[1], REFERENCE_HEADS):
        heads = slice(start, start + REFERENCE_HEADS)
        q, k, v = (x[:, heads].float().requires_grad_() for x in qkv)
        out, lse = block_sparse_attention(q, k, v, index[:, heads], BLOCK, text, backend="torch")
        loss = (out * d_out[:, heads]).sum() + (lse * d_lse[:, heads]).sum()
        parts.append((out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v))))
    return [torch.cat(chunks, dim=1) for chunks in zip(*parts)]


def _check_against_reference(backend, shape, dtype):
    qkv, index, d_out, d_lse = _kernel_inputs(shape, dtype)
    qkv = [x.requires_grad_() for x in qkv]
    out, lse = block_sparse_attention(*qkv, index, BLOCK, shape[1], backend=backend)
    loss = (out.float() * d_out).sum() + (lse * d_lse).sum()
    grads = torch.autograd.grad(loss, qkv)
    expected = _reference([x.detach() for x in qkv], index, shape[1], d_out, d_lse)
    output_tolerance, gradient_tolerance = KERNEL_TOLERANCES[dtype]
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, expected[0]) < output_tolerance
    torch.testing.assert_close(lse, expected[1], atol=1e-3, rtol=0)
    for name, grad, reference in zip("qkv", grads, expected[2:]):
        assert relative_error(grad, reference) < gradient_tolerance, f"d{name}"


@triton_runs
@pytest.mark.parametrize("dtype", SIZES.kernel_dtypes, ids=str)
@pytest.mark.parametrize("shape", list(SIZES.kernel_shapes))
def test_triton_kernels_match_the_reference(shape, dtype):
    _check_against_reference("triton", SIZES.kernel_shapes[shape], dtype)


@gpu_only  # FlexAttention has no backward on the CPU (its CPU forward: tests/test_block_sparse_kernels.py)
def test_flex_kernel_compiled_matches_the_reference():
    _check_against_reference("flex", SIZES.kernel_shapes["flux-dev-1024px"], torch.bfloat16)


# --- real-size models ------------------------------------------------------------------------------------------


def _policy(size, cut=SIZES.cut):
    return build_real_size_policy(size, SIZES.resolution, DEVICE, SIZES.dtype, cut=cut,
                                  text_tokens=SIZES.text_tokens, prompts=[PROMPT])


def _velocity(policy, batch):
    generator = torch.Generator().manual_seed(batch)
    latents = torch.cat([policy.initial_noise(generator) for _ in range(batch)]).to(DEVICE)
    with torch.no_grad():
        return policy.velocity(latents, torch.linspace(0.9, 0.2, batch), policy.encode_prompts([PROMPT] * batch))


def test_compiled_transformer_matches_eager():
    """SD3.5-M's widths with two blocks (compiling all 24 takes minutes; benchmarks/throughput.py times that)."""
    policy = _policy("sd35m", cut=True)
    eager = {batch: _velocity(policy, batch) for batch in (3, 5)}
    policy.compile_transformer(SIZES.compile_backend)
    graphs = counters["stats"]["unique_graphs"]
    for batch, expected in eager.items():
        assert relative_error(_velocity(policy, batch), expected) < SIZES.rounding
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one graph for both batch sizes (CFG: 6 and 10 rows)


def _trainer(size, output_dir):
    policy = _policy(size)
    config = TempFlowGRPOConfig(
        output_dir=str(output_dir), resolution=SIZES.resolution, guidance_scale=policy.guidance_scale,
        mixed_precision="bf16" if SIZES.dtype == torch.bfloat16 else "no", noise_level=0.7 if size == "sd35m" else 0.9,
        num_inference_steps=SIZES.steps, num_generations=2, prompts_per_iteration=1, rollout_batch_size=16,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, lora_r=32, lora_alpha=64, beta=0.01,
        gradient_checkpointing=True, use_ema=True, ema_offload=True, reward_funcs=["brightness"],
        train_prompts="unused", eval_prompts=None, disable_progress_bar=True,
    )
    return TempFlowGRPOTrainer(config, policy=policy, train_prompts=[{"prompt": PROMPT}])


@pytest.mark.parametrize("size", REAL_SIZES)
def test_first_inner_step_is_on_policy_and_a_training_iteration_fits(size, tmp_path):
    trainer = _trainer(size, tmp_path)
    with trainer.accelerator.autocast():  # as training_step: rollout and recomputation in the same precision
        rollout = trainer.rollout(trainer._sample_prompts())
        embeds = rollout.embeds
    trainer.compute_advantages(rollout, torch.randn(len(rollout.final_latents)))
    with torch.no_grad(), trainer.accelerator.autocast():
        _, stats = trainer.compute_loss(rollout.transitions, embeds)  # all rows in one batch, unlike the rollout
    assert abs(stats["ratio_min"].item() - 1) <= SIZES.ratio_tolerance
    assert abs(stats["ratio_max"].item() - 1) <= SIZES.ratio_tolerance

    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    metrics = trainer.training_step()
    assert metrics["train/optimizer_steps"] >= 1 and math.isfinite(metrics["train/grad_norm"])
    assert math.isfinite(metrics["reward/mean"]) and math.isfinite(metrics["train/kl"])
    if ON_GPU:
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        assert peak_gib < PEAK_MEMORY_BOUND_GIB[size], f"peak {peak_gib:.1f} GiB"


@pytest.mark.parametrize("size", REAL_SIZES)
def test_token_pruning_and_softpag_run_on_the_device(size):
    policy = _policy(size)
    blocks = len(mmdit_blocks(policy.transformer))
    dense = _velocity(policy, 2)

    def velocity_with(pruning=None, softpag=None):
        policy.set_token_pruning(pruning)
        policy.set_softpag(softpag)
        return _velocity(policy, 2)

    keep_all = velocity_with(pruning=TokenPruning((blocks // 6,), keep_ratio=1.0))
    pruned = velocity_with(pruning=TokenPruning((blocks // 6,), keep_ratio=0.7))
    unperturbed = velocity_with(softpag=SoftPAG(scale=2.0, layers=(blocks // 2,), softness=0.0))
    perturbed = velocity_with(softpag=SoftPAG(scale=2.0, layers=(blocks // 2,), softness=1.0))
    assert all(torch.isfinite(v).all() for v in (keep_all, pruned, unperturbed, perturbed))
    pruning_rounding, softpag_rounding = relative_error(keep_all, dense), relative_error(unperturbed, dense)
    assert pruning_rounding < SIZES.rounding and softpag_rounding < SIZES.rounding
    assert relative_error(pruned, dense) > 2 * pruning_rounding
    assert relative_error(perturbed, dense) > 2 * softpag_rounding


@gpu_only
def test_deepspeed_fused_adam_builds_and_steps_as_adamw(monkeypatch):
    pytest.importorskip("deepspeed")
    major, minor = torch.cuda.get_device_capability()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")  # DeepSpeed cannot parse the image's "9.0a"
    from deepspeed.ops.adam import FusedAdam  # builds the CUDA op on first use (about a minute)

    generator = torch.Generator(DEVICE).manual_seed(0)
    start = torch.randn(1 << 16, generator=generator, device=DEVICE)
    fused, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    pairs = [(fused, FusedAdam([fused], lr=1e-2)), (plain, torch.optim.AdamW([plain], lr=1e-2, weight_decay=0.0))]
    for _ in range(3):
        grad = torch.randn(start.shape, generator=generator, device=DEVICE)
        for param, optimizer in pairs:
            param.grad = grad.clone()
            optimizer.step()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused, start)
