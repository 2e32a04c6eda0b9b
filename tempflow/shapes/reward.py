"""The ShapesWorld rewards, registered as ``shapes`` (partial credit, for training) and ``shapes_strict``
(GenEval-style 0/1, for evaluation): they run :mod:`tempflow.shapes.detector` on each image against the
``spec`` metadata that every line of the ShapesWorld prompt files carries."""

from __future__ import annotations

import json

import torch

from tempflow.rewards import register_reward, to_uint8

from .detector import partial_score, strict_score


def _score_batch(score, images: torch.Tensor, spec) -> list[float]:
    if spec is None:
        raise ValueError(
            "the ShapesWorld reward needs the `spec` metadata of the ShapesWorld prompt files "
            "(use the prompt sets `shapes:train` / `shapes:eval`, or JSONL lines with a `spec` key)"
        )
    if len(spec) != len(images):
        raise ValueError(f"got {len(images)} images but {len(spec)} specs")
    specs = [json.loads(item) if isinstance(item, str) else item for item in spec]
    return [float(score(array, item)) for array, item in zip(to_uint8(images), specs)]


@register_reward("shapes")
def shapes_reward(images: torch.Tensor, prompts: list[str], spec=None, **metadata) -> list[float]:
    """Partial credit in [0, 1] per image (requested objects, spurious objects, relation)."""
    return _score_batch(partial_score, images, spec)


@register_reward("shapes_strict")
def shapes_strict_reward(images: torch.Tensor, prompts: list[str], spec=None, **metadata) -> list[float]:
    """1.0 when the image shows exactly the prompt's scene, else 0.0."""
    return _score_batch(strict_score, images, spec)


COLOR_TOLERANCE = 60
"""Largest per-channel difference from a palette colour that still counts as that colour."""


@register_reward("shapes_color_area")
def shapes_color_area(images: torch.Tensor, prompts: list[str], spec=None, **metadata) -> list[float]:
    """A deliberately hackable proxy: the share of the image's pixels in the colours the prompt names. A model can
    score 1 by painting the canvas in them while drawing none of the shapes asked for, which is what the guard
    against reward hacking (``gold_reward_funcs: [shapes_strict]``) is shown to catch."""
    from .world import COLORS

    if spec is None:
        raise ValueError("shapes_color_area needs the `spec` metadata of the ShapesWorld prompt files")
    specs = [json.loads(item) if isinstance(item, str) else item for item in spec]
    scores = []
    for array, item in zip(to_uint8(images), specs):
        pixels = torch.from_numpy(array.astype("int16"))
        wanted = torch.tensor([COLORS[o["color"]] for o in item["objects"]], dtype=torch.int16)
        close = ((pixels[None] - wanted[:, None, None]).abs().amax(-1) <= COLOR_TOLERANCE).any(0)
        scores.append(float(close.float().mean()))
    return scores
