"""`TempFlowGRPOTrainer`: rollout → reward → advantage → loss → step, on top of accelerate.

One training iteration: sample prompts, roll out (branched for TempFlow-GRPO, full SDE trajectories for
Flow-GRPO), decode and score the samples, turn rewards into group-relative advantages, then take optimizer
steps on the clipped GRPO loss over the rollout's transitions. Each stage is a method a subclass can override.
Everything random derives from ``(seed, iteration, rank, ...)``, so a run resumed from a checkpoint continues
exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .advantages import group_advantages, group_spread, informative_samples
from .attention.block_sparse import BlockSparse
from .attention.pruning import TokenPruning
from .config import TempFlowGRPOConfig
from .errors import NonFiniteTrainingError
from .evaluation import (
    sample_prompt_set,
    score_images,
    scores_by_task,
    task_labels,
    worst_per_task,
)
from .loss import clipped_policy_loss, noise_aware_weights
from .plots import plot_reward_curve, save_before_after_grid, save_image_grid
from .policies import FlowPolicy, load_policy
from .prompts import load_prompts, spread_subset
from .rollout import Rollout, RolloutEngine, Transitions, seeded_generator
from .run_directory import (
    CHECKPOINT_PREFIX,
    TEMPORARY_PREFIX,
    TRACKER_PROJECT,
    TRAINER_STATE,
    check_output_dir,
    checkpoint_to_resume,
    prune_checkpoints,
    remove_previous_run,
    write_manifest,
)
from .sampling import step_kl
from .scoring import StreamingScorer

BEFORE_IMAGES = "before.safetensors"  # in samples/: the first evaluation's images, for the before/after grid
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _quiet_deepspeed_cpu_notice() -> None:
    """DeepSpeed, when installed, is imported by accelerate on every run (to recognise its engine) and then logs
    "Setting accelerator to CPU" on a machine without a GPU, whether or not the run uses DeepSpeed."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())


_quiet_deepspeed_cpu_notice()


def _record_deepspeed_ranks_on_cpu() -> None:
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


class TempFlowGRPOTrainer:
    """Fine-tune a flow-matching text-to-image model with TempFlow-GRPO or Flow-GRPO.

    Args:
        config: the run's settings.
        policy: a loaded :class:`~tempflow.policies.FlowPolicy`; default: loaded from ``config.model_name_or_path``.
        reward_funcs: reward callables by name; default: resolved from ``config.reward_funcs``.
        train_prompts / eval_prompts: prompt records (``{"prompt": ..., **metadata}``); default: loaded from
            ``config.train_prompts`` / ``config.eval_prompts``.
    """

    def __init__(
        self,
        config: TempFlowGRPOConfig,
        policy: FlowPolicy | None = None,
        reward_funcs: dict | None = None,
        train_prompts: list[dict] | None = None,
        eval_prompts: list[dict] | None = None,
        accelerator: Accelerator | None = None,
    ):
        from .rewards.combined import CombinedReward

        self.config = config
        check_output_dir(config.output_dir, config.overwrite_output_dir, resuming=bool(config.resume_from_checkpoint))
        self.train_prompts = train_prompts if train_prompts is not None else load_prompts(config.train_prompts)
        if eval_prompts is None and config.eval_prompts not in (None, "", "none"):
            eval_prompts = load_prompts(config.eval_prompts)
        self.eval_prompts = spread_subset(eval_prompts or [], config.num_eval_prompts)
        if reward_funcs is None:
            self.reward = CombinedReward.from_names(config.reward_funcs, config.reward_weights,
                                                    config.reward_error_policy, config.reward_kwargs,
                                                    config.reward_timeout)
        else:
            self.reward = CombinedReward(reward_funcs, config.reward_weights, config.reward_error_policy,
                                         config.reward_timeout)
        self.eval_reward = None
        if config.eval_reward_funcs:
            self.eval_reward = CombinedReward.from_names(config.eval_reward_funcs, kwargs=config.reward_kwargs)

        if accelerator is None:
            _record_deepspeed_ranks_on_cpu()
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_dir=config.output_dir,
        )
        set_seed(config.seed)
        with self._loading_whole_models():
            self.policy = policy or load_policy(
                config.model_name_or_path,
                family=config.model_family,
                torch_dtype=_DTYPES[config.mixed_precision],
                resolution=config.resolution,
                guidance_scale=config.guidance_scale,
                max_sequence_length=config.max_sequence_length,
            )
        self.policy.to(self.accelerator.device)
        self.policy.set_attention_backend(config.attention_backend)
        self.policy.cfg_uncond_gradient = config.cfg_uncond_gradient
        if config.token_pruning_layers:
            self.policy.set_token_pruning(
                TokenPruning(tuple(config.token_pruning_layers), config.token_pruning_keep_ratio)
            )
        if config.block_sparse_density < 1:
            self.policy.set_block_sparse(BlockSparse(
                config.block_sparse_density, tuple(config.block_sparse_tile), tuple(config.block_sparse_layers),
                config.block_sparse_gate, config.block_sparse_delta_correction, config.block_sparse_kernel,
            ))
        self.trainable = self._setup_trainable()
        self.deepspeed_zero_stage = None
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            self._configure_deepspeed()
        if config.compile_transformer:
            self._compile_transformer()
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
        self.ema = None
        if config.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self._ema_inputs(), decay=config.ema_decay)
            self.accelerator.register_for_checkpointing(self.ema)
        if config.use_lora:
            self.accelerator.register_save_state_pre_hook(self._save_lora_hook)
            self.accelerator.register_load_state_pre_hook(self._load_lora_hook)
        self.engine = RolloutEngine(self.policy, config.noise_level, config.sde_type, config.rollout_batch_size)
        self.step = self.engine.step  # the loss rescores rows with the very step the rollout drew them with
        self.sigmas = self.policy.sigma_schedule(config.num_inference_steps)
        self.step_weights = self._step_weights()
        self.history: list[dict] = []
        self.evaluations: list[dict] = []
        self.iteration = 0
        self.skipped_steps = 0
        self.consecutive_skipped_steps = 0
        self._stop_signal: int | None = None
        if self.accelerator.is_main_process:
            if config.overwrite_output_dir and not config.resume_from_checkpoint:
                remove_previous_run(config.output_dir)  # only now that the run is ready to start
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        if config.report_to != "none":
            self.accelerator.init_trackers(TRACKER_PROJECT, config={k: str(v) for k, v in asdict(config).items()})

    # --- setup --------------------------------------------------------------------------------------------
    def _setup_trainable(self) -> list[torch.nn.Parameter]:
        config = self.config
        if config.use_lora:
            trainable = self.policy.add_lora(config.lora_r, config.lora_alpha, config.lora_init, config.lora_target_modules)
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

    def _step_weights(self) -> torch.Tensor:
        """Noise-aware weight of every step index (mean 1 over the configured trained steps); all 1 if off."""
        steps = self.config.num_inference_steps
        weights = torch.ones(steps)
        if self.config.weighted:
            trained = self._branch_step_pool() if self.config.branched else list(range(steps - 1))
            index = torch.tensor(trained)
            weights[index] = noise_aware_weights(self.sigmas[index], self.sigmas[index + 1], self.config.noise_level)
        return weights

    def _branch_step_pool(self) -> list[int]:
        return sorted(self.config.branch_steps or range(self.config.num_inference_steps - 1))

    # --- one iteration ------------------------------------------------------------------------------------
    def _iteration_rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self.iteration, *key])

    def _sample_prompts(self) -> list[dict]:
        rng = self._iteration_rng(1, self.accelerator.process_index)
        count = self.config.prompts_per_iteration
        index = rng.choice(len(self.train_prompts), size=count, replace=count > len(self.train_prompts))
        return [self.train_prompts[i] for i in index]

    def _trajectory_seed(self, *key: int) -> int:
        return int(np.random.SeedSequence([self.config.seed, self.iteration, self.accelerator.process_index, *key])
                   .generate_state(1)[0])

    def rollout(self, prompts: list[dict], on_finished=None) -> tuple[Rollout, object]:
        """Sample the iteration's rollout for ``prompts``: branched (TempFlow-GRPO) or full trajectories.
        ``on_finished`` receives samples as they finish (see :class:`~tempflow.rollout.RolloutEngine`)."""
        config = self.config
        embeds = self.policy.encode_prompts([r["prompt"] for r in prompts])
        if config.branched:
            k = config.seeds_per_prompt
            prompt_index = [p for p in range(len(prompts)) for _ in range(k)]
            seeds = [self._trajectory_seed(p, s) for p in range(len(prompts)) for s in range(k)]
            steps = self._branch_step_pool()
            if config.num_branch_steps_per_iteration:
                rng = self._iteration_rng(2)
                steps = sorted(rng.choice(steps, size=config.num_branch_steps_per_iteration, replace=False).tolist())
            rollout = self.engine.branched(
                embeds, prompt_index, seeds, config.num_inference_steps, steps, config.num_generations,
                config.child_num_inference_steps, on_finished=on_finished,
            )
            if config.advantage_group == "prompt":  # siblings of all seeds of a prompt, per branch step
                trajectory = rollout.sample_group // len(steps)
                rollout.sample_group = (trajectory // k) * len(steps) + rollout.sample_group % len(steps)
            return rollout, embeds
        g = config.num_generations
        prompt_index = [p for p in range(len(prompts)) for _ in range(g)]
        seeds = [self._trajectory_seed(p, j) for p in range(len(prompts)) for j in range(g)]
        window = None
        if config.sde_window_size:
            first, last = config.sde_window_range or (0, config.num_inference_steps - 1 - config.sde_window_size)
            window = (int(self._iteration_rng(3).integers(first, last + 1)), config.sde_window_size)
        rollout = self.engine.trajectories(embeds, prompt_index, seeds, prompt_index, config.num_inference_steps, window,
                                           on_finished=on_finished)
        return rollout, embeds

    def compute_advantages(self, rollout: Rollout, rewards: torch.Tensor) -> None:
        """Group-relative advantages per scored sample, copied onto the transitions with their step weights."""
        config = self.config
        advantages = group_advantages(rewards, rollout.sample_group, config.scale_rewards, clip=config.adv_clip_max)
        rows = rollout.transitions
        device = rows.log_probs.device
        rows.advantages = advantages.to(device)[rows.sample_index.to(device)]
        rows.weights = self.step_weights.to(device)[rows.step_index.to(device)]
        counted = torch.ones(len(rewards))
        if config.loss_mean_over == "nonzero_advantage_rows":
            counted = informative_samples(rewards, rollout.sample_group).float()
        rows.loss_mask = counted.to(device)[rows.sample_index.to(device)]

    def compute_loss(self, rows: Transitions, embeds) -> tuple[torch.Tensor, dict]:
        """Clipped GRPO loss of a micro-batch of transitions, with the KL term when ``beta > 0``."""
        config = self.config
        device = self.accelerator.device
        latents, sigmas, sigmas_next = rows.latents.to(device), rows.sigmas.to(device), rows.sigmas_next.to(device)
        row_embeds = embeds[rows.prompt_index.to(embeds.tensors["prompt_embeds"].device)]
        velocity = self.policy.velocity(latents, sigmas, row_embeds, model=self.model)
        out = self.step(latents, velocity, sigmas, sigmas_next, next_latents=rows.next_latents)
        loss, stats = clipped_policy_loss(out.log_prob, rows.log_probs, rows.advantages, config.epsilon,
                                          rows.weights * rows.loss_mask)
        stats["policy_loss"] = loss.detach()
        if config.beta > 0:
            with torch.no_grad(), self.policy.reference() as reference:
                reference_velocity = self.policy.velocity(latents, sigmas, row_embeds, model=reference)
                reference_mean = self.step(latents, reference_velocity, sigmas, sigmas_next,
                                           next_latents=rows.next_latents).mean
            kl_std = self.step.kl_std(out, sigmas, sigmas_next, config.kl_normalization)
            kl = (step_kl(out.mean, reference_mean, kl_std) * rows.loss_mask).mean()
            loss = loss + config.beta * kl
            stats["kl"] = kl.detach()
        return loss, stats

    def optimize(self, rollout: Rollout, embeds) -> dict:
        """``num_iterations`` passes over the rollout's transitions in micro-batches; one optimizer step per
        ``gradient_accumulation_steps`` micro-batches (each step's gradient is the mean over its rows; the last
        step of a pass may have fewer micro-batches).

        Under DeepSpeed, accelerate's ``backward`` runs the engine's step (clipping, optimizer step, zeroing) when
        ``sync_gradients`` is set, so it is set on each step's last micro-batch only; the loss is already scaled by
        the exact row share, so DeepSpeed must not divide it by its accumulation steps again (``scale_wrt_gas``).
        The optimizer calls below are then no-ops, and the gradient norm is the one DeepSpeed measured."""
        config = self.config
        rows = rollout.transitions
        deepspeed = self.deepspeed_zero_stage is not None
        backward_kwargs = {"scale_wrt_gas": False} if deepspeed else {}
        stats_sum: dict[str, float] = {}
        count = optimizer_steps = 0
        learning_rate = self.optimizer.param_groups[0]["lr"]  # of the last step taken
        grad_norms, step_log_ratios = [], []  # |log-ratio| of each optimizer step's rows: how far updates moved
        for epoch in range(config.num_iterations):
            order = torch.randperm(len(rows), generator=seeded_generator(config.seed, self.iteration, 4, epoch))
            micro_batches = order.split(config.per_device_train_batch_size)
            for first in range(0, len(micro_batches), config.gradient_accumulation_steps):
                group = micro_batches[first : first + config.gradient_accumulation_steps]
                group_rows = sum(len(mb) for mb in group)
                counted_rows = max(float(sum(rows.loss_mask[mb].sum() for mb in group)), 1.0)  # in the loss mean
                step_log_ratio = 0.0
                for k, index in enumerate(group):
                    sync = k == len(group) - 1
                    self.accelerator.sync_gradients = sync
                    with (contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)), \
                            self.accelerator.autocast():
                        loss, stats = self.compute_loss(rows.select(index), embeds)
                        self.accelerator.backward(loss * len(index) / counted_rows, **backward_kwargs)
                    for key, value in stats.items():
                        stats_sum[key] = stats_sum.get(key, 0.0) + float(value)
                    step_log_ratio += float(stats["abs_log_ratio"]) * len(index) / group_rows
                    count += 1
                step_log_ratios.append(step_log_ratio)
                grad_norm = self.accelerator.clip_grad_norm_(self.trainable, config.max_grad_norm)
                if not torch.isfinite(torch.as_tensor(grad_norm)):
                    if deepspeed and not self.optimizer.step_was_skipped:
                        raise NonFiniteTrainingError(
                            f"DeepSpeed applied an optimizer step with gradient norm {grad_norm} "
                            f"(iteration {self.iteration}); its overflow check must be on (bf16.check_grad_overflow)"
                        )
                    self._skip_step()
                    continue
                self.consecutive_skipped_steps = 0
                grad_norms.append(float(grad_norm))
                learning_rate = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.step(self._ema_inputs())
                optimizer_steps += 1
        metrics = {f"train/{k}": v / max(count, 1) for k, v in stats_sum.items()}
        metrics["train/grad_norm"] = float(np.mean(grad_norms)) if grad_norms else math.nan
        metrics["train/abs_log_ratio_last_step"] = step_log_ratios[-1] if step_log_ratios else math.nan
        metrics["train/optimizer_steps"] = optimizer_steps
        metrics["train/skipped_steps"] = self.skipped_steps
        metrics["train/learning_rate"] = learning_rate
        if self.accelerator.num_processes > 1 and self.deepspeed_zero_stage != 3:  # ZeRO-3 ranks hold shards
            metrics["train/rank_weight_divergence"] = self._rank_weight_divergence()
        return metrics

    def _skip_step(self) -> None:
        """Drop a step whose loss or gradients are not finite; too many in a row mean the run has diverged."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self.consecutive_skipped_steps += 1
        limit = self.config.max_consecutive_skipped_steps
        if self.consecutive_skipped_steps >= limit:
            raise NonFiniteTrainingError(
                f"{limit} optimizer steps in a row had non-finite gradients (iteration {self.iteration}); "
                "lower the learning rate, check the rewards, or resume from an earlier checkpoint"
            )
        warnings.warn(f"skipped an optimizer step with non-finite gradients (iteration {self.iteration})",
                      stacklevel=2)

    def _rank_weight_divergence(self) -> float:
        """Spread across processes of a fingerprint of the trainable weights: 0 while ranks stay in sync."""
        fingerprint = torch.stack([sum(p.detach().double().pow(2).sum() for p in self.trainable)]).float()
        gathered = self.accelerator.gather(fingerprint.to(self.accelerator.device))
        return float(gathered.max() - gathered.min())

    def training_step(self) -> dict:
        """One iteration: rollout, decode and score, advantages, optimizer steps. Returns its metrics."""
        start = time.perf_counter()
        prompts = self._sample_prompts()
        self.policy.transformer.eval()
        scorer = StreamingScorer(self.policy, self.reward, prompts, self.policy.decode_batch_size)
        with self.accelerator.autocast():  # the same precision as the log-prob recomputation, or ratio ≠ 1
            rollout, embeds = self.rollout(prompts, on_finished=scorer.add)
        rewards, components = scorer.results(len(rollout.final_latents))
        self.compute_advantages(rollout, rewards)
        rollout_time = time.perf_counter() - start
        self.policy.transformer.train()
        metrics = self.optimize(rollout, embeds)
        gathered = self.accelerator.gather(rewards.to(self.accelerator.device)).cpu()
        valid = gathered[torch.isfinite(gathered)]
        metrics.update({
            "iteration": self.iteration,
            "reward/mean": float(valid.mean()) if len(valid) else math.nan,
            "reward/std": float(valid.std(unbiased=False)) if len(valid) else math.nan,
            "reward/count": int(len(gathered)),
            "reward/skipped": int(len(gathered) - len(valid)),
            "advantage/abs_mean": float(rollout.transitions.advantages.abs().mean()),
            "rollout/model_evals": rollout.num_model_evals,
            "rollout/seconds": rollout_time,
            "iteration/seconds": time.perf_counter() - start,
            "images_per_second": len(rollout.final_latents) / rollout_time,
        })
        for name, values in components.items():
            metrics[f"reward/{name}"] = self._global_mean(values)
        metrics.update(self._group_diagnostics(rollout, rewards))
        return metrics

    def _group_diagnostics(self, rollout: Rollout, rewards: torch.Tensor) -> dict:
        """How much signal the advantages carry: the share of groups whose rewards are all equal (they teach
        nothing) and the mean within-group reward std, over all processes; for branched rollouts also the share
        per branch step (late steps, past where the layout is decided, often have no spread)."""
        stds, spread = group_spread(rewards, rollout.sample_group)
        metrics = {"groups/zero_spread_fraction": 1 - self._global_mean(spread.float()),
                   "groups/reward_std": self._global_mean(stds)}
        if self.config.branched:
            _, inverse = torch.unique(rollout.sample_group, return_inverse=True)
            group_step = torch.zeros(len(stds), dtype=torch.long).index_copy_(0, inverse, rollout.sample_step)
            for step in self._branch_step_pool():  # every process logs every step, sampled or not (NaN)
                chosen = spread[group_step == step].float()
                metrics[f"groups/zero_spread_fraction/step{step}"] = 1 - self._global_mean(
                    chosen if len(chosen) else torch.tensor([math.nan]))  # NaN: no process branched there
        return metrics

    # --- the loop -----------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run until ``max_steps`` iterations, evaluating, logging and checkpointing on the way. Returns the
        final metrics (also written to ``metrics.json``). SIGTERM or SIGINT ends the run after the current
        iteration with a checkpoint (the summary then has ``interrupted_by`` set)."""
        config = self.config
        self._maybe_resume()
        if self.iteration == 0 and self.eval_prompts:
            self._record_evaluation(self.evaluate("before"))
        bar = tqdm(range(self.iteration, config.max_steps), initial=self.iteration, total=config.max_steps,
                   desc="training", disable=not self.show_progress)
        with self._checkpoint_on_signals():
            for _ in bar:
                metrics = self.training_step()
                self.history.append(metrics)
                self.iteration += 1
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('train/approx_kl', math.nan):.2e}")
                if self.iteration % config.logging_steps == 0:
                    self._log(metrics)
                if self._stop_requested():
                    self.save_checkpoint()
                    return self._write_summary({}, interrupted_by=self._stop_signal)
                if config.eval_steps and self.iteration % config.eval_steps == 0 and self.iteration < config.max_steps:
                    self._record_evaluation(self.evaluate(f"iteration-{self.iteration}"))
                if self.iteration % config.save_steps == 0 or self.iteration == config.max_steps:
                    self.save_checkpoint()
        final = self.evaluate("after") if self.eval_prompts else {}
        if final:
            self._record_evaluation(final)
        self.save_model(config.output_dir)
        return self._write_summary(final)

    @contextlib.contextmanager
    def _checkpoint_on_signals(self):
        """Turn the first SIGTERM/SIGINT into a request to checkpoint and stop; a second one acts as usual."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def request_stop(signum, frame):
            self._stop_signal = signum
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        """Whether any process got a stop signal (all processes must stop at the same iteration)."""
        flag = torch.tensor([0 if self._stop_signal is None else self._stop_signal], device=self.accelerator.device)
        flag = self.accelerator.reduce(flag, reduction="sum") if self.accelerator.num_processes > 1 else flag
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(signal.SIGTERM)
        return bool(flag.item())

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable)
        self.ema.copy_to(self.trainable)
        try:
            yield
        finally:
            self.ema.restore(self.trainable)

    @property
    def show_progress(self) -> bool:
        return not self.config.disable_progress_bar and self.accelerator.is_local_main_process

    @torch.no_grad()
    def evaluate(self, tag: str) -> dict:
        """ODE samples (``eval_num_inference_steps``) of the held-out prompts, scored with the training and
        evaluation rewards; writes a captioned grid ``samples/{tag}.png``. Prompts are sharded over processes."""
        config = self.config
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shard = self.eval_prompts[rank::world]
        self.policy.transformer.eval()
        progress = self.show_progress
        positions = list(range(rank, len(self.eval_prompts), world))  # of the shard's prompts in eval_prompts
        with self._ema_weights(), self.accelerator.autocast():
            images = sample_prompt_set(self.policy, self.engine, shard, positions, config.seed,
                                       config.eval_num_inference_steps, progress=progress)
        rewards, components = score_images(self.reward, images, shard, progress)
        if self.eval_reward is not None:
            components.update(score_images(self.eval_reward, images, shard)[1])
        results = {"iteration": self.iteration, "eval/reward": self._global_mean(rewards)}
        results.update({f"eval/{name}": self._global_mean(values) for name, values in components.items()})
        results.update(self._scores_by_task(components, rank, world))
        if self.accelerator.is_main_process:
            samples_dir = Path(config.output_dir) / "samples"
            samples_dir.mkdir(parents=True, exist_ok=True)
            save_image_grid(images[:16], [r["prompt"] for r in shard[:16]], samples_dir / f"{tag}.png")
            self._log_images(images[:16])
            if tag == "before":
                picked = self._before_after_panel(shard, components)
                self._save_before_images(images[picked], [positions[i] for i in picked], samples_dir)
            elif tag == "after":
                self._save_before_after_grid(images, positions, samples_dir)
        return results

    def _before_after_panel(self, records: list[dict], components: dict[str, torch.Tensor]) -> list[int]:
        """The prompts the before/after grid shows: the untrained model's worst (by the last evaluation reward,
        e.g. ``shapes_strict``, else the first training reward) from each task in turn, so that every task appears
        and a gain can show (the first prompts of a file are often ones the base already gets right)."""
        name = self.config.eval_reward_funcs[-1] if self.config.eval_reward_funcs else next(iter(components))
        return worst_per_task(components[name], task_labels(records) or ["all"] * len(records), count=8)

    def _save_before_images(self, images: torch.Tensor, positions: list[int], samples_dir: Path) -> None:
        """Keep the first evaluation's images on disk, with the positions of their prompts, so that a resumed run
        (on any number of processes) still pairs them with the last evaluation's."""
        save_file({"images": (images * 255).round().to(torch.uint8).contiguous(), "positions": torch.tensor(positions)},
                  samples_dir / BEFORE_IMAGES)

    def _save_before_after_grid(self, images: torch.Tensor, positions: list[int], samples_dir: Path) -> None:
        if not (samples_dir / BEFORE_IMAGES).is_file():
            return
        before = load_file(samples_dir / BEFORE_IMAGES)
        index = {position: i for i, position in enumerate(positions)}
        pairs = [(j, index[p]) for j, p in enumerate(before["positions"].tolist()) if p in index]
        if pairs:
            before_rows, after_rows = zip(*pairs)
            captions = [self.eval_prompts[positions[i]]["prompt"] for i in after_rows]
            save_before_after_grid(before["images"][list(before_rows)].float() / 255, images[list(after_rows)],
                                   captions, samples_dir / "before_after.png")

    def _scores_by_task(self, components: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, float]:
        """``eval_task/{reward}/{task}``: each component's mean over all processes within each task of the
        held-out prompts (see :func:`~tempflow.evaluation.record_task`); empty when no prompt names a task."""
        labels = task_labels(self.eval_prompts)
        if labels is None:
            return {}
        scores = scores_by_task(components, labels[rank::world], list(dict.fromkeys(labels)), self._global_mean)
        return {f"eval_task/{name}/{task}": value for name, by_task in scores.items() for task, value in by_task.items()}

    def _log_images(self, images: torch.Tensor) -> None:
        """Send evaluation samples to the trackers that take images (TensorBoard as NHWC uint8, others as PIL)."""
        from .rewards import to_pil, to_uint8

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"eval/samples": to_uint8(images)}, step=self.iteration, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({"eval/samples": to_pil(images)}, step=self.iteration)

    def _global_mean(self, values: torch.Tensor) -> float:
        """Mean of the finite values over all processes; NaN when there is none (every process must call)."""
        values = values.to(self.accelerator.device)
        finite = torch.isfinite(values)
        totals = torch.stack([torch.where(finite, values, torch.zeros_like(values)).sum(), finite.sum().float()])
        totals = self.accelerator.reduce(totals, reduction="sum")
        return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan

    def _record_evaluation(self, results: dict) -> None:
        self.evaluations.append(results)
        self._log(results)

    def _log(self, metrics: dict) -> None:
        if self.config.report_to != "none":
            self.accelerator.log({k: v for k, v in metrics.items() if k != "iteration"}, step=metrics["iteration"])
        if self.accelerator.is_main_process:
            with open(Path(self.config.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def _write_summary(self, final: dict, interrupted_by: int | None = None) -> dict:
        summary = {
            "iterations": self.iteration,
            "interrupted_by": None if interrupted_by is None else signal.Signals(interrupted_by).name,
            "skipped_steps": self.skipped_steps,
            "evaluations": self.evaluations,
            "final": final,
            "history": self.history,
        }
        if self.accelerator.is_main_process:
            output = Path(self.config.output_dir)
            (output / "metrics.json").write_text(json.dumps(summary, indent=2))
            if self.history:
                plot_reward_curve(self.history, output / "reward_curve.png", self.evaluations)
        self.accelerator.end_training()
        return summary

    # --- weights and checkpoints --------------------------------------------------------------------------
    def save_model(self, directory: str | Path) -> None:
        """Export the trained weights: LoRA in the diffusers format (``pipeline.load_lora_weights(directory)``),
        or the full transformer with ``save_pretrained``. Uses the EMA weights when EMA is on."""
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        whole = contextlib.nullcontext()
        if self.deepspeed_zero_stage == 3:  # every process takes part in gathering the shards
            import deepspeed

            whole = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        with self._ema_weights(), whole:
            if self.accelerator.is_main_process and self.config.use_lora:
                self.policy.save_lora(directory, model)
            elif self.accelerator.is_main_process:
                model.save_pretrained(Path(directory) / "transformer")
        self.accelerator.wait_for_everyone()

    def _save_lora_hook(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            for model in models:
                self.policy.save_lora(output_dir, self.accelerator.unwrap_model(model))
        weights.clear()  # accelerate then writes no full copy of the (frozen) transformer

    def _load_lora_hook(self, models, input_dir) -> None:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        state = self.policy.pipeline_class.lora_state_dict(input_dir)
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
        while models:
            model = self.accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(state), adapter_name="default")
            if result.unexpected_keys:
                raise RuntimeError(f"checkpoint {input_dir} has LoRA keys this model lacks: {result.unexpected_keys[:5]}")
            self.policy.load_block_sparse_gates(input_dir, model)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-{iteration}`` atomically: to a temporary directory, then renamed; keeps the newest
        ``save_total_limit``. A crash mid-write leaves only a temporary directory, which resume ignores."""
        output = Path(self.config.output_dir)
        final = output / f"{CHECKPOINT_PREFIX}{self.iteration}"
        temporary = output / f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}{self.iteration}"
        if self.accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(temporary), **self._deepspeed_checkpoint_kwargs(save=True))
        self.accelerator.wait_for_everyone()  # every process has written its part before the rename
        if self.accelerator.is_main_process:
            state = {"iteration": self.iteration, "skipped_steps": self.skipped_steps,
                     "consecutive_skipped_steps": self.consecutive_skipped_steps, "history": self.history,
                     "evaluations": self.evaluations, "lr_scheduler": self.lr_scheduler.state_dict()}
            (temporary / TRAINER_STATE).write_text(json.dumps(state))
            write_manifest(temporary)
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
            prune_checkpoints(output, self.config.save_total_limit)
        self.accelerator.wait_for_everyone()
        return final

    def _deepspeed_checkpoint_kwargs(self, save: bool) -> dict:
        """A DeepSpeed checkpoint of a LoRA run leaves out the frozen base weights (the adapter is all that
        trains), so loading it must not expect them."""
        if self.deepspeed_zero_stage is None or not self.config.use_lora:
            return {}
        return {"exclude_frozen_parameters": True} if save else {"load_module_strict": False}

    def _maybe_resume(self) -> None:
        target = self.config.resume_from_checkpoint
        if not target:
            return
        chosen = [None, None]  # the checkpoint, or why there is none to resume
        if self.accelerator.is_main_process:  # verifies (reads every file once) and may set damaged ones aside
            try:
                path = checkpoint_to_resume(self.config.output_dir, target)
                chosen[0] = None if path is None else str(path)
            except (ValueError, FileNotFoundError) as err:
                chosen[1] = err
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(chosen)
        if chosen[1] is not None:
            raise chosen[1]
        if chosen[0] is None:
            warnings.warn(f"resume_from_checkpoint: latest found no checkpoint in {self.config.output_dir}; starting "
                          "a fresh run", stacklevel=2)
            return
        path = Path(chosen[0])
        self.accelerator.load_state(str(path), **self._deepspeed_checkpoint_kwargs(save=False))
        state = json.loads((path / TRAINER_STATE).read_text())
        self.iteration = state["iteration"]
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skipped_steps = state["consecutive_skipped_steps"]
        self.history = state["history"]
        self.evaluations = state["evaluations"]
        if "lr_scheduler" in state:  # absent from checkpoints written before schedules existed (constant LR)
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
