"""Evaluation sampling and scoring in chunks (for progress bars) give what one pass gives."""

import torch

from tempflow.evaluation import SCORING_CHUNK_SIZE, evaluation_seeds, sample_images, score_images
from tempflow.rewards.combined import CombinedReward
from tempflow.rollout import RolloutEngine


def _tagged(images, prompts, tag, **metadata):
    return [float(image.mean()) + t for image, t in zip(images, tag)]


def test_chunked_sampling_gives_the_same_images_as_one_packed_call(sd3_policy, capsys):
    records = [{"prompt": p} for p in ["a red square", "two blue circles", "a green triangle"] * 2]
    seeds = evaluation_seeds(0, list(range(len(records))))
    one_pass = sample_images(sd3_policy, RolloutEngine(sd3_policy, 0.0, batch_size=64), records, seeds, 3)
    chunked = sample_images(sd3_policy, RolloutEngine(sd3_policy, 0.0, batch_size=4), records, seeds, 3,
                            progress=True)
    torch.testing.assert_close(chunked, one_pass, atol=1e-5, rtol=0)
    assert "sampling" in capsys.readouterr().err


def test_chunked_scoring_keeps_each_image_with_its_own_metadata():
    count = 2 * SCORING_CHUNK_SIZE + 3
    records = [{"prompt": f"p{i}", "tag": i} for i in range(count)]
    images = torch.full((count, 3, 4, 4), 0.5)
    total, components = score_images(CombinedReward({"tagged": _tagged}), images, records, progress=True)
    torch.testing.assert_close(total, torch.arange(count, dtype=total.dtype) + 0.5)
    torch.testing.assert_close(components["tagged"], total)
