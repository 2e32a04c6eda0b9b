"""Streaming scoring during the rollout gives exactly the rewards of scoring the finished rollout at once."""

import pytest
import torch

from tempflow.evaluation import score_images
from tempflow.rewards.combined import CombinedReward, RewardError
from tempflow.rollout import RolloutEngine
from tempflow.scoring import StreamingScorer

RECORDS = [{"prompt": "a red square", "tag": 0}, {"prompt": "two blue circles", "tag": 1}]


def _tagged(images, prompts, tag, **metadata):
    """Brightness plus the prompt's tag: checks that every image is scored with its own prompt's metadata."""
    return [float(image.mean()) + t for image, t in zip(images, tag)]


def test_streamed_rewards_equal_rewards_of_the_whole_rollout(sd3_policy):
    reward = CombinedReward({"tagged": _tagged})
    engine = RolloutEngine(sd3_policy, noise_level=0.7, batch_size=5)
    embeds = sd3_policy.encode_prompts([r["prompt"] for r in RECORDS])
    scorer = StreamingScorer(sd3_policy, reward, RECORDS, chunk_size=4)
    calls = []

    def on_finished(sample_index, prompt_index, latents):
        calls.extend(sample_index)
        scorer.add(sample_index, prompt_index, latents)

    rollout = engine.branched(embeds, [0, 1], [3, 4], 4, [0, 1, 2], 3, on_finished=on_finished)
    streamed, components = scorer.results(len(rollout.final_latents))
    assert sorted(calls) == list(range(len(rollout.final_latents)))

    records = [RECORDS[i] for i in rollout.sample_prompt_index.tolist()]
    expected, _ = score_images(reward, sd3_policy.decode(rollout.final_latents), records)
    torch.testing.assert_close(streamed, expected)
    torch.testing.assert_close(components["tagged"], expected)


def test_streamed_reward_errors_surface_with_the_name(sd3_policy):
    def broken(images, prompts, **metadata):
        raise RuntimeError("scorer crashed")

    scorer = StreamingScorer(sd3_policy, CombinedReward({"broken": broken}), RECORDS, chunk_size=2)
    scorer.add([0, 1], [0, 1], torch.randn(2, *sd3_policy.latent_shape))
    with pytest.raises(RewardError, match="'broken' raised RuntimeError"):
        scorer.results(2)
