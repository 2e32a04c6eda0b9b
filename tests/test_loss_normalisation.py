"""An optimizer step's gradient is the loss mean over the counted rows (``loss_mean_over``) of every process: two
CPU processes, one holding only masked rows or fewer counted rows than the other, train to the weights of one
process holding the same global batch, which the per-process normalisation the trainer used before misses by far.
On one process nothing changes: each micro-batch's loss times its rows over the step's counted rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from distributed_loss_normalisation import REWARDS, Probe

from tempflow.rollout import Transitions
from tempflow.trainer_optimize import StepTally

PROBE = Path(__file__).parent / "distributed_loss_normalisation.py"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Each case's results from both processes of one launch (DDP over gloo)."""
    out = tmp_path_factory.mktemp("loss-normalisation")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(PROBE), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return {case: [json.loads((out / f"{case}-rank{rank}.json").read_text()) for rank in (0, 1)] for case in REWARDS}


@pytest.mark.parametrize("case", sorted(REWARDS))
def test_two_processes_step_as_one_process_holding_their_global_batch(two_processes, case):
    ranks = two_processes[case]
    steps = [rank["steps"] for rank in ranks]
    assert [len(micro_batches) for micro_batches in steps[0]] == [4, 2]  # the last step accumulates fewer
    accelerator = Accelerator(cpu=True)
    one = Probe(accelerator)
    shares = [one.share(process, case) for process in (0, 1)]
    rows = Transitions.cat([share.transitions for share in shares])
    masks = [share.transitions.loss_mask for share in shares]
    if case == "one_process_all_masked":
        assert masks[0].sum() > 0 and masks[1].sum() == 0
    else:
        assert 0 < masks[0].sum() < masks[1].sum()
    offset = len(shares[0].transitions)  # process 1's rows follow process 0's in the global batch
    one.take_steps(rows, shares[0].embeds, [first + [[i + offset for i in index] for index in second]
                                             for first, second in zip(*steps, strict=True)])
    before = Probe(accelerator)
    before.take_per_process_normalised_steps([before.share(process, case) for process in (0, 1)], steps)

    initial, trained = torch.tensor(Probe(accelerator).weights()), torch.tensor(ranks[0]["weights"])
    assert ranks[1]["weights"] == ranks[0]["weights"]
    assert float((trained - initial).abs().max()) > 0.05  # the steps moved the weights
    torch.testing.assert_close(trained, torch.tensor(one.weights()), atol=1e-5, rtol=0)
    assert float((trained - torch.tensor(before.weights())).abs().max()) > 100 * 1e-5

    for rank in ranks:
        metrics = rank["metrics"]
        assert metrics["train/optimizer_steps"] == 2 and metrics["train/rank_weight_divergence"] == 0.0
        assert metrics["train/counted_row_fraction"] == pytest.approx(float(rows.loss_mask.mean()))


def test_one_process_scales_each_micro_batch_by_its_rows_over_the_counted_rows():
    """The formula of the trainer before the count became global, on one process: the same gradient."""
    probe = Probe(Accelerator(cpu=True))
    share = probe.share(0, "counts_differ")
    rows, embeds = share.transitions, share.embeds
    micro_batches = tuple(torch.arange(len(rows)).split(5))  # 5, 5, 2
    counted_rows = float(rows.loss_mask.sum())
    assert 0 < counted_rows < len(rows)
    for index in micro_batches:
        loss, _ = probe.compute_loss(rows.select(index), embeds)
        (loss * len(index) / counted_rows).backward()
    expected = [p.grad.clone() for p in probe.trainable]
    probe.optimizer.zero_grad(set_to_none=True)
    tally = StepTally(learning_rate=0.0)
    probe._accumulate(rows, embeds, micro_batches, tally)
    for parameter, gradient in zip(probe.trainable, expected, strict=True):
        assert gradient.abs().max() > 0
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-6, atol=0)
    assert tally.counted_rows == counted_rows and tally.rows == len(rows)
