"""Video samples: image rewards scored frame by frame, temporal rewards, and the files and frame strips written."""

import math

import pytest
import torch
from PIL import Image

from tempflow.rewards import get_reward
from tempflow.rewards.combined import CombinedReward, RewardError
from tempflow.video import frame_strips, save_video


def _videos():
    """Two videos of 5 frames of 4×6: a still grey one, and one that brightens linearly from black to white."""
    still = torch.full((5, 3, 4, 6), 0.5)
    ramp = torch.linspace(0, 1, 5).view(5, 1, 1, 1).expand(5, 3, 4, 6)
    return torch.stack([still, ramp])


def test_image_rewards_score_every_frame_or_the_chosen_ones_and_average():
    videos, prompts = _videos(), ["still", "ramp"]
    seen = []

    def mean_and_prompt_length(images, prompts, tag):
        seen.append((len(images), list(prompts), list(tag)))
        return [float(image.mean()) + len(p) for image, p in zip(images, prompts)]

    total, parts = CombinedReward({"m": mean_and_prompt_length})(videos, prompts, tag=["a", "b"])
    torch.testing.assert_close(total, torch.tensor([0.5 + 5, 0.5 + 4]))  # the ramp's frames average to 0.5
    assert seen[0] == (10, ["still"] * 5 + ["ramp"] * 5, ["a"] * 5 + ["b"] * 5)  # prompts and metadata per frame
    total, _ = CombinedReward({"m": mean_and_prompt_length}, frames=[0, -1])(videos, prompts, tag=["a", "b"])
    torch.testing.assert_close(total, torch.tensor([0.5 + 5, 0.5 + 4]))
    total, _ = CombinedReward({"m": mean_and_prompt_length}, frames=[-1])(videos, prompts, tag=["a", "b"])
    torch.testing.assert_close(total, torch.tensor([0.5 + 5, 1.0 + 4]))
    with pytest.raises(RewardError, match="frames \\[5\\] out of range for videos of 5 frames"):
        CombinedReward({"m": mean_and_prompt_length}, frames=[5])(videos, prompts, tag=["a", "b"])


def test_a_frame_the_image_reward_cannot_score_leaves_its_video_unscored():
    def none_for_bright(images, prompts):
        return [None if image.mean() > 0.9 else 1.0 for image in images]

    with pytest.warns(UserWarning, match="could not score 1"):
        total, _ = CombinedReward({"r": none_for_bright}, error_policy="skip")(_videos(), ["a", "b"])
    assert total[0] == 1.0 and math.isnan(total[1])


def test_temporal_rewards_see_whole_videos():
    consistency, motion = get_reward("frame_consistency"), get_reward("frame_motion")
    assert consistency(_videos(), ["a", "b"]) == pytest.approx([1.0, 0.75])  # 4 steps of 0.25
    assert motion(_videos(), ["a", "b"]) == pytest.approx([0.0, 0.25])
    total, parts = CombinedReward({"c": consistency, "b": get_reward("brightness")}, weights=[1, 2])(_videos(), ["a", "b"])
    torch.testing.assert_close(total, torch.tensor([1.0 + 1.0, 0.75 + 1.0]))
    with pytest.raises(ValueError, match="frame_consistency scores videos"):
        consistency(torch.rand(2, 3, 4, 4), ["a", "b"])


def test_frame_strips_show_evenly_spaced_frames_side_by_side():
    videos = _videos()
    strips = frame_strips(videos, count=3)
    assert strips.shape == (2, 3, 4, 18)
    torch.testing.assert_close(strips[1, :, :, 6:12], videos[1, 2])  # the middle frame of 0, 2, 4
    images = torch.rand(2, 3, 4, 4)
    assert frame_strips(images) is images


@pytest.mark.parametrize("suffix", ["webp", "gif"])
def test_videos_are_written_as_animations(tmp_path, suffix):
    path = save_video(_videos()[1], tmp_path / f"ramp.{suffix}", fps=8)
    with Image.open(path) as animation:
        assert animation.n_frames == 5 and animation.size == (6, 4)
        animation.seek(4)
        assert animation.convert("RGB").getpixel((0, 0)) == (255, 255, 255)


def test_mp4_needs_the_video_extra_and_says_so(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_imageio(name, *args, **kwargs):
        if name.startswith("imageio"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_imageio)
    with pytest.raises(ImportError, match="tempflow\\[video\\]"):
        save_video(_videos()[0], tmp_path / "still.mp4")
    with pytest.raises(ValueError, match="suffix must be one of"):
        save_video(_videos()[0], tmp_path / "still.avi")
