"""`TempFlowGRPOConfig`: every setting of a training run, in one dataclass, grouped as users look for them: run,
model, data and rewards, sampling, algorithm, objective, optimisation, speed, logging. Choice lists are defined
here once (torch-free, for validation before anything heavy loads).

Field help texts are the CLI's ``--help``. Defaults follow the TempFlow-GRPO / Flow-GRPO recipes for SD3.5-M
(DESIGN §3); field names follow TRL's ``GRPOConfig`` where the idea is the same (``num_generations``,
``beta``, ``epsilon``, ``scale_rewards``, ``num_iterations``, ``learning_rate``, ...). Recipes are YAML files
of these fields; ``tempflow train RECIPE.yaml --key value`` overrides any of them.
"""

from __future__ import annotations

import difflib
import json
import math
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .attention import (
    ATTENTION_BACKENDS,
    BLOCK_SPARSE,
    BLOCK_SPARSE_KERNELS,
    TOKEN_PRUNING,
    check_token_grid_users,
)
from .limits import MAX_SEED, MAX_SIDE, MAX_STEPS, pixel_multiple, sample_size_problem, text_length_problem

ALGORITHMS = ("tempflow_grpo", "flow_grpo", "diffusion_nft")
MODEL_FAMILIES = ("auto", "sd3", "flux", "flux_kontext", "qwen_image", "qwen_image_edit", "qwen_image_edit_plus", "wan")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SDE_TYPES = ("sde", "cps")
"""The stochastic steps of :mod:`tempflow.sampling` (``STOCHASTIC_STEPS``)."""
ADVANTAGE_GROUPS = ("seed", "prompt")
SCALE_REWARDS = ("group", "batch", "none")
REWARD_ERROR_POLICIES = ("raise", "skip")
GUARD_ACTIONS = ("stop", "warn")
LORA_INITS = ("gaussian", "default")
LORA_DTYPES = ("float32", "bfloat16")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
KL_NORMALIZATIONS = ("step_variance", "noise_scale")
LOSS_MEAN_OVER = ("all_rows", "nonzero_advantage_rows", "nonzero_advantage_child_slots")
LR_SCHEDULER_TYPES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
"""Learning-rate schedules offered (diffusers' ``get_scheduler`` names, as in TRL's ``lr_scheduler_type``)."""
"""``torch.compile`` modes offered. The CUDA-graph modes (``reduce-overhead``, ``max-autotune``) are not: CUDA
graphs reuse their output memory on the next replay, while rollouts keep velocities across calls and the KL
reference runs between a training forward and its backward."""


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


MAX_UNBRANCHED_STEPS_PER_PASS = 2
"""Optimizer steps per pass over an un-branched rollout above which the config warns (Flow-GRPO's scripts take 1-2)."""


class UnbranchedStepsWarning(UserWarning):
    """An un-branched config takes more than :data:`MAX_UNBRANCHED_STEPS_PER_PASS` optimizer steps per rollout."""


@dataclass
class TempFlowGRPOConfig:
    # --- run ---
    output_dir: str = _help("Where checkpoints, LoRA weights, metrics and plots are written.", default="outputs/run")
    seed: int = _help("Seed of everything random: prompts, noise, branch steps, shuffling.", default=42)

    # --- model ---
    model_name_or_path: str = _help(
        "Hub id or local directory of a diffusers pipeline: SD3/SD3.5 (StableDiffusion3Pipeline), FLUX.1 "
        "(FluxPipeline), Qwen-Image (QwenImagePipeline) or Wan 2.1 text-to-video, 1.3B or 14B (WanPipeline); or "
        "`shapes` for the shipped ShapesWorld pipeline.",
        default="shapes",
    )
    model_family: str = _help(
        "`auto` (the pipeline class in model_index.json, or the hub id's name), `sd3`, `flux`, `qwen_image` or `wan`.",
        default="auto",
    )
    resolution: int = _help("Image height and width in pixels (the height when `width` is set).", default=512)
    width: int | None = _help(
        "Width in pixels, for the families that sample non-square sizes (qwen_image, wan); default: resolution.",
        default=None,
    )
    num_frames: int | None = _help(
        "Video frames per sample (wan: 1 + a multiple of 4; default 81, its model card's). Images: leave unset.",
        default=None,
    )
    edit_condition_area: int | None = _help(
        "qwen_image_edit: pixels of the source image as the model sees it (default: the pipeline's 1024*1024; "
        "Flow-GRPO's Qwen-Image-Edit runs use 512*512 = 262144). Other families: leave unset.",
        default=None,
    )
    guidance_scale: float = _help(
        "CFG scale for SD3, Qwen-Image (its true_cfg_scale, with the norm rescale) and Wan, in rollouts and log-prob "
        "recomputation alike; the guidance embedding for FLUX.",
        default=4.5,
    )
    negative_prompt: str | None = _help(
        "CFG's negative prompt (SD3, Qwen-Image, Wan); default the family's pipeline's: '' (Qwen-Image: ' ', its "
        "model card's).",
        default=None,
    )
    max_sequence_length: int | None = _help(
        "Text tokens per prompt; default the family's (SD3 256, FLUX 512, Qwen-Image 512, Wan 512), or the pipeline "
        "T5 tokenizer's `model_max_length` when shorter (ShapesWorld: 8).",
        default=None,
    )
    mixed_precision: str = _help("`no`, `fp16` or `bf16`: weights of frozen parts and autocast.", default="no")
    use_lora: bool = _help(
        "Train a LoRA adapter (peft) instead of the full transformer. Full fine-tuning (false) trains every "
        "transformer weight, exports `transformer/` with save_pretrained, and with beta > 0 keeps a frozen copy of "
        "the initial transformer as the KL reference. Under DeepSpeed ZeRO-3 (full fine-tuning only) that copy is "
        "made before sharding, so it is whole on every GPU.",
        default=True,
    )
    lora_r: int = _help("LoRA rank.", default=32)
    lora_alpha: int = _help("LoRA alpha.", default=64)
    lora_init: str = _help("LoRA init (peft `init_lora_weights`): `gaussian` or `default`.", default="gaussian")
    lora_target_modules: list[str] | None = _help("Modules to adapt; default the model family's.", default=None)
    lora_dtype: str = _help(
        "dtype of the trained adapter weights (LoRA, and block-sparse gates), and of their gradients, AdamW "
        "state, EMA shadow, DiffusionNFT's old policy, checkpoints and exported LoRA: `float32` or "
        "`bfloat16` (the official TempFlow-GRPO FLUX script's: no float32 master copy). bfloat16 keeps 8 "
        "significant bits: a change below 2^-9 to 2^-8 of a weight's magnitude rounds away (lr 3e-4 leaves "
        "a weight of magnitude 1 unchanged), and so do small EMA and old-policy moves. LoRA only, with "
        "mixed_precision bf16 or no; refused under DeepSpeed, and FSDP with mixed precision, which keep "
        "float32 master weights.",
        default="float32",
    )

    # --- data and rewards ---
    train_prompts: str = _help(
        "Prompt file: .txt (one prompt a line) or .jsonl (objects with a `prompt` key; other keys are passed "
        "to rewards as metadata), or a named set: the official runs' `geneval:train`, `pickscore:train`, ... (fetched "
        "and cached on first use: `tempflow prompts list`) or ShapesWorld's `shapes:train` / `shapes:eval`.",
        default="shapes:train",
    )
    eval_prompts: str | None = _help("Held-out prompt file (same formats); none disables evaluation.", default="shapes:eval")
    num_eval_prompts: int | None = _help(
        "Evaluate on n held-out prompts spread evenly over the file (every task keeps its share); default all.",
        default=None,
    )
    prompt_tasks: list[str] | None = _help(
        "Keep only the train and eval prompts of these tasks (a record's `task` or `tag` key, or a ShapesWorld "
        "spec's task: single_object, two_objects, counting, colors, position, color_attr); default all.",
        default=None,
    )
    reward_funcs: list[str] = _help(
        "Registered reward names or `package.module:function` paths.", default_factory=lambda: ["shapes"]
    )
    reward_kwargs: dict | str | None = _help(
        "Constructor arguments of reward classes, by reward name, e.g. {pickscore: {normalize: true}} "
        "(JSON on the command line).",
        default=None,
    )
    reward_weights: list[float] | None = _help("Weight of each reward in the sum; default all 1.", default=None)
    reward_frames: list[int] | None = _help(
        "Video: the frames (indices; negative count from the end) that image rewards score, their scores averaged; "
        "default every frame. Video rewards (e.g. `frame_consistency`) see the whole video.",
        default=None,
    )
    eval_reward_funcs: list[str] = _help(
        "Extra rewards computed only at evaluation (e.g. `shapes_strict` for GenEval-style accuracy).",
        default_factory=list,
    )
    reward_timeout: float | None = _help(
        "Seconds a reward may take for one batch; a slower one is handled by reward_error_policy.", default=None
    )
    gold_reward_funcs: list[str] = _help(
        "Held-out *gold* rewards, scored only at evaluation and never trained on (their weighted mean is eval/gold): "
        "what guard_gold_drop holds the training reward against, to catch a proxy being gamed.",
        default_factory=list,
    )
    gold_reward_weights: list[float] | None = _help("Weights of gold_reward_funcs (default: equal).", default=None)
    guard_gold_drop: float | None = _help(
        "Guard: at an evaluation, the gold score has fallen more than this (and more than twice the standard error of "
        "the difference, so that evaluation noise never fires it) below its best so far while the training reward on "
        "the evaluation prompts rose above its value then (reward hacking). Needs gold_reward_funcs; null: off.",
        default=0.05,
    )
    guard_diversity_fraction: float | None = _help(
        "Guard: within-group diversity of the rollouts (mean pairwise distance of a group's samples) over the last 3 "
        "iterations has fallen below this fraction of the first 3 iterations'. null: off.",
        default=0.25,
    )
    guard_action: str = _help(
        "What a guard that fires does: `stop` (checkpoint, then end the run, exit 3) or `warn`.",
        default="stop",
    )
    reward_error_policy: str = _help(
        "When a reward raises, times out or returns NaN/None: `raise` (stop with the reward's name) or `skip` (leave the "
        "sample out of advantages, with a warning).",
        default="raise",
    )

    # --- sampling ---
    num_inference_steps: int = _help("Denoising steps N of a training rollout.", default=10)
    eval_num_inference_steps: int = _help("ODE steps of evaluation sampling.", default=40)
    noise_level: float = _help("SDE noise level a (0.7: what TempFlow-GRPO's published SD3.5, FLUX and Qwen-Image code executes).", default=0.7)
    sde_type: str = _help("Stochastic step: `sde` (Flow-GRPO) or `cps` (coefficients-preserving).", default="sde")
    num_generations: int = _help(
        "G: images per prompt (flow_grpo, diffusion_nft) or SDE children per branch step (tempflow_grpo).", default=6
    )
    prompts_per_iteration: int = _help("Prompts sampled per process per training iteration.", default=4)
    seeds_per_prompt: int = _help(
        "tempflow_grpo: ODE main paths (noise seeds) per prompt; each seed is branched on its own.", default=1
    )

    # --- algorithm: TempFlow-GRPO or Flow-GRPO, each component one switch (the paper's ablations) ---
    algorithm: str = _help(
        "`tempflow_grpo` (branched rollouts, per-step credit), `flow_grpo` (full SDE trajectories) or "
        "`diffusion_nft` (ODE rollouts from the old policy; a flow-matching loss on the re-noised final samples, "
        "no log-probs: README 'DiffusionNFT').",
        default="tempflow_grpo",
    )
    branching: bool = _help("tempflow_grpo: branch G SDE children off the ODE path at each branch step.", default=True)
    branch_steps: list[int] | None = _help(
        "Step indices to branch at; default all but the last step.", default=None
    )
    num_branch_steps_per_iteration: int | None = _help(
        "Branch at a random subset of k of the branch steps each iteration (cheaper rollouts).", default=None
    )
    child_num_inference_steps: int | None = _help(
        "Finish children with at most this many ODE steps (coarser than the main path); default: same grid.",
        default=None,
    )
    noise_aware_weighting: bool = _help("Weight each step's loss by its noise std (mean 1).", default=True)
    advantage_group: str = _help(
        "tempflow_grpo: normalise rewards among the children of one seed at one step (`seed`) or among all "
        "children of the prompt at that step (`prompt`).",
        default="seed",
    )
    scale_rewards: str = _help("Divide centred rewards by the `group` std, the `batch` std, or `none`.", default="group")
    adv_clip_max: float = _help("Advantages are clamped to ±adv_clip_max.", default=5.0)
    sde_window_size: int | None = _help(
        "flow_grpo: SDE only in a window of this many consecutive steps (ODE elsewhere); only window steps "
        "are trained. Default: SDE everywhere.",
        default=None,
    )
    sde_window_range: list[int] | None = _help(
        "[first, last] step where a window may start; default the whole trajectory.", default=None
    )

    nft_beta: float = _help(
        "diffusion_nft: β of the implicit policies v+ = β·v_θ + (1−β)·v_old and v− = (1+β)·v_old − β·v_θ (the "
        "official config.beta: 1.0 for GenEval, PickScore and HPSv2, 0.1 for OCR and the multi-reward run).",
        default=1.0,
    )
    old_policy_decay: list[float] = _help(
        "diffusion_nft: [flat_steps, rate, max] of the old policy's soft update after every iteration, "
        "θ_old ← d·θ_old + (1−d)·θ with d = 0 for the first flat_steps optimizer steps, then min((steps − "
        "flat_steps)·rate, max). The official decay_type 1 (GenEval, PickScore): [0, 0.001, 0.5]; 2 (OCR): "
        "[75, 0.0075, 0.999]; [0, 0, 0]: the old policy is θ.",
        default_factory=lambda: [0.0, 0.001, 0.5],
    )
    timestep_fraction: float = _help(
        "diffusion_nft: each final sample is trained at int(num_inference_steps × this) of the rollout schedule's "
        "timesteps, drawn per sample without repeats (the official train.timestep_fraction 0.99: 9 of 10).",
        default=0.99,
    )

    # --- objective, with the switches between the peers' conventions (README: Fidelity) ---
    epsilon: float = _help("Clip range ε of the ratio (tiny on purpose in this field).", default=1e-4)
    beta: float = _help(
        "KL coefficient to the reference policy (LoRA disabled): beta·mean((μ_θ−μ_ref)²)/(2·std²), std as "
        "kl_normalization says; diffusion_nft: beta·mean((v_θ−v_ref)²) on the velocities, as its official code.",
        default=0.0,
    )
    kl_normalization: str = _help(
        "What the KL term divides the squared mean difference by, i.e. what a given beta means. `step_variance`: "
        "2·std² with the step's noise std = s(σ)·sqrt(−Δ), the exact Gaussian KL (TempFlow-GRPO's code). "
        "`noise_scale`: 2·s(σ)², without the Δ (Flow-GRPO's code), so the same beta is 1/(−Δ) times weaker there "
        "(3.7–25× at SD3.5's 10 steps). CPS steps divide by their std either way.",
        default="step_variance",
    )
    cfg_uncond_gradient: bool = _help(
        "SD3 with CFG: whether the loss's gradient also flows through the unconditional prediction "
        "(TempFlow-GRPO's and Flow-GRPO's SD3 training code: yes). False detaches it, so only the conditional "
        "branch is trained (× the CFG scale). No effect without CFG (FLUX, guidance_scale 1).",
        default=True,
    )
    loss_mean_over: str = _help(
        "Which rows the loss averages over. `all_rows`: every training row. `nonzero_advantage_rows`: rows "
        "with zero advantage (equal rewards in their group, or an unscored sample) leave the mean, as the "
        "Flow-GRPO and TempFlow-GRPO codes drop such samples. `nonzero_advantage_child_slots` (branched "
        "rollouts): as TempFlow-GRPO's train_sd3_pr.py, the k-th children of one ODE path at every branch "
        "step count as one sample, left out only when all their advantages are zero. Left-out rows stay in "
        "their micro-batches (masked), and the mean is over the counted rows of all processes, so a step "
        "does not depend on how the batch is split over processes; `train/counted_row_fraction` logs their "
        "share.",
        default="all_rows",
    )

    # --- optimisation ---
    learning_rate: float = _help("AdamW learning rate.", default=3e-4)
    lr_scheduler_type: str = _help(
        "Learning-rate schedule over the run's optimizer steps (diffusers' get_scheduler): constant, "
        "constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial (decay to 0 at the last step). "
        "Stepped once per applied optimizer step; resumed exactly from a checkpoint.",
        default="constant",
    )
    warmup_steps: int = _help(
        "Optimizer steps of linear warmup from 0 to learning_rate; when > 0 it wins over warmup_ratio (as in TRL).",
        default=0,
    )
    warmup_ratio: float = _help(
        "Warmup as a fraction of the run's planned optimizer steps (max_steps × optimizer steps per iteration), "
        "used when warmup_steps is 0.",
        default=0.0,
    )
    adam_beta1: float = _help("AdamW β1.", default=0.9)
    adam_beta2: float = _help("AdamW β2.", default=0.999)
    adam_epsilon: float = _help("AdamW ε.", default=1e-8)
    weight_decay: float = _help("AdamW weight decay.", default=1e-4)
    max_grad_norm: float = _help("Gradient clipping norm.", default=1.0)
    num_iterations: int = _help("Passes (inner epochs) over each rollout batch.", default=1)
    per_device_train_batch_size: int = _help("Training rows (transitions) per micro-batch.", default=8)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=4)
    max_steps: int = _help(
        "Training iterations, each one rollout batch, its rewards and its optimizer steps (num_iterations passes "
        "of gradient_accumulation_steps micro-batches). Unlike TRL's max_steps, which counts optimizer steps: a run "
        "takes max_steps × optimizer_steps_per_iteration optimizer steps (several per iteration).",
        default=100,
    )
    max_consecutive_skipped_steps: int = _help(
        "Optimizer steps with non-finite gradients are skipped; this many in a row stop the run.", default=10
    )
    use_ema: bool = _help("Keep an EMA of the trainable weights (evaluation and export use it).", default=False)
    ema_decay: float = _help("EMA decay per update.", default=0.9)
    ema_update_interval: int = _help(
        "Update the EMA after optimizer step n when n + 1 is a multiple of this (the official TempFlow-GRPO and "
        "Flow-GRPO scripts: 8, their EMAModuleWrapper's update_step_interval), with decay min(ema_decay, "
        "(1 + n)/(10 + n)); 1: after every step.",
        default=1,
    )
    ema_offload: bool = _help(
        "Keep the EMA in CPU memory and update it there (the trainable weights are copied to the CPU once per "
        "optimizer step): frees one copy of them from GPU memory, at the cost of that transfer.",
        default=False,
    )

    # --- speed: the same settings hold for rollouts and log-prob recomputation ---
    rollout_batch_size: int = _help(
        "Latents per transformer call in rollouts (before CFG doubling); branch children of different "
        "timesteps are packed together up to this size.",
        default=16,
    )
    gradient_checkpointing: bool = _help("Trade compute for memory in the transformer.", default=False)
    attention_backend: str = _help(
        "`auto`: cuDNN SDPA on Hopper, torch's choice elsewhere, and the recipe's block-sparse attention or "
        "token pruning only where a measurement on this GPU at the rollout's shape shows the whole "
        "transformer step at least 1.15x faster (cached on disk; on the CPU auto is dense). A named kernel "
        "runs them as configured: sdpa, sdpa_cudnn, sdpa_flash, sdpa_efficient, sdpa_math, or through "
        "diffusers' dispatcher flex, sage, flash_attn (pip install tempflow[flash]).",
        default="auto",
    )
    compile_transformer: bool = _help(
        "Compile the transformer with torch.compile, in place, for rollouts, log-prob recomputation and evaluation "
        "alike (after LoRA, gradient checkpointing and token pruning are set up). The first calls of each batch "
        "shape and mode compile (minutes at real sizes); BENCHMARKS.md has the speed-ups measured. Not with "
        "DeepSpeed ZeRO-3.",
        default=False,
    )
    compile_backend: str = _help(
        "torch.compile backend: `inductor` (generates kernels: the speed-up; on the CPU it needs a C++ compiler), "
        "or `aot_eager` / `eager` to check that the model traces, without code generation.",
        default="inductor",
    )
    compile_mode: str = _help(
        "torch.compile mode (inductor): `default` or `max-autotune-no-cudagraphs` (longer compile, tuned matmuls). "
        "Modes with CUDA graphs are not offered: rollouts keep outputs across calls, which CUDA graphs overwrite.",
        default="default",
    )
    compile_batch_buckets: list[int] = _help(
        "Batch sizes that the compiled graphs are specialised for. Empty: the batch dimension is compiled "
        "dynamic, one graph per mode (rollout, recomputation, KL reference) for every batch size. A list, "
        "e.g. 8 16 32: static graphs (dynamic=False), one per bucket used and mode; each transformer call's "
        "batch (after CFG doubling) is padded with copies of its last row up to the smallest bucket that "
        "holds it (larger batches run in chunks of the largest), and the padding is dropped: the same "
        "results, at the cost of the padded rows' compute.",
        default_factory=list,
    )
    token_pruning_layers: list[int] = _help(
        "Blocks after which image (or video) tokens are pruned (Representation Shift, DESIGN §7; SD3, FLUX and Wan; "
        "FLUX counts double blocks, then single blocks). Empty: off.",
        default_factory=list,
    )
    token_pruning_keep_ratio: float = _help(
        "Fraction of the active image tokens each sample keeps at each pruning block, in (0, 1].", default=0.5
    )
    block_sparse_density: float = _help(
        "VSA-style block-sparse attention (DESIGN §7): fraction of the image key tiles each query tile attends "
        "to, in (0, 1]; text stays dense. 1: off (dense).",
        default=1.0,
    )
    block_sparse_tile: list[int] = _help(
        "Tile shape in tokens over the token grid: (height, width) for images, 8 8 is 64 tokens; (frames, height, "
        "width) for video (wan), e.g. 4 4 4.",
        default_factory=lambda: [8, 8],
    )
    block_sparse_layers: list[int] = _help(
        "Blocks whose attention is block-sparse (FLUX: double, then single blocks). Empty: every block.",
        default_factory=list,
    )
    block_sparse_delta_correction: bool = _help(
        "Add each tile's anchor-query (dense - sparse) difference to the tile (one exact query per tile).",
        default=False,
    )
    block_sparse_gate: bool = _help(
        "Add the coarse tile-level output through a zero-initialised per-head gate, trained with the LoRA and "
        "saved beside it (block_sparse_gates.safetensors).",
        default=False,
    )
    block_sparse_kernel: str = _help(
        "Fine-stage kernel: auto (FlexAttention on CUDA, else PyTorch), flex, triton or torch.", default="auto"
    )

    # --- logging, evaluation and checkpoints ---
    logging_steps: int = _help("Log metrics every n iterations.", default=1)
    eval_steps: int | None = _help("Evaluate every n iterations (and at the end); none: only at start and end.", default=None)
    save_steps: int = _help("Checkpoint every n iterations.", default=10)
    save_total_limit: int = _help("Keep at most this many checkpoints.", default=2)
    resume_from_checkpoint: str | None = _help("A checkpoint directory, or `latest` in output_dir.", default=None)
    overwrite_output_dir: bool = _help(
        "Start a fresh run in an output_dir that holds another run, deleting that run's checkpoints, metrics, samples "
        "and weights first. Without it (or resume_from_checkpoint) such an output_dir is refused.",
        default=False,
    )
    report_to: str = _help("accelerate tracker: `tensorboard`, `wandb` or `none`.", default="none")
    disable_progress_bar: bool = _help("Hide progress bars.", default=False)

    # --- provenance: the official run a recipe reproduces (`tempflow check-recipe`, README "Fidelity") ---
    reference: str | None = _help(
        "The official configuration this recipe reproduces, e.g. `tempflow_grpo/geneval_sd3_pr` (`tempflow "
        "check-recipe --list` names them); `none`: it claims none.",
        default=None,
    )
    deviations: dict | str | None = _help(
        "Where the recipe differs from its reference on purpose: hyperparameter name (as `tempflow check-recipe` "
        "prints it) -> one line of reason (JSON on the command line). The check fails on any difference not stated "
        "here.",
        default=None,
    )
    recipe_num_processes: int | None = _help(
        "The process (GPU) count this recipe's per-process sizes (prompts_per_iteration, "
        "gradient_accumulation_steps) were derived for; the trainer warns when launched on another count, whose "
        "global batch differs. `tempflow check-recipe` prints the sizes for other counts.",
        default=None,
    )

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.reward_kwargs, str):
            try:
                self.reward_kwargs = json.loads(self.reward_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(f"config `reward_kwargs`: not valid JSON ({err.msg})") from None
        self.reward_kwargs = self.reward_kwargs or {}
        if isinstance(self.deviations, str):
            try:
                self.deviations = json.loads(self.deviations)
            except json.JSONDecodeError as err:
                raise ValueError(f"config `deviations`: not valid JSON ({err.msg})") from None
        self._validate()

    def _check_types(self) -> None:
        """Every field holds a value of its annotated type: a YAML recipe hands values over unconverted, so
        `num_generations: 2.5` or `reward_funcs: brightness` would otherwise fail deep inside a run. Integers are
        accepted for floats (and converted), tuples for lists."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            if not _conforms(value, hints[f.name]):
                scalar_for_list = _is_list_type(hints[f.name]) and not isinstance(value, list)
                hint = f": a list of one is written [{value}]" if scalar_for_list else ""
                raise ValueError(f"config `{f.name}`: must be {_describe(hints[f.name])} (got {value!r}){hint}")
            if hints[f.name] in (float, float | None) and isinstance(value, int):
                value = float(value)
            setattr(self, f.name, value)

    def _validate(self) -> None:
        def reject(name: str, why: str) -> None:
            raise ValueError(f"config `{name}`: {why} (got {getattr(self, name)!r})")

        def one_of(name: str, choices) -> None:
            if getattr(self, name) not in choices:
                reject(name, f"must be one of {list(choices)}")

        def positive(*names: str) -> None:
            for name in names:
                value = getattr(self, name)
                if value is not None and value <= 0:
                    reject(name, "must be positive")

        for f in fields(self):  # nan passes every comparison, so each bound below would let it through
            value = getattr(self, f.name)
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(number, float) and not math.isfinite(number) for number in numbers):
                reject(f.name, "must be finite")
        one_of("algorithm", ALGORITHMS)
        one_of("model_family", MODEL_FAMILIES)
        one_of("mixed_precision", MIXED_PRECISIONS)
        one_of("attention_backend", ATTENTION_BACKENDS)
        one_of("compile_mode", COMPILE_MODES)
        one_of("sde_type", SDE_TYPES)
        one_of("advantage_group", ADVANTAGE_GROUPS)
        one_of("scale_rewards", SCALE_REWARDS)
        one_of("reward_error_policy", REWARD_ERROR_POLICIES)
        one_of("guard_action", GUARD_ACTIONS)
        if self.gold_reward_weights is not None and len(self.gold_reward_weights) != len(self.gold_reward_funcs):
            reject("gold_reward_weights", f"needs one weight per gold reward ({len(self.gold_reward_funcs)})")
        if self.guard_gold_drop is not None and self.guard_gold_drop < 0:
            reject("guard_gold_drop", "must be non-negative")
        if self.guard_diversity_fraction is not None and not 0 < self.guard_diversity_fraction < 1:
            reject("guard_diversity_fraction", "must lie in (0, 1)")
        one_of("lora_init", LORA_INITS)
        one_of("lora_dtype", LORA_DTYPES)
        if self.lora_dtype != "float32" and not self.use_lora:
            reject("lora_dtype", "is for LoRA adapters (use_lora true); full fine-tuning trains the weights "
                                 "as loaded")
        if self.lora_dtype != "float32" and self.mixed_precision == "fp16":
            reject("lora_dtype", "bfloat16 needs mixed_precision bf16 (the official FLUX setting) or no: "
                                 "fp16 autocast would compute the bf16 adapter in fp16")
        one_of("lr_scheduler_type", LR_SCHEDULER_TYPES)
        one_of("kl_normalization", KL_NORMALIZATIONS)
        one_of("loss_mean_over", LOSS_MEAN_OVER)
        if self.warmup_steps < 0:
            reject("warmup_steps", "must be non-negative")
        if not 0 <= self.warmup_ratio < 1:
            reject("warmup_ratio", "must lie in [0, 1)")
        if self.lr_scheduler_type == "constant" and (self.warmup_steps or self.warmup_ratio):
            reject("lr_scheduler_type", "constant takes no warmup; use constant_with_warmup")
        positive("ema_update_interval", "recipe_num_processes")
        self._check_deviations()
        positive(
            "resolution", "num_inference_steps", "eval_num_inference_steps", "num_generations",
            "prompts_per_iteration", "seeds_per_prompt", "rollout_batch_size", "num_iterations",
            "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_steps",
            "lora_r", "lora_alpha", "logging_steps", "save_steps", "save_total_limit", "epsilon",
            "adv_clip_max", "sde_window_size", "num_branch_steps_per_iteration", "child_num_inference_steps",
            "eval_steps", "num_eval_prompts", "max_sequence_length", "max_consecutive_skipped_steps", "reward_timeout",
            "width", "num_frames", "edit_condition_area",
        )
        self._check_sizes()
        for name in ("num_inference_steps", "eval_num_inference_steps", "child_num_inference_steps"):
            if (getattr(self, name) or 0) > MAX_STEPS:
                reject(name, f"must be at most {MAX_STEPS}, the timesteps the scheduler was trained on")
        if not 0 <= self.seed <= MAX_SEED:
            reject("seed", f"must lie in [0, {MAX_SEED}]")
        if self.guidance_scale < 0:
            reject("guidance_scale", "must be non-negative")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                reject(name, "must lie in [0, 1)")
        positive("adam_epsilon", "max_grad_norm")
        if self.weight_decay < 0:
            reject("weight_decay", "must be non-negative")
        if self.num_generations < 2:
            reject("num_generations", "needs at least 2 samples per group to compute a group-relative advantage")
        if self.num_inference_steps < 2:
            reject("num_inference_steps", "needs at least 2 steps (the last step is never trained)")
        if not 0 <= self.noise_level <= 1:
            reject("noise_level", "must lie in [0, 1]")
        if self.beta < 0:
            reject("beta", "must be non-negative")
        if len(set(self.token_pruning_layers)) != len(self.token_pruning_layers) or any(
            layer < 0 for layer in self.token_pruning_layers
        ):
            reject("token_pruning_layers", "must be distinct non-negative block indices")
        if not 0 < self.token_pruning_keep_ratio <= 1:
            reject("token_pruning_keep_ratio", "must lie in (0, 1]")
        if not self.compile_backend:
            reject("compile_backend", "must name a torch.compile backend")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            reject("compile_mode", "is an inductor mode; other backends take none")
        if len(set(self.compile_batch_buckets)) != len(self.compile_batch_buckets) or any(
            size < 1 for size in self.compile_batch_buckets
        ):
            reject("compile_batch_buckets", "must be distinct positive batch sizes")
        if self.compile_batch_buckets and not self.compile_transformer:
            reject("compile_batch_buckets", "needs compile_transformer")
        if not 0 < self.block_sparse_density <= 1:
            reject("block_sparse_density", "must lie in (0, 1]")
        if len(self.block_sparse_tile) not in (2, 3) or min(self.block_sparse_tile) < 1:
            reject("block_sparse_tile", "must be 2 (or, for video, 3) positive tile sizes")
        one_of("block_sparse_kernel", BLOCK_SPARSE_KERNELS)
        grid_users = {TOKEN_PRUNING: bool(self.token_pruning_layers), BLOCK_SPARSE: self.block_sparse_density < 1}
        try:
            check_token_grid_users({name for name, on in grid_users.items() if on})
        except ValueError as err:
            reject("block_sparse_density", str(err))
        if not 0 <= self.ema_decay < 1:
            reject("ema_decay", "must lie in [0, 1)")
        if self.ema_offload and not self.use_ema:
            reject("ema_offload", "needs use_ema")
        if self.branch_steps is not None:
            if not self.branch_steps:
                reject("branch_steps", "must not be empty")
            bad = [i for i in self.branch_steps if not 0 <= i < self.num_inference_steps - 1]
            if bad:
                reject("branch_steps", f"indices must lie in [0, num_inference_steps - 2]; bad: {bad}")
        if self.num_branch_steps_per_iteration is not None:
            available = len(self.branch_steps) if self.branch_steps else self.num_inference_steps - 1
            if self.num_branch_steps_per_iteration > available:
                reject("num_branch_steps_per_iteration", f"exceeds the {available} branch steps available")
        if self.sde_window_size is not None and self.sde_window_size > self.num_inference_steps - 1:
            reject("sde_window_size", "must leave the last step out of the window")
        if self.sde_window_range is not None:
            if len(self.sde_window_range) != 2 or not 0 <= self.sde_window_range[0] <= self.sde_window_range[1]:
                reject("sde_window_range", "must be [first, last] with 0 <= first <= last")
            if self.sde_window_size is None:
                reject("sde_window_range", "needs sde_window_size")
            if self.sde_window_range[1] + self.sde_window_size > self.num_inference_steps - 1:
                reject("sde_window_range", "a window starting at `last` would reach the final step")
        if not self.reward_funcs:
            reject("reward_funcs", "needs at least one reward")
        if not isinstance(self.reward_kwargs, dict) or not all(isinstance(v, dict) for v in self.reward_kwargs.values()):
            reject("reward_kwargs", "must map reward names to dicts of constructor arguments")
        stray = sorted(set(self.reward_kwargs) - set(self.reward_funcs) - set(self.eval_reward_funcs)
                       - set(self.gold_reward_funcs))
        if stray:
            reject("reward_kwargs", f"names rewards that are not used: {stray}")
        if self.reward_frames is not None:
            frames = self.num_frames
            if not self.reward_frames:
                reject("reward_frames", "must name at least one frame (null: every frame)")
            if frames is not None and any(not -frames <= f < frames for f in self.reward_frames):
                reject("reward_frames", f"indices must lie in [-{frames}, {frames - 1}] for num_frames {frames}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            reject("reward_weights", f"needs one weight per reward ({len(self.reward_funcs)})")
        self._check_diffusion_nft()
        if self.loss_mean_over == "nonzero_advantage_child_slots" and not self.branched:
            reject("loss_mean_over", "nonzero_advantage_child_slots needs branched rollouts (tempflow_grpo with "
                   "branching); un-branched samples are their own slots: use nonzero_advantage_rows")
        if self.branched and self.sde_window_size is not None:
            reject("sde_window_size", "applies to un-branched rollouts only (flow_grpo, or branching: false)")
        steps_per_pass = self.optimizer_steps_per_iteration // self.num_iterations
        if not self.branched and steps_per_pass > MAX_UNBRANCHED_STEPS_PER_PASS:
            warnings.warn(
                f"un-branched rollouts train every sample at each of its {self.trained_timesteps} trained timesteps "
                f"({self.rows_per_iteration} rows per iteration), so this config takes {steps_per_pass} optimizer steps "
                f"per pass over one rollout; the Flow-GRPO and DiffusionNFT scripts take 1-2. Consider gradient_accumulation_steps: {self.trained_timesteps} "
                "(the trained timesteps): on ShapesWorld, 9 steps per rollout made the no-branching ablation "
                "collapse (BENCHMARKS.md)", UnbranchedStepsWarning, stacklevel=4)

    def _check_sizes(self) -> None:
        """Sample sizes that the model can take (its VAE and patch multiple) and that fit in memory; text
        length."""
        multiple = pixel_multiple(self.model_name_or_path, self.model_family)
        problem = sample_size_problem(multiple, self.resolution, self.width, self.num_frames)
        if problem:
            name, why = problem
            raise ValueError(f"config `{name}`: {why} (got {getattr(self, name)!r})")
        if why := text_length_problem(self.max_sequence_length):
            raise ValueError(f"config `max_sequence_length`: {why} (got {self.max_sequence_length!r})")
        if self.edit_condition_area is not None and self.edit_condition_area > MAX_SIDE**2:
            raise ValueError(f"config `edit_condition_area`: must be at most {MAX_SIDE}x{MAX_SIDE} pixels "
                             f"(got {self.edit_condition_area!r})")

    def _check_diffusion_nft(self) -> None:
        if len(self.old_policy_decay) != 3 or min(self.old_policy_decay) < 0 or self.old_policy_decay[2] >= 1:
            raise ValueError("config `old_policy_decay`: must be [flat_steps, rate, max] with non-negative values and "
                             f"max < 1 (got {self.old_policy_decay!r})")
        if not 0 < self.nft_beta:
            raise ValueError(f"config `nft_beta`: must be positive (got {self.nft_beta!r})")
        if not 0 < self.timestep_fraction <= 1 or int(self.num_inference_steps * self.timestep_fraction) < 1:
            raise ValueError("config `timestep_fraction`: must lie in (0, 1] and leave at least one timestep of "
                             f"num_inference_steps {self.num_inference_steps} (got {self.timestep_fraction!r})")
        if self.algorithm != "diffusion_nft":
            return
        if self.sde_window_size is not None:
            raise ValueError("config `sde_window_size`: diffusion_nft samples with the ODE and has no SDE window "
                             f"(got {self.sde_window_size!r})")
        if self.loss_mean_over != "all_rows":
            raise ValueError("config `loss_mean_over`: diffusion_nft trains every sample, zero advantage included "
                             f"(r = 1/2 still pulls toward the old policy); use all_rows (got {self.loss_mean_over!r})")

    def _check_deviations(self) -> None:
        if self.deviations is None:
            return
        if not isinstance(self.deviations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() and "\n" not in v.strip()
            for k, v in self.deviations.items()
        ):
            raise ValueError("config `deviations`: must map hyperparameter names to one line of reason each")

    @property
    def branched(self) -> bool:
        """Whether rollouts branch children off an ODE path (TempFlow-GRPO) or run full SDE trajectories."""
        return self.algorithm == "tempflow_grpo" and self.branching

    @property
    def weighted(self) -> bool:
        """Whether each step's loss is scaled by its noise-aware weight."""
        return self.algorithm == "tempflow_grpo" and self.noise_aware_weighting

    @property
    def rows_per_iteration(self) -> int:
        """Training rows (stochastic steps) one process's rollout yields per iteration."""
        if self.branched:
            pool = len(self.branch_steps) if self.branch_steps else self.num_inference_steps - 1
            steps = self.num_branch_steps_per_iteration or pool
            return self.prompts_per_iteration * self.seeds_per_prompt * steps * self.num_generations
        return self.prompts_per_iteration * self.num_generations * self.trained_timesteps

    @property
    def trained_timesteps(self) -> int:
        """Timesteps trained per sample of an un-branched rollout: diffusion_nft's share of the schedule, else the
        SDE window, else every step but the last."""
        if self.algorithm == "diffusion_nft":
            return int(self.num_inference_steps * self.timestep_fraction)
        return self.sde_window_size or self.num_inference_steps - 1

    @property
    def optimizer_steps_per_iteration(self) -> int:
        """Optimizer steps of one iteration: ``num_iterations`` passes over its rows in micro-batches of
        ``per_device_train_batch_size``, one step per ``gradient_accumulation_steps`` of them."""
        micro_batches = math.ceil(self.rows_per_iteration / self.per_device_train_batch_size)
        return self.num_iterations * math.ceil(micro_batches / self.gradient_accumulation_steps)

    @property
    def num_warmup_steps(self) -> int:
        """Warmup in optimizer steps: ``warmup_steps`` when set, else ``warmup_ratio`` of the planned steps."""
        if self.warmup_steps > 0:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * self.max_steps * self.optimizer_steps_per_iteration)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TempFlowGRPOConfig:
        """Build from a mapping (a parsed recipe), rejecting unknown keys by name."""
        unknown = sorted(set(values) - cls.field_names())
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**values)


FIELD_GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("model", "the pipeline that is trained, and how it samples", (
        "model_name_or_path", "model_family", "resolution", "width", "num_frames", "edit_condition_area",
        "guidance_scale", "negative_prompt", "max_sequence_length")),
    ("sampling", "the rollouts of one iteration: prompts, samples per prompt, noise", (
        "train_prompts", "prompt_tasks", "prompts_per_iteration", "num_generations", "seeds_per_prompt",
        "num_inference_steps", "noise_level", "sde_type", "seed")),
    ("algorithm", "TempFlow-GRPO, Flow-GRPO or DiffusionNFT, each component one switch", (
        "algorithm", "branching", "branch_steps", "num_branch_steps_per_iteration",
        "child_num_inference_steps", "noise_aware_weighting", "advantage_group", "scale_rewards",
        "adv_clip_max", "sde_window_size", "sde_window_range", "nft_beta", "old_policy_decay",
        "timestep_fraction")),
    ("loss", "the objective, and the official codes' conventions (README: Fidelity)", (
        "epsilon", "beta", "kl_normalization", "cfg_uncond_gradient", "loss_mean_over")),
    ("rewards", "what the rollouts are scored with", (
        "reward_funcs", "reward_kwargs", "reward_weights", "reward_frames", "reward_timeout",
        "reward_error_policy")),
    ("optimisation", "AdamW, its schedule, the batch of an optimizer step, and the EMA", (
        "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "adam_beta1", "adam_beta2",
        "adam_epsilon", "weight_decay", "max_grad_norm", "max_steps", "num_iterations",
        "per_device_train_batch_size", "gradient_accumulation_steps", "max_consecutive_skipped_steps",
        "use_ema", "ema_decay", "ema_update_interval")),
    ("LoRA", "the trained adapter (or, with use_lora false, full fine-tuning)", (
        "use_lora", "lora_r", "lora_alpha", "lora_init", "lora_target_modules", "lora_dtype")),
    ("evaluation", "held-out prompts (ODE samples) and gold rewards never trained on", (
        "eval_prompts", "num_eval_prompts", "eval_num_inference_steps", "eval_steps", "eval_reward_funcs",
        "gold_reward_funcs", "gold_reward_weights")),
    ("checkpointing", "where a run writes, and resuming", (
        "output_dir", "save_steps", "save_total_limit", "resume_from_checkpoint", "overwrite_output_dir")),
    ("distributed and memory", "precision, memory, compilation; the process count a recipe is sized for", (
        "mixed_precision", "rollout_batch_size", "gradient_checkpointing", "ema_offload",
        "compile_transformer", "compile_backend", "compile_mode", "compile_batch_buckets",
        "recipe_num_processes")),
    ("attention", "kernels and approximations, for rollouts and log-prob recomputation alike", (
        "attention_backend", "token_pruning_layers", "token_pruning_keep_ratio", "block_sparse_density",
        "block_sparse_tile", "block_sparse_layers", "block_sparse_delta_correction", "block_sparse_gate",
        "block_sparse_kernel")),
    ("guards", "when a run goes wrong while its curve looks fine (README: Guardrails)", (
        "guard_gold_drop", "guard_diversity_fraction", "guard_action")),
    ("logging", "metrics, trackers and progress", ("logging_steps", "report_to", "disable_progress_bar")),
    ("provenance", "the official run a recipe reproduces (check-recipe); no effect on training", (
        "reference", "deviations")),
)
"""``(title, what it holds, field names)``: the fields of :class:`TempFlowGRPOConfig` by concern, in the order
``tempflow train --help`` shows them. Every field is in exactly one group."""


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_conforms(item, args[0]) for item in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _is_list_type(hint: Any) -> bool:
    return typing.get_origin(hint) is list or any(typing.get_origin(arg) is list for arg in typing.get_args(hint))


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
               type(None): "null"}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    return _TYPE_WORDS.get(hint, str(hint))


RECIPE_KEYS_OUTSIDE_THE_CONFIG = ("env",)
"""Top-level recipe keys that are not config fields: TRL's `env` (environment variables to set)."""


def parse_config(recipe: str | None = None, overrides: Sequence[str] = ()) -> TempFlowGRPOConfig:
    """A config from a YAML recipe (``TrlParser``'s ``--config`` format: config fields, plus an optional ``env``
    mapping) and ``--field value`` overrides, which win. Every problem raises one ``ValueError`` (or
    ``FileNotFoundError``) naming the recipe, key or option, never argparse's usage text and exit."""
    from trl import TrlParser

    class Parser(TrlParser):
        def error(self, message: str):
            raise ValueError(_config_message(message))

    parser = Parser((TempFlowGRPOConfig,))
    options = {option for action in parser._actions for option in action.option_strings}  # with --no_X, --a-b
    args = list(overrides)
    for arg in args:
        option = arg.split("=", 1)[0]
        if option.startswith("--") and option not in options:
            _reject_key(option[2:], "option ", "--")
    if recipe is not None:
        _check_recipe(recipe)
        args = ["--config", recipe, *args]
    (config,) = parser.parse_args_and_config(args)
    return config


def _check_recipe(recipe: str) -> None:
    import yaml

    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {recipe!r} does not exist" if not path.exists() else f"recipe {recipe!r} is not a file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"recipe {recipe!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at position "
                         f"{err.start})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f", line {where.line + 1}" if where else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())  # one line, whatever YAML says
        raise ValueError(f"recipe {recipe!r}{line}: not valid YAML ({problem})") from None
    if not isinstance(values, dict):
        raise ValueError(f"recipe {recipe!r} must be a mapping of config fields to values")
    for key in values:
        if key not in TempFlowGRPOConfig.field_names() and key not in RECIPE_KEYS_OUTSIDE_THE_CONFIG:
            _reject_key(str(key), f"recipe {recipe!r}: key ")


def _reject_key(key: str, where: str, prefix: str = "") -> None:
    close = difflib.get_close_matches(key.replace("-", "_"), TempFlowGRPOConfig.field_names(), n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else " (`tempflow train --help` lists the fields)"
    raise ValueError(f"{where}{prefix}{key} is not a config field{hint}")


def _config_message(argparse_message: str) -> str:
    """argparse's ``argument --max_steps/--max-steps: invalid int value: 'two'`` → ``config `max_steps`: ...``."""
    import re

    match = re.match(r"argument --([\w]+)(?:/--[\w-]+)?: (.*)", argparse_message, re.S)
    return f"config `{match[1]}`: {match[2]}" if match else f"config: {argparse_message}"
