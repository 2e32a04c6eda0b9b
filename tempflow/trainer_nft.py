"""DiffusionNFT in the trainer (``algorithm: diffusion_nft``; the loss and the old policy are in
:mod:`tempflow.nft`): ODE rollouts drawn by the old policy, training rows of (final sample, timestep), the loss of
a micro-batch of them, and the old policy's soft update after each iteration's optimizer steps."""

from __future__ import annotations

import numpy as np
import torch

from .nft import ForwardRows, OldPolicy, diffusion_nft_loss, old_policy_decay, optimality_probability
from .rollout import RolloutBatch, seeded_noise

_NFT_TIMESTEPS, _NFT_NOISE = 5, 6  # keys of the iteration's random streams


class DiffusionNFTMixin:
    """DiffusionNFT's rollout, rows, loss and old-policy update, for :class:`~tempflow.trainer.TempFlowGRPOTrainer`."""

    def _build_old_policy(self) -> None:
        """θ_old, a copy of the trainable weights at the start (checkpointed with the run); None for GRPO."""
        self.old_policy = None
        if self.config.algorithm != "diffusion_nft":
            return
        if self.deepspeed_zero_stage == 3:
            raise ValueError("diffusion_nft is not supported with DeepSpeed ZeRO-3: its old policy swaps whole "
                             "weights in for the rollout, which ZeRO-3 shards; use ZeRO-2 or DDP")
        self.old_policy = OldPolicy(self.trainable, swap_by_copy=self.sharded)  # checkpointed by trainer_checkpoints

    def _nft_rollout(self, embeds, num_prompts: int, on_finished) -> RolloutBatch:
        """G ODE samples per prompt from the old policy (the official scripts sample with their "old" adapter),
        grouped by prompt, with their training rows."""
        config = self.config
        g = config.num_generations
        prompt_index = [p for p in range(num_prompts) for _ in range(g)]
        seeds = [self._trajectory_seed(p, j) for p in range(num_prompts) for j in range(g)]
        with self.old_policy.swapped_in():
            batch = self.engine.samples(embeds, prompt_index, seeds, prompt_index, config.num_inference_steps,
                                        on_finished=on_finished)
        batch.transitions = self._forward_rows(batch)
        return batch

    def _forward_rows(self, batch: RolloutBatch) -> ForwardRows:
        """Every sample at ``trained_timesteps`` distinct timesteps of the rollout's schedule (σ_0 … σ_{N−1}),
        drawn per sample, each row with its own noise seed (fixed for the iteration, so resumed runs repeat it)."""
        config = self.config
        num_samples, k = len(batch.final_latents), config.trained_timesteps
        rng = self._iteration_rng(_NFT_TIMESTEPS, self.accelerator.process_index)
        steps = torch.from_numpy(np.stack([rng.permutation(config.num_inference_steps)[:k]
                                           for _ in range(num_samples)]).reshape(-1))
        sample_index = torch.arange(num_samples).repeat_interleave(k)
        return ForwardRows(
            clean_latents=batch.final_latents.cpu()[sample_index],
            sigmas=self.sigmas[steps].float(),
            noise_seed=torch.as_tensor([self._trajectory_seed(_NFT_NOISE, int(s), int(t))
                                        for s, t in zip(sample_index, steps)], dtype=torch.long),
            prompt_index=batch.sample_prompt_index[sample_index],
            sample_index=sample_index,
            step_index=steps,
        )

    def nft_loss(self, rows: ForwardRows, embeds) -> tuple[torch.Tensor, dict]:
        """DiffusionNFT loss of a micro-batch of rows (mean over them), with the velocity KL to the reference
        policy, beta·mean((v_θ − v_ref)²), when ``beta > 0`` (the official train.beta)."""
        config, device = self.config, self.accelerator.device
        clean = rows.clean_latents.to(device)
        sigmas = rows.sigmas.to(device)
        noise = torch.stack([seeded_noise(tuple(clean.shape[1:]), int(s)) for s in rows.noise_seed]).to(device)
        t = sigmas.view(-1, *([1] * (clean.ndim - 1)))
        noised = (1 - t) * clean + t * noise
        row_embeds = embeds[rows.prompt_index.to(embeds.tensors["prompt_embeds"].device)]
        with torch.no_grad(), self.old_policy.swapped_in():
            old_velocity = self.policy.velocity(noised, sigmas, row_embeds)
        velocity = self.policy.velocity(noised, sigmas, row_embeds, model=self.model)
        optimality = optimality_probability(rows.advantages.to(device), config.adv_clip_max)
        per_sample, stats = diffusion_nft_loss(velocity, old_velocity, clean, noised, sigmas, optimality,
                                               config.nft_beta, config.adv_clip_max)
        counted = (rows.weights * rows.loss_mask).to(device)
        loss = (per_sample * counted).mean()
        stats["policy_loss"] = loss.detach()
        if config.beta > 0:
            with torch.no_grad(), self.policy.reference() as reference:
                reference_velocity = self.policy.velocity(noised, sigmas, row_embeds, model=reference)
            squared = ((velocity - reference_velocity) ** 2).mean(dim=tuple(range(1, velocity.ndim)))
            kl = (squared * rows.loss_mask.to(device)).mean()
            loss = loss + config.beta * kl
            stats["kl"] = kl.detach()
        return loss, stats

    def _update_old_policy(self) -> dict:
        """θ_old ← d·θ_old + (1 − d)·θ after the iteration's optimizer steps, d from ``old_policy_decay``."""
        decay = old_policy_decay(self.optimizer_steps, *self.config.old_policy_decay)
        self.old_policy.soft_update(decay)
        return {"nft/old_policy_decay": decay}
