"""Video samples ``[B, F, 3, H, W]`` in ``[0, 1]``: files (animated WebP with Pillow, GIF, or MP4 through the optional
``imageio`` extra) and frame strips, the still images that sample grids, trackers and before/after panels show."""

from __future__ import annotations

from pathlib import Path

import torch

VIDEO_FORMATS = ("webp", "gif", "mp4")
STRIP_FRAMES = 4


def is_video(samples: torch.Tensor) -> bool:
    return samples.ndim == 5


def frame_strips(samples: torch.Tensor, count: int = STRIP_FRAMES) -> torch.Tensor:
    """Videos → images ``[B, 3, H, count·W]``: ``count`` evenly spaced frames side by side (first and last
    included). Images pass through unchanged."""
    if not is_video(samples):
        return samples
    frames = samples.shape[1]
    index = torch.linspace(0, frames - 1, min(count, frames)).round().long()
    chosen = samples[:, index]  # [B, k, 3, H, W]
    return chosen.permute(0, 2, 3, 1, 4).flatten(3, 4)


def save_video(frames: torch.Tensor, path: str | Path, fps: int = 16) -> Path:
    """Write one video ``[F, 3, H, W]`` to ``path``; its suffix picks the format: ``.webp`` (animated, lossless) and
    ``.gif`` with Pillow, ``.mp4`` (H.264) with imageio + imageio-ffmpeg (``pip install tempflow[video]``)."""
    from .rewards import to_uint8

    path = Path(path)
    kind = path.suffix.lstrip(".").lower()
    if kind not in VIDEO_FORMATS:
        raise ValueError(f"cannot write video {path.name!r}: the suffix must be one of {list(VIDEO_FORMATS)}")
    arrays = to_uint8(frames)
    if kind == "mp4":
        _write_mp4(arrays, path, fps)
        return path
    from PIL import Image

    images = [Image.fromarray(array) for array in arrays]
    extra = {"lossless": True} if kind == "webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, **extra)
    return path


def _write_mp4(arrays, path: Path, fps: int) -> None:
    try:
        import imageio.v2 as imageio
    except ImportError as err:
        raise ImportError("writing .mp4 needs imageio and imageio-ffmpeg (pip install 'tempflow[video]'); "
                          "animated .webp needs nothing more") from err
    imageio.mimwrite(path, list(arrays), fps=fps, codec="libx264", quality=8, macro_block_size=1)
