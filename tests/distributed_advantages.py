"""Run by tests/test_distributed.py under `accelerate launch` with 2 CPU processes: each process turns its own rewards
into advantages through the trainer's `compute_advantages` with `scale_rewards: batch`, and writes them to
`OUT/rank{N}.json`."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from tempflow.trainer_rollout import RolloutMixin

REWARDS = ([0.0, 1.0, 0.5, 2.0], [10.0, 12.0, -3.0, 5.0])  # rank 1's spread dwarfs rank 0's
GROUPS = [0, 0, 1, 1]


class Probe(RolloutMixin):
    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.config = SimpleNamespace(scale_rewards="batch", adv_clip_max=100.0, loss_mean_over="all_rows")
        self.step_weights = torch.ones(1)


def main(out: str) -> None:
    accelerator = Accelerator()
    rank = accelerator.process_index
    rows = SimpleNamespace(log_probs=torch.zeros(4), sample_index=torch.arange(4),
                           step_index=torch.zeros(4, dtype=torch.long), device=torch.device("cpu"))
    rollout = SimpleNamespace(transitions=rows, sample_group=torch.tensor(GROUPS))
    Probe(accelerator).compute_advantages(rollout, torch.tensor(REWARDS[rank]))
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows.advantages.tolist()))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # a process group left to exit teardown can abort there (SIGABRT seen in CI)


if __name__ == "__main__":
    main(sys.argv[1])
