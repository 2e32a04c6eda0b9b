"""The same sparsity in rollout and recomputation: what block-sparse attention and token pruning selected for each
training row's velocity is stored with the row and replayed when the row is scored again (loss, KL reference),
so the first inner step is on-policy and later ones score the same sparse function that acted."""

import pytest
import torch
from conftest import TINY_WAN_FRAMES, TINY_WAN_SIZE

from tempflow.config import TempFlowGRPOConfig
from tempflow.trainer import TempFlowGRPOTrainer

PROMPTS = [{"prompt": p} for p in ("a red square", "two blue circles", "a green triangle")]
SPARSE = dict(block_sparse_density=0.5, block_sparse_kernel="torch")
PRUNED = dict(token_pruning_layers=[0], token_pruning_keep_ratio=0.5)
CASES = {
    "sd3-block-sparse": ("sd3", dict(guidance_scale=4.5, block_sparse_tile=[2, 2], **SPARSE)),
    "sd3-pruned": ("sd3", dict(guidance_scale=4.5, **PRUNED)),
    "flux-block-sparse": ("flux", dict(guidance_scale=3.5, block_sparse_tile=[2, 2], **SPARSE)),
    "flux-pruned": ("flux", dict(guidance_scale=3.5, **PRUNED)),
    "wan-block-sparse": ("wan", dict(guidance_scale=5.0, resolution=TINY_WAN_SIZE, num_frames=TINY_WAN_FRAMES,
                                     block_sparse_tile=[1, 2, 2], **SPARSE)),
    "wan-pruned": ("wan", dict(guidance_scale=5.0, resolution=TINY_WAN_SIZE, num_frames=TINY_WAN_FRAMES, **PRUNED)),
}


def _trainer(model_dir, output_dir, **settings):
    values = dict(
        output_dir=str(output_dir), model_name_or_path=model_dir, resolution=64, num_inference_steps=3,
        eval_num_inference_steps=3, num_generations=2, prompts_per_iteration=2, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, lora_r=4, lora_alpha=8, learning_rate=1e-2, epsilon=0.2, max_steps=1,
        reward_funcs=["brightness"], train_prompts="unused", eval_prompts=None, disable_progress_bar=True,
        max_sequence_length=16, attention_backend="sdpa", beta=0.1,
    )
    values.update(settings)
    return TempFlowGRPOTrainer(TempFlowGRPOConfig(**values), train_prompts=PROMPTS)


@pytest.mark.parametrize("case", list(CASES))
def test_rows_carry_their_selection_and_recomputation_replays_it(case, request, tmp_path):
    family, settings = CASES[case]
    trainer = _trainer(request.getfixturevalue(f"tiny_{family}_dir"), tmp_path, **settings)
    rollout = trainer.rollout(trainer._sample_prompts())
    rows = rollout.transitions
    passes = 1 if family == "flux" else 2  # FLUX's guidance is an embedding; the others run CFG's two passes
    assert rows.selection is not None and rows.selection.shape[:2] == (len(rows), passes)
    assert rows.selection.device.type == "cpu"

    with torch.no_grad():
        replayed = trainer.rescore(rows, rollout.embeds, trainer.model)
    torch.testing.assert_close(replayed.log_prob, rows.log_probs, atol=1e-5, rtol=0)  # ratio 1 at the first step
    torch.testing.assert_close(trainer.policy.last_selection.cpu(), rows.selection, rtol=0, atol=0)

    # the stored selection is what the score depends on, row by row: another velocity call's changes it (siblings
    # share their branch point's call: the next branch step's rows)
    swapped = rows.select(torch.arange(len(rows)))
    swapped.selection = rows.selection.roll(trainer.config.num_generations, dims=0)
    with torch.no_grad():
        misattributed = trainer.rescore(swapped, rollout.embeds, trainer.model)
    replay_error = (replayed.log_prob - rows.log_probs).abs().max()
    assert (misattributed.log_prob - rows.log_probs).abs().max() > max(1e-6, 100 * replay_error)


@pytest.mark.parametrize("case", ["sd3-block-sparse", "flux-pruned"])
def test_after_an_update_recomputation_keeps_the_rollouts_selection(case, request, tmp_path):
    """Once the weights move, selecting afresh would pick other tiles/tokens for some rows; the replay keeps the
    ones the rollout acted with."""
    family, settings = CASES[case]
    trainer = _trainer(request.getfixturevalue(f"tiny_{family}_dir"), tmp_path, **settings)
    rollout = trainer.rollout(trainer._sample_prompts())
    rows = rollout.transitions
    with torch.no_grad():
        for name, param in trainer.policy.transformer.named_parameters():
            if "lora_B" in name:
                param.add_(0.5 * torch.randn_like(param))  # a large update
        trainer.rescore(rows, rollout.embeds, trainer.model)
        assert torch.equal(trainer.policy.last_selection.cpu(), rows.selection)
        fresh_rows = rows.select(torch.arange(len(rows)))
        fresh_rows.selection = None
        trainer.rescore(fresh_rows, rollout.embeds, trainer.model)
    assert not torch.equal(trainer.policy.last_selection.cpu(), rows.selection)  # afresh, it would differ


def test_a_dense_model_records_nothing(tiny_sd3_dir, tmp_path):
    trainer = _trainer(tiny_sd3_dir, tmp_path, guidance_scale=4.5)
    rollout = trainer.rollout(trainer._sample_prompts())
    assert rollout.transitions.selection is None and trainer.policy.last_selection is None
