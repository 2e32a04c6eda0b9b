"""Model-free rewards: image statistics and JPEG (in)compressibility. Cheap, deterministic, good for tests."""

from __future__ import annotations

import io

import torch

from . import register_reward, to_pil


@register_reward("brightness")
def brightness(images: torch.Tensor, prompts: list[str], **metadata) -> list[float]:
    """Mean pixel value in [0, 1]."""
    return images.float().mean(dim=(1, 2, 3)).tolist()


def _jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> list[float]:
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


@register_reward("jpeg_compressibility")
def jpeg_compressibility(images: torch.Tensor, prompts: list[str], **metadata) -> list[float]:
    """Minus the JPEG size in kB (DDPO's compressibility reward): simpler images score higher."""
    return [-size for size in _jpeg_kilobytes(images)]


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(images: torch.Tensor, prompts: list[str], **metadata) -> list[float]:
    """The JPEG size in kB: more detailed images score higher."""
    return _jpeg_kilobytes(images)
