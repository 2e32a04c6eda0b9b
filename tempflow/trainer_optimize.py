"""The optimisation stage of an iteration: the clipped GRPO loss (with the KL term) of a micro-batch of rows, and
``num_iterations`` passes over the rollout's rows in micro-batches with gradient accumulation (each optimizer step's
loss a mean over the counted rows of all processes), clipping, skipped non-finite steps, the learning-rate schedule,
the EMA and DeepSpeed's engine step."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import NonFiniteTrainingError
from .loss import clipped_policy_loss
from .rollout import RolloutBatch, Transitions, seeded_generator
from .sampling import StepOutput, step_kl


@dataclass
class StepTally:
    """What the optimizer steps of one iteration add up to, for its metrics."""

    learning_rate: float
    """Of the last step taken."""
    stats_sum: dict[str, float] = field(default_factory=dict)
    micro_batches: int = 0
    optimizer_steps: int = 0
    grad_norms: list[float] = field(default_factory=list)
    step_log_ratios: list[float] = field(default_factory=list)
    """|log-ratio| of each optimizer step's rows: how far the updates moved the policy."""
    counted_rows: float = 0.0
    rows: float = 0.0
    """Rows the loss means counted, and all rows, summed over the optimizer steps and every process."""

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
            self.stats_sum[key] = self.stats_sum.get(key, 0.0) + float(value)
        self.micro_batches += 1


class OptimizeMixin:
    """Loss and optimizer steps, for :class:`~tempflow.trainer.TempFlowGRPOTrainer`."""

    def rescore(self, rows: Transitions, embeds, model: torch.nn.Module) -> StepOutput:
        """The rows' stochastic steps under ``model``'s velocity: the step the rollout drew them with, applied to
        their recorded next latents (log-probs and means to compare with the rollout's or the reference's), with
        the key tiles or tokens the rollout's velocity selected (block-sparse attention, token pruning)."""
        device = self.accelerator.device
        latents, sigmas = rows.latents.to(device), rows.sigmas.to(device)
        row_embeds = embeds[rows.prompt_index.to(embeds.tensors["prompt_embeds"].device)]
        selection = None if rows.selection is None else rows.selection.to(device)  # the rollout's, replayed
        velocity = self.policy.velocity(latents, sigmas, row_embeds, model=model, selection=selection)
        return self.step(latents, velocity, sigmas, rows.sigmas_next.to(device), next_latents=rows.next_latents)

    def compute_loss(self, rows: Transitions, embeds) -> tuple[torch.Tensor, dict]:
        """Clipped GRPO loss of a micro-batch of transitions, with the KL term when ``beta > 0`` (DiffusionNFT's
        rows: :meth:`~tempflow.trainer_nft.DiffusionNFTMixin.nft_loss`)."""
        config = self.config
        if config.algorithm == "diffusion_nft":
            return self.nft_loss(rows, embeds)
        out = self.rescore(rows, embeds, self.model)
        loss, stats = clipped_policy_loss(out.log_prob, rows.log_probs, rows.advantages, config.epsilon,
                                          rows.weights * rows.loss_mask)
        stats["policy_loss"] = loss.detach()
        if config.beta > 0:
            device = self.accelerator.device
            kl_std = self.step.kl_std(out, rows.sigmas.to(device), rows.sigmas_next.to(device), config.kl_normalization)
            kl = (step_kl(out.mean, rows.reference_mean.to(device), kl_std) * rows.loss_mask).mean()
            loss = loss + config.beta * kl
            stats["kl"] = kl.detach()
        return loss, stats

    def optimize(self, batch: RolloutBatch) -> dict:
        """``num_iterations`` passes over the rollout's rows in micro-batches; one optimizer step per
        ``gradient_accumulation_steps`` micro-batches (each step's gradient is the mean over its counted rows on
        every process; the last step of a pass may have fewer micro-batches)."""
        config = self.config
        rows, embeds = batch.transitions, batch.embeds
        tally = StepTally(learning_rate=self.optimizer.param_groups[0]["lr"])
        for epoch in range(config.num_iterations):
            order = torch.randperm(len(rows), generator=seeded_generator(config.seed, self.iteration, 4, epoch))
            micro_batches = order.split(config.per_device_train_batch_size)
            for first in range(0, len(micro_batches), config.gradient_accumulation_steps):
                self._accumulate(rows, embeds, micro_batches[first : first + config.gradient_accumulation_steps], tally)
                self._apply_step(tally)
        metrics = self._optimization_metrics(tally)
        if self.old_policy is not None:
            metrics.update(self._update_old_policy())
        return metrics

    def _accumulate(self, rows: Transitions, embeds, micro_batches: tuple[torch.Tensor, ...], tally: StepTally) -> None:
        """The gradient of one optimizer step: the loss mean over the step's counted rows of every process,
        micro-batch by micro-batch. Each process multiplies its rows' summed loss by the number of processes whose
        gradients the backend averages and divides it by the counted rows of all processes, so once the gradients are
        averaged the step's gradient is the sum over every counted row divided by their count, whatever the layout of
        the global batch (a process whose prompts had no reward spread does not shrink the step).

        Under DeepSpeed, accelerate's ``backward`` runs the engine's step (clipping, optimizer step, zeroing) when
        ``sync_gradients`` is set, so it is set on the step's last micro-batch only; the loss is already scaled by
        the exact row share, so DeepSpeed must not divide it by its accumulation steps again (``scale_wrt_gas``)."""
        backward_kwargs = {"scale_wrt_gas": False} if self.deepspeed_zero_stage is not None else {}
        step_rows = sum(len(index) for index in micro_batches)
        counted_rows = max(self._global_counted_rows(rows, micro_batches, tally), 1.0)
        averaged_processes = self._gradient_averaging_processes()
        step_log_ratio = 0.0
        for k, index in enumerate(micro_batches):
            sync = k == len(micro_batches) - 1
            self.accelerator.sync_gradients = sync
            with (contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)), \
                    self.accelerator.autocast():
                loss, stats = self.compute_loss(rows.select(index), embeds)
                self.accelerator.backward(loss * len(index) * averaged_processes / counted_rows, **backward_kwargs)
            tally.add(stats)
            if "abs_log_ratio" in stats:  # GRPO's ratio (DiffusionNFT has none)
                step_log_ratio += float(stats["abs_log_ratio"]) * len(index) / step_rows
        tally.step_log_ratios.append(step_log_ratio)

    def _global_counted_rows(self, rows: Transitions, micro_batches: tuple[torch.Tensor, ...], tally: StepTally) -> float:
        """The optimizer step's counted rows summed over every process: one all-reduce, which every process joins
        once per step (also one whose rows are all masked), so all take the step with the same count."""
        local = [float(sum(rows.loss_mask[index].sum() for index in micro_batches)),
                 float(sum(len(index) for index in micro_batches))]
        local = torch.tensor(local, dtype=torch.float64, device=self.accelerator.device)
        counted_rows, step_rows = self.accelerator.reduce(local, "sum").tolist()
        tally.counted_rows += counted_rows
        tally.rows += step_rows
        return counted_rows

    def _gradient_averaging_processes(self) -> int:
        """How many processes' gradients the backend averages: all of them (DDP's all-reduce, DeepSpeed's reduction
        and FSDP2's reduce-scatter divide by the process count), or 1 under a DeepSpeed config that sums them
        (``gradient_allreduce_op: sum``)."""
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if wrapped is not None and not wrapped.engine.gradient_average:
            return 1
        return self.accelerator.num_processes

    def _apply_step(self, tally: StepTally) -> None:
        """Clip and take the optimizer step (under DeepSpeed the engine took it in ``backward``: the calls here are
        no-ops and the gradient norm is the one it measured), or skip a step with non-finite gradients."""
        grad_norm = self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            if self.deepspeed_zero_stage is not None and not self.optimizer.step_was_skipped:
                raise NonFiniteTrainingError(
                    f"DeepSpeed applied an optimizer step with gradient norm {grad_norm} "
                    f"(iteration {self.iteration}); its overflow check must be on (bf16.check_grad_overflow)"
                )
            self._skip_step()
            return
        self.consecutive_skipped_steps = 0
        tally.grad_norms.append(float(grad_norm))
        tally.learning_rate = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        self._update_ema()
        tally.optimizer_steps += 1

    def _update_ema(self) -> None:
        """As the official scripts' EMAModuleWrapper: after optimizer step n, when n + 1 is a multiple of
        ``ema_update_interval``, with decay min(ema_decay, (1 + n)/(10 + n)) (diffusers' EMAModel warmup, counted in
        optimizer steps rather than in EMA updates)."""
        n = self.optimizer_steps
        if self.ema is None or (n + 1) % self.config.ema_update_interval:
            return
        self.ema.optimization_step = n  # EMAModel.step() adds 1, and its decay is (1 + step)/(10 + step), step = n
        self.ema.step(self._ema_inputs())

    def _optimization_metrics(self, tally: StepTally) -> dict:
        metrics = {f"train/{k}": v / max(tally.micro_batches, 1) for k, v in tally.stats_sum.items()}
        metrics["train/grad_norm"] = float(np.mean(tally.grad_norms)) if tally.grad_norms else math.nan
        metrics["train/abs_log_ratio_last_step"] = tally.step_log_ratios[-1] if tally.step_log_ratios else math.nan
        metrics["train/counted_row_fraction"] = tally.counted_rows / tally.rows if tally.rows else math.nan
        metrics["train/optimizer_steps"] = tally.optimizer_steps
        metrics["train/skipped_steps"] = self.skipped_steps
        metrics["train/learning_rate"] = tally.learning_rate
        if self.accelerator.num_processes > 1 and self.deepspeed_zero_stage != 3 and not self.sharded:  # shards
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
                f"lower the learning rate, check the rewards, or resume from {self._last_checkpoint_named()}"
            )
        prompts = "; ".join(repr(r["prompt"]) for r in getattr(self, "iteration_prompts", [])[:3])
        warnings.warn(f"skipped an optimizer step with non-finite gradients (iteration {self.iteration}; its "
                      f"rollout's prompts: {prompts or 'unknown'})", stacklevel=2)

    def _last_checkpoint_named(self) -> str:
        from .run_directory import complete_checkpoints

        checkpoints = complete_checkpoints(self.config.output_dir)
        return f"the last good checkpoint, {checkpoints[-1]}" if checkpoints else "the start (no checkpoint yet)"

    def _rank_weight_divergence(self) -> float:
        """Spread across processes of a fingerprint of the trainable weights: 0 while ranks stay in sync."""
        fingerprint = torch.stack([sum(p.detach().double().pow(2).sum() for p in self.trainable)]).float()
        gathered = self.accelerator.gather(fingerprint.to(self.accelerator.device))
        return float(gathered.max() - gathered.min())
