"""Run by tests/test_loss_normalisation.py under `accelerate launch` with 2 CPU processes, and imported by it for the
one-process runs: the trainer's own advantages, loss and optimizer steps (`compute_advantages`, `compute_loss` with
its KL term, `optimize` with `_accumulate` and `_apply_step`) on a linear velocity model and real `Transitions` rows.
For each case each process trains one pass over its share of a global batch, in two optimizer steps of 4 and 2
micro-batches, and writes the weights it ends with, the rows each step took and the metrics to
`OUT/{case}-rank{N}.json`."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from tempflow.policies.base import PromptEmbeds
from tempflow.rollout import Transitions, seeded_noise
from tempflow.sampling import StochasticStep
from tempflow.trainer_optimize import OptimizeMixin, StepTally
from tempflow.trainer_rollout import RolloutMixin

LATENT_SHAPE = (2, 2, 2)
SIGMAS = torch.tensor([0.9, 0.6, 0.3])  # two stochastic steps per sample
GROUP = torch.tensor([0, 0, 0, 1, 1, 1])  # a process's two prompts, three samples each
REWARDS = {  # per case, the rewards of process 0 and process 1; a group of equal rewards leaves the loss mean
    "one_process_all_masked": ([0.0, 1.0, 3.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 4.0, 4.0, 4.0]),
    "counts_differ": ([0.0, 1.0, 3.0, 2.0, 2.0, 2.0], [5.0, 1.0, 0.0, 0.0, 2.0, 1.0]),
}
LEARNING_RATE = 0.5


class LinearVelocity:
    """The policy's one method the loss calls: the velocity as a linear map of the flattened latents."""

    def velocity(self, latents, sigmas, embeds, model, selection=None):
        return model(latents.flatten(1)).view_as(latents)


class Probe(RolloutMixin, OptimizeMixin):
    """What `compute_advantages` and `optimize` read of the trainer, with plain SGD (its step is the gradient itself:
    AdamW's first step would hide the gradient's scale) and noise-aware-like weights of 1.4 and 0.6."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.config = SimpleNamespace(
            algorithm="tempflow_grpo", epsilon=0.2, beta=0.5, kl_normalization="step_variance", scale_rewards="group",
            adv_clip_max=5.0, loss_mean_over="nonzero_advantage_rows", seed=0, num_iterations=1,
            per_device_train_batch_size=2, gradient_accumulation_steps=4, max_grad_norm=1e6,
            ema_update_interval=1, max_consecutive_skipped_steps=3)
        self.policy, self.step = LinearVelocity(), StochasticStep("sde", 0.7)
        self.step_weights = torch.tensor([1.4, 0.6])
        torch.manual_seed(0)
        self.initial = torch.nn.Linear(8, 8)
        model = torch.nn.Linear(8, 8)
        model.load_state_dict(self.initial.state_dict())
        self.trainable = list(model.parameters())
        optimizer = torch.optim.SGD(self.trainable, lr=LEARNING_RATE)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.deepspeed_zero_stage, self.sharded, self.old_policy, self.ema = None, False, None, None
        self.iteration = self.optimizer_steps = self.skipped_steps = self.consecutive_skipped_steps = 0
        self.steps_taken: list[list[list[int]]] = []

    def _accumulate(self, rows, embeds, micro_batches, tally):
        self.steps_taken.append([index.tolist() for index in micro_batches])
        super()._accumulate(rows, embeds, micro_batches, tally)

    def share(self, process: int, case: str) -> SimpleNamespace:
        """Process ``process``'s rows of the global batch: each sample's two steps drawn by the initial model, with
        their advantages, weights and loss mask from the process's rewards, and a reference mean a little away from
        the rollout's (so that the KL term has a gradient from the first step)."""
        samples, steps = len(GROUP), len(SIGMAS) - 1
        sample_index = torch.arange(samples).repeat_interleave(steps)
        step_index = torch.arange(steps).repeat(samples)
        latents = torch.stack([seeded_noise(LATENT_SHAPE, process, int(s), int(t))
                               for s, t in zip(sample_index, step_index)])
        sigmas, sigmas_next = SIGMAS[step_index], SIGMAS[step_index + 1]
        with torch.no_grad():
            velocity = self.policy.velocity(latents, sigmas, None, self.initial)
            drawn = self.step(latents, velocity, sigmas, sigmas_next, generator=torch.Generator().manual_seed(process))
        rows = Transitions(latents=latents, next_latents=drawn.next_latents, log_probs=drawn.log_prob, sigmas=sigmas,
                           sigmas_next=sigmas_next, prompt_index=GROUP[sample_index], sample_index=sample_index,
                           step_index=step_index)
        rows.reference_mean = drawn.mean + 0.1 * torch.stack([seeded_noise(LATENT_SHAPE, 7, process, i)
                                                              for i in range(len(rows))])
        rollout = SimpleNamespace(transitions=rows, sample_group=GROUP)
        self.compute_advantages(rollout, torch.tensor(REWARDS[case][process]))
        return SimpleNamespace(transitions=rows, embeds=PromptEmbeds({"prompt_embeds": torch.zeros(2, 1)}))

    def take_steps(self, rows: Transitions, embeds, steps: list[list[list[int]]]) -> None:
        """One optimizer step per entry of ``steps`` (the row indices of its micro-batches)."""
        tally = StepTally(learning_rate=LEARNING_RATE)
        for micro_batches in steps:
            self._accumulate(rows, embeds, tuple(torch.tensor(index) for index in micro_batches), tally)
            self._apply_step(tally)

    def take_per_process_normalised_steps(self, shares: list[SimpleNamespace], steps: list[list]) -> None:
        """As the trainer stepped before its count was global, on one process standing for ``len(shares)``: each
        share's part of a step (``steps[share][step]``: its micro-batches) normalised by its own counted rows, then
        the parts' gradients averaged, as DDP does."""
        tally = StepTally(learning_rate=LEARNING_RATE)
        for parts in zip(*steps, strict=True):
            for share, micro_batches in zip(shares, parts, strict=True):
                self._accumulate(share.transitions, share.embeds, tuple(torch.tensor(i) for i in micro_batches), tally)
            for parameter in self.trainable:
                parameter.grad /= len(shares)
            self._apply_step(tally)

    def weights(self) -> list[float]:
        return torch.cat([p.detach().flatten() for p in self.trainable]).tolist()


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    for case in REWARDS:
        probe = Probe(accelerator)
        metrics = probe.optimize(probe.share(rank, case))
        result = {"weights": probe.weights(), "steps": probe.steps_taken, "metrics": metrics}
        Path(out, f"{case}-rank{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # a process group left to exit teardown can abort there (SIGABRT seen in CI)


if __name__ == "__main__":
    main(sys.argv[1])
