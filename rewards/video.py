"""Rewards on videos ``[B, F, 3, H, W]``: any image reward scored frame by frame (the mean over every frame or over
chosen ones), and temporal rewards that see the whole video.

A reward that takes whole videos says so with a ``video_reward = True`` attribute (on the function or the class);
:class:`~tempflow.rewards.combined.CombinedReward` hands every other reward the frames as images, through
:func:`score_frames`.
"""

from __future__ import annotations

import math

import torch

from . import register_reward


def check_videos(videos: torch.Tensor, reward: str) -> None:
    if videos.ndim != 5:
        raise ValueError(f"{reward} scores videos [B, F, 3, H, W]; got a tensor of shape {list(videos.shape)} "
                         "(an image model's samples)")


def select_frames(videos: torch.Tensor, frames: list[int] | None = None) -> torch.Tensor:
    """``videos[:, frames]`` (negative indices count from the end); every frame when ``frames`` is None."""
    if frames is None:
        return videos
    count = videos.shape[1]
    bad = [f for f in frames if not -count <= f < count]
    if bad:
        raise ValueError(f"reward frames {bad} out of range for videos of {count} frames")
    return videos[:, [f % count for f in frames]]


def score_frames(reward, videos: torch.Tensor, prompts: list[str], frames: list[int] | None = None,
                 **metadata) -> list[float | None]:
    """An image ``reward`` on each chosen frame of each video, averaged per video; a video with a frame the reward
    could not score (None or NaN) gets None."""
    chosen = select_frames(videos, frames)
    per_video = chosen.shape[1]
    repeat = lambda values: [v for v in values for _ in range(per_video)]  # noqa: E731
    scores = list(reward(chosen.flatten(0, 1), repeat(prompts), **{k: repeat(v) for k, v in metadata.items()}))
    if len(scores) != len(chosen) * per_video:
        raise ValueError(f"returned {len(scores)} scores for {len(chosen) * per_video} frames")
    table = torch.tensor([math.nan if s is None else float(s) for s in scores]).view(len(chosen), per_video)
    return [None if math.isnan(m) else m for m in table.mean(dim=1).tolist()]


def _frame_differences(videos: torch.Tensor) -> torch.Tensor:
    """Mean absolute pixel change between consecutive frames, per video ``[B]`` (0 for one-frame videos)."""
    if videos.shape[1] < 2:
        return torch.zeros(len(videos))
    return (videos[:, 1:] - videos[:, :-1]).float().abs().mean(dim=(1, 2, 3, 4))


@register_reward("frame_consistency")
def frame_consistency(videos: torch.Tensor, prompts: list[str], **metadata) -> list[float]:
    """Temporal consistency: 1 − the mean absolute pixel change between consecutive frames (pixels in [0, 1]), so 1
    for a still video. Alone it rewards stillness: weigh it against a per-frame quality reward or ``frame_motion``."""
    check_videos(videos, "frame_consistency")
    return (1 - _frame_differences(videos)).tolist()


@register_reward("frame_motion")
def frame_motion(videos: torch.Tensor, prompts: list[str], **metadata) -> list[float]:
    """The mean absolute pixel change between consecutive frames: how much the video moves (0 for a still one)."""
    check_videos(videos, "frame_motion")
    return _frame_differences(videos).tolist()


frame_consistency.video_reward = True
frame_motion.video_reward = True
