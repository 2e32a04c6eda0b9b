"""The rollout stage of an iteration: which prompts, seeds and branch steps it samples, the rollout itself, the
group-relative advantages and noise-aware weights of its rows, and how much signal its groups carried."""

from __future__ import annotations

import math

import numpy as np
import torch

from .advantages import (
    group_advantages,
    group_spread,
    informative_child_slots,
    informative_samples,
    pooled_std,
)
from .loss import noise_aware_weights
from .rollout import RolloutBatch


class RolloutMixin:
    """Rollout → rewards → advantages, for :class:`~tempflow.trainer.TempFlowGRPOTrainer`."""

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

    def _iteration_rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self.iteration, *key])

    def _sample_prompts(self) -> list[dict]:
        """This process's ``prompts_per_iteration`` prompts: one draw for every process (the same on each, from the
        seed and iteration) split in rank order, so no two processes train on the same prompt while the prompt set
        has enough; a set smaller than the draw is cycled through in shuffled rounds. Sets :attr:`prompt_index`."""
        count, world, rank = self.config.prompts_per_iteration, self.accelerator.num_processes, self.accelerator.process_index
        rng, size, total = self._iteration_rng(1, 0), len(self.train_prompts), count * world
        if total <= size:
            drawn = rng.choice(size, size=total, replace=False)
        else:
            drawn = np.concatenate([rng.permutation(size) for _ in range(-(-total // size))])[:total]
        self.prompt_index = drawn[rank * count : (rank + 1) * count]
        return [self.train_prompts[i] for i in self.prompt_index]

    def _distinct_prompts(self) -> int:
        """How many distinct prompts all processes drew this iteration."""
        index = torch.as_tensor(self.prompt_index, device=self.accelerator.device)
        return len(torch.unique(self.accelerator.gather(index).cpu()))

    def _trajectory_seed(self, *key: int) -> int:
        return int(np.random.SeedSequence([self.config.seed, self.iteration, self.accelerator.process_index, *key])
                   .generate_state(1)[0])

    def rollout(self, prompts: list[dict], on_finished=None) -> RolloutBatch:
        """Sample the iteration's rollout for ``prompts``: branched (TempFlow-GRPO), full trajectories (Flow-GRPO,
        with the reference policy's step means when the loss has a KL term) or DiffusionNFT's ODE samples. ``on_finished`` receives samples as they
        finish (see :class:`~tempflow.rollout.RolloutEngine`)."""
        config = self.config
        embeds = self.policy.encode_records(prompts)
        if config.algorithm == "diffusion_nft":
            return self._nft_rollout(embeds, len(prompts), on_finished)
        if config.branched:
            k = config.seeds_per_prompt
            prompt_index = [p for p in range(len(prompts)) for _ in range(k)]
            seeds = [self._trajectory_seed(p, s) for p in range(len(prompts)) for s in range(k)]
            steps = self._branch_step_pool()
            if config.num_branch_steps_per_iteration:
                rng = self._iteration_rng(2)
                steps = sorted(rng.choice(steps, size=config.num_branch_steps_per_iteration, replace=False).tolist())
            batch = self.engine.branched(
                embeds, prompt_index, seeds, config.num_inference_steps, steps, config.num_generations,
                config.child_num_inference_steps, on_finished=on_finished, group_by=config.advantage_group,
            )
        else:
            batch = self._trajectories(embeds, len(prompts), on_finished)
        if config.beta > 0:
            self._reference_means(batch)
        return batch

    def _trajectories(self, embeds, num_prompts: int, on_finished) -> RolloutBatch:
        """Flow-GRPO: G SDE trajectories per prompt (in a window drawn per iteration when windowed), grouped by
        prompt."""
        config = self.config
        g = config.num_generations
        prompt_index = [p for p in range(num_prompts) for _ in range(g)]
        seeds = [self._trajectory_seed(p, j) for p in range(num_prompts) for j in range(g)]
        window = None
        if config.sde_window_size:
            first, last = config.sde_window_range or (0, config.num_inference_steps - 1 - config.sde_window_size)
            window = (int(self._iteration_rng(3).integers(first, last + 1)), config.sde_window_size)
        return self.engine.trajectories(embeds, prompt_index, seeds, prompt_index, config.num_inference_steps, window,
                                        on_finished=on_finished)

    @torch.no_grad()
    def _reference_means(self, batch: RolloutBatch) -> None:
        """The reference policy's step mean of every row, once per rollout (not per micro-batch and inner epoch):
        it does not change while the policy trains."""
        rows = batch.transitions
        with self.policy.reference() as reference:
            rows.reference_mean = torch.cat([
                self.rescore(rows.select(index), batch.embeds, reference).mean
                for index in torch.arange(len(rows)).split(self.config.per_device_train_batch_size)
            ])

    def compute_advantages(self, rollout: RolloutBatch, rewards: torch.Tensor) -> None:
        """Group-relative advantages per scored sample, copied onto the transitions with their step weights."""
        config = self.config
        batch_std = None
        if config.scale_rewards == "batch":  # the std of the whole batch: every process's rewards
            batch_std = pooled_std(rewards, self._gather if self.accelerator.num_processes > 1 else None)
        advantages = group_advantages(rewards, rollout.sample_group, config.scale_rewards, clip=config.adv_clip_max,
                                      batch_std=batch_std)
        rows = rollout.transitions
        device = rows.device
        rows.advantages = advantages.to(device)[rows.sample_index.to(device)]
        rows.weights = self.step_weights.to(device)[rows.step_index.to(device)]
        counted = torch.ones(len(rewards))
        if config.loss_mean_over == "nonzero_advantage_rows":
            counted = informative_samples(rewards, rollout.sample_group).float()
        elif config.loss_mean_over == "nonzero_advantage_child_slots":
            counted = informative_child_slots(rewards, rollout.sample_group, rollout.sample_trajectory).float()
        rows.loss_mask = counted.to(device)[rows.sample_index.to(device)]

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of every process, concatenated, on the CPU."""
        return self.accelerator.gather(values.to(self.accelerator.device)).cpu()

    def _group_diagnostics(self, rollout: RolloutBatch, rewards: torch.Tensor) -> dict:
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
