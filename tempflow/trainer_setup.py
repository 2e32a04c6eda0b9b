"""How a trainer is built: prompts and rewards, the accelerator (with DeepSpeed's and FSDP's glue, also on CPUs), the policy
with its attention settings, the trainable weights, the optimizer with its learning-rate schedule, the EMA, and the
run directory. :class:`SetupMixin` holds the steps that ``TempFlowGRPOTrainer.__init__`` runs in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler

from .attention.auto import AutoDecision, decide, decision_key, on_the_cpu, step_seconds
from .attention.block_sparse import BlockSparse
from .attention.pruning import TokenPruning
from .policies import FlowPolicy, load_policy
from .prompts import load_prompts, select_tasks, spread_subset
from .redaction import redacted_config
from .run_directory import TRACKER_PROJECT, remove_previous_run
from .sharding import block_classes, shard_like_policy

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _quiet_deepspeed_cpu_notice() -> None:
    """DeepSpeed, when installed, is imported by accelerate on every run (to recognise its engine) and then logs
    "Setting accelerator to CPU" on a machine without a GPU, whether or not the run uses DeepSpeed."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())


_quiet_deepspeed_cpu_notice()


def record_deepspeed_ranks_on_cpu() -> None:
    """Let ``accelerate launch`` with a DeepSpeed config run on a machine without GPUs (the tests do, over gloo).

    accelerate (1.15) picks a collective backend only for an accelerator device; on CPUs it still has DeepSpeed
    start its process group (DeepSpeed falls back to gloo) but then records a single process ("no backend == no
    distributed training" in ``PartialState``), so every rank would act as the main one. This records the real
    ranks; it does nothing wherever accelerate found a backend itself."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or "LOCAL_RANK" not in os.environ:
        return
    from accelerate import PartialState

    state = PartialState()
    if state.backend is not None or not torch.distributed.is_initialized():
        return
    state.backend = torch.distributed.get_backend()
    state.num_processes = torch.distributed.get_world_size()
    state.process_index = torch.distributed.get_rank()
    state.local_process_index = int(os.environ["LOCAL_RANK"])
    state.distributed_type = DistributedType.DEEPSPEED


def enable_fsdp_on_cpu() -> None:
    """Let ``accelerate launch`` with an FSDP config run on a machine without GPUs (the tests do, over gloo).

    accelerate (1.16) takes its FSDP plugin only for processes on an accelerator device: on CPUs each process runs
    alone ("no backend"), or as DDP with ``ACCELERATE_USE_CPU``. This starts the processes' gloo group as a CPU run
    and marks it multi-device, so that accelerate prepares the model with FSDP2 (torch's ``fully_shard`` runs on a
    CPU mesh). It does nothing where a GPU is visible or the launch config asks for no FSDP."""
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or "LOCAL_RANK" not in os.environ
            or torch.cuda.is_available()):
        return
    from accelerate import PartialState

    state = PartialState(cpu=True)
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.distributed_type = DistributedType.MULTI_GPU  # AcceleratorState turns it into FSDP


def _owner_only(directory: Path) -> None:
    """Make a directory and what it holds readable by its owner alone (0700, files 0600): tracker files record
    the whole config. Best effort: a file system without POSIX modes keeps its own."""
    if not directory.is_dir():  # a tracker that logs elsewhere (wandb: its own directory)
        return
    with contextlib.suppress(OSError):
        for path in [directory, *directory.rglob("*")]:
            path.chmod(0o700 if path.is_dir() else 0o600)


class SetupMixin:
    """The building steps of :class:`~tempflow.trainer.TempFlowGRPOTrainer` (see its ``__init__``)."""

    def _load_prompts(self, train_prompts: list[dict] | None, eval_prompts: list[dict] | None) -> None:
        config = self.config
        self.train_prompts = train_prompts if train_prompts is not None else load_prompts(config.train_prompts)
        self.train_prompts = select_tasks(self.train_prompts, config.prompt_tasks, config.train_prompts)
        if eval_prompts is None and config.eval_prompts not in (None, "", "none"):
            eval_prompts = load_prompts(config.eval_prompts)
        if eval_prompts:
            eval_prompts = select_tasks(eval_prompts, config.prompt_tasks, str(config.eval_prompts))
        self.eval_prompts = spread_subset(eval_prompts or [], config.num_eval_prompts)

    def _build_rewards(self, reward_funcs: dict | None) -> None:
        from .rewards.combined import CombinedReward

        config = self.config
        if reward_funcs is None:
            self.reward = CombinedReward.from_names(config.reward_funcs, config.reward_weights,
                                                    config.reward_error_policy, config.reward_kwargs,
                                                    config.reward_timeout, config.reward_frames)
        else:
            self.reward = CombinedReward(reward_funcs, config.reward_weights, config.reward_error_policy,
                                         config.reward_timeout, config.reward_frames)
        self.eval_reward = None
        if config.eval_reward_funcs:
            self.eval_reward = CombinedReward.from_names(config.eval_reward_funcs, kwargs=config.reward_kwargs,
                                                         frames=config.reward_frames)
        self.gold_reward = None
        if config.gold_reward_funcs:
            self.gold_reward = CombinedReward.from_names(config.gold_reward_funcs, config.gold_reward_weights,
                                                         kwargs=config.reward_kwargs, frames=config.reward_frames)

    def _warn_on_process_count(self) -> None:
        """A recipe's per-process sizes give its global batch only on the process count they were derived for."""
        derived_for, running = self.config.recipe_num_processes, self.accelerator.num_processes
        if derived_for is not None and derived_for != running and self.accelerator.is_main_process:
            warnings.warn(
                f"this recipe's per-process sizes were derived for {derived_for} processes, and {running} are running: "
                f"the global batch is {running}/{derived_for} of the recipe's. `tempflow check-recipe RECIPE "
                f"--num-processes {running}` prints the sizes that keep it", stacklevel=3)

    def _build_policy(self, policy: FlowPolicy | None) -> None:
        """Load the policy (unless given) and set what holds for rollouts and recomputation alike: attention
        kernel, CFG gradient, token pruning or block-sparse attention."""
        config = self.config
        with self._loading_whole_models():
            self.policy = policy or load_policy(
                config.model_name_or_path,
                family=config.model_family,
                torch_dtype=_DTYPES[config.mixed_precision],
                resolution=config.resolution,
                guidance_scale=config.guidance_scale,
                max_sequence_length=config.max_sequence_length,
                negative_prompt=config.negative_prompt,
                width=config.width,
                num_frames=config.num_frames,
            )
        if config.edit_condition_area is not None:
            if not hasattr(self.policy, "condition_area"):
                raise ValueError(f"config `edit_condition_area`: the {self.policy.family} family takes no source image "
                                 "area (qwen_image_edit does)")
            self.policy.condition_area = config.edit_condition_area
        self.policy.to(self.accelerator.device)
        self.policy.set_attention_backend(config.attention_backend)
        self.policy.cfg_uncond_gradient = config.cfg_uncond_gradient
        self.attention_decision = None
        approximation = self._approximate_attention()
        if approximation is not None:
            method, install = approximation
            if config.attention_backend == "auto":
                self.attention_decision = self._decide_attention(method, install)
                if self.accelerator.is_main_process:
                    print(self.attention_decision.line(), flush=True)
            if self.attention_decision is None or self.attention_decision.use:
                install(True)

    def _approximate_attention(self):
        """The recipe's token pruning or block-sparse attention (they exclude each other): its description and a
        switch that installs (True) or removes (False) it; None when the recipe asks for neither."""
        config = self.config
        if config.token_pruning_layers:
            pruning = TokenPruning(tuple(config.token_pruning_layers), config.token_pruning_keep_ratio)
            return (f"token pruning keep {pruning.keep_ratio:g} after blocks {list(pruning.layers)}",
                    lambda on: self.policy.set_token_pruning(pruning if on else None))
        if config.block_sparse_density < 1:
            sparse = BlockSparse(
                config.block_sparse_density, tuple(config.block_sparse_tile), tuple(config.block_sparse_layers),
                config.block_sparse_gate, config.block_sparse_delta_correction, config.block_sparse_kernel,
            )
            return (f"block-sparse {sparse.density:g} ({'x'.join(map(str, sparse.tile))} tiles, {sparse.kernel} "
                    "kernel)", lambda on: self.policy.set_block_sparse(sparse if on else None))
        return None

    def _decide_attention(self, method: str, install) -> AutoDecision:
        """``attention_backend: auto``: whether the recipe's block-sparse attention or pruning pays on this device
        at the rollout's shape (:mod:`tempflow.attention.auto`)."""
        device = self.accelerator.device
        if device.type != "cuda":
            return on_the_cpu(method)
        policy, batch = self.policy, self.config.rollout_batch_size
        key = decision_key(device, policy.family, batch, policy.image_seq_len, policy.transformer.dtype, method)
        noise = policy.initial_noise(torch.Generator().manual_seed(0)).to(device)
        latents = noise.expand(batch, *noise.shape[1:]).contiguous()
        sigmas = torch.full((batch,), 0.5, device=device)
        embeds = policy.encode_prompts(["a photo of a cat"]).expand(batch)

        def step():
            with torch.no_grad(), self.accelerator.autocast():
                policy.velocity(latents, sigmas, embeds)

        def measure():
            dense = step_seconds(step, device)
            install(True)
            try:
                return dense, step_seconds(step, device)
            finally:
                install(False)

        decision = decide(key, method, measure) if self.accelerator.is_main_process else None
        if self.accelerator.num_processes > 1:  # every process follows the main one's measurement
            from accelerate.utils import broadcast_object_list

            shared = [decision]
            broadcast_object_list(shared)
            decision = shared[0]
        return decision

    def _prepare_optimization(self) -> None:
        """AdamW over the trainable weights with its learning-rate schedule, the transformer and optimizer
        prepared by accelerate, the EMA and the LoRA checkpoint hooks."""
        config = self.config
        optimizer = torch.optim.AdamW(
            self.trainable,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler_type, optimizer, num_warmup_steps=config.num_warmup_steps,
            num_training_steps=config.max_steps * config.optimizer_steps_per_iteration,
        )
        self.model, self.optimizer = self.accelerator.prepare(self.policy.transformer, optimizer)
        if self.sharded:  # fully_shard replaced every weight by its shard: what trains, and the EMA, are those
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]
            if self.policy._frozen_reference is not None:
                shard_like_policy(self.policy._frozen_reference, self.fsdp_block_classes,
                                  self.accelerator.state.fsdp_plugin)
        self.ema = None
        if config.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self._ema_inputs(), decay=config.ema_decay)  # checkpointed by trainer_checkpoints
        self._build_old_policy()
        if config.use_lora:
            self.accelerator.register_save_state_pre_hook(self._save_lora_hook)
            self.accelerator.register_load_state_pre_hook(self._load_lora_hook)

    def _start_run_directory(self) -> None:
        config = self.config
        if self.accelerator.is_main_process:
            if config.overwrite_output_dir and not config.resume_from_checkpoint:
                remove_previous_run(config.output_dir)  # only now that the run is ready to start
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        if config.report_to != "none":  # the trackers record the config with its secrets hidden
            self.accelerator.init_trackers(TRACKER_PROJECT, config=redacted_config(config))
            if self.accelerator.is_main_process:
                _owner_only(Path(config.output_dir) / TRACKER_PROJECT)

    def _setup_trainable(self) -> list[torch.nn.Parameter]:
        config = self.config
        if config.use_lora:
            trainable = self.policy.add_lora(config.lora_r, config.lora_alpha, config.lora_init,
                                             config.lora_target_modules, getattr(torch, config.lora_dtype))
        else:
            if config.beta > 0:
                self.policy.keep_frozen_reference()
            self.policy.transformer.requires_grad_(True)
            trainable = list(self.policy.transformer.parameters())
        if config.gradient_checkpointing:
            self.policy.transformer.enable_gradient_checkpointing()
        return trainable

    def _compile_transformer(self) -> None:
        """Compile the one transformer module that rollouts, recomputation and evaluation call: after LoRA,
        gradient checkpointing, token pruning and the frozen reference copy (which stays eager) are in place,
        before ``accelerator.prepare`` wraps it and before its first call."""
        config = self.config
        if self.deepspeed_zero_stage == 3:
            raise ValueError("compile_transformer is not supported with DeepSpeed ZeRO-3, whose hooks gather sharded "
                             "weights around every module call; use ZeRO-2 or turn compilation off")
        self.policy.compile_transformer(config.compile_backend, config.compile_mode, config.compile_batch_buckets)

    def _configure_fsdp(self) -> None:
        """FSDP2: one shard unit per transformer block of the family (the launch config may name the classes), and
        refuse what does not work on sharded weights."""
        config, plugin = self.config, self.accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config")
        if config.lora_dtype != "float32" and config.mixed_precision != "no":
            raise ValueError(f"config `lora_dtype`: {config.lora_dtype} cannot train under FSDP with "
                             f"mixed_precision {config.mixed_precision}: accelerate upcasts the trained "
                             "weights to float32 master copies there; use DDP, mixed_precision no, or "
                             "lora_dtype float32")
        if config.compile_transformer:
            raise ValueError("compile_transformer is not supported with FSDP yet: turn compilation off, or use DDP or "
                             "DeepSpeed ZeRO-2")
        if config.ema_offload:
            raise ValueError("ema_offload is not supported with FSDP: the EMA already lives on each process's shard "
                             "(1/N of the weights)")
        if len(self.eval_prompts) % self.accelerator.num_processes:
            raise ValueError(
                f"FSDP needs the same number of evaluation prompts on every process (every forward gathers the "
                f"sharded weights from all of them): num_eval_prompts ({len(self.eval_prompts)}) must be a multiple "
                f"of the {self.accelerator.num_processes} processes")
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

        self.fsdp_block_classes = block_classes(self.policy.transformer, self.policy.family,
                                                plugin.transformer_cls_names_to_wrap)
        if plugin.auto_wrap_policy is not size_based_auto_wrap_policy:  # unset (NO_WRAP) or by block class
            plugin.auto_wrap_policy = transformer_auto_wrap_policy
            plugin.transformer_cls_names_to_wrap = self.fsdp_block_classes

    @contextlib.contextmanager
    def _loading_whole_models(self):
        """Under ZeRO-3, accelerate registers its DeepSpeed config with transformers, which then shards every model
        it loads (``zero.Init``). The text encoders run outside DeepSpeed's engine, so the pipeline is loaded whole;
        the transformer is sharded when it is prepared."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None or plugin.zero_stage != 3:
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    def _configure_deepspeed(self) -> None:
        """Write the recipe's micro-batch size, accumulation and clipping into accelerate's DeepSpeed config
        (there is no dataloader to infer them from), and refuse what ZeRO-3's sharded weights cannot do."""
        config = self.config
        plugin = self.accelerator.state.deepspeed_plugin
        self.deepspeed_zero_stage = plugin.zero_stage
        if config.lora_dtype != "float32":
            raise ValueError(f"config `lora_dtype`: {config.lora_dtype} cannot train under DeepSpeed, "
                             "whose ZeRO optimizer keeps float32 master weights (and under mixed_precision "
                             "bf16 casts the adapter to bf16 itself); use DDP or lora_dtype float32")
        if plugin.zero_stage == 3:
            if config.use_lora or config.use_ema:
                raise ValueError(
                    "DeepSpeed ZeRO-3 is supported for full fine-tuning (use_lora: false) without EMA: LoRA export and "
                    "the EMA read the trained weights whole, which ZeRO-3 shards; use ZeRO-2 for those"
                )
            if len(self.eval_prompts) % self.accelerator.num_processes:
                raise ValueError(
                    f"DeepSpeed ZeRO-3 needs the same number of evaluation prompts on every process (every forward "
                    f"gathers the sharded weights from all of them): num_eval_prompts ({len(self.eval_prompts)}) must "
                    f"be a multiple of the {self.accelerator.num_processes} processes"
                )
        ds_config = plugin.deepspeed_config
        ds_config.update({
            "train_micro_batch_size_per_gpu": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "train_batch_size": config.per_device_train_batch_size * config.gradient_accumulation_steps
            * self.accelerator.num_processes,
            "gradient_clipping": config.max_grad_norm,
        })
        if ds_config.get("bf16", {}).get("enabled"):  # skip non-finite steps, as the trainer does without DeepSpeed
            ds_config["bf16"]["check_grad_overflow"] = True

    def _ema_inputs(self) -> list[torch.Tensor]:
        """The trainable weights as the EMA reads them: with ``ema_offload``, copies in CPU memory, where the EMA
        lives and is updated (``requires_grad`` is kept: EMAModel copies, rather than averages, frozen weights)."""
        if not self.config.ema_offload:
            return self.trainable
        return [p.detach().to("cpu").requires_grad_(p.requires_grad) for p in self.trainable]
