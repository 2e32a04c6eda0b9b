"""Image editing prompts: records that pair an instruction with a source image (``{"image": "path", "instruction":
"..."}`` in a JSONL file, the path relative to the file, or a list of paths for Qwen-Image-Edit-Plus; ``prompt`` may
stand for ``instruction``), checked when the
file is read, and the source images as the
tensors the edit families encode and the rewards receive (``source_images``: ``[B, 3, H, W]`` in ``[0, 1]``, at the
size of the images scored)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

EDIT_KEYS = ("image", "instruction")


def is_edit_record(record: dict) -> bool:
    """An instruction (``instruction``, or ``prompt`` as Flow-GRPO's edit datasets name it) with an ``image``."""
    return "image" in record and ("instruction" in record or "prompt" in record)


def resolve_edit_record(record: dict, base: Path, where: str) -> dict:
    """An edit record as tempflow keeps it: ``prompt`` is the instruction and ``image`` an absolute path to a
    readable image. Raises ``ValueError`` naming ``where`` (file and line) otherwise."""
    image, instruction = record.get("image"), record.get("instruction", record.get("prompt"))
    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(i, str) and i for i in images):
        raise ValueError(f"{where}: `image` must be a path (relative to the prompt file), or a list of them")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where}: `instruction` must be a non-empty string")
    paths = []
    for name in images:
        path = (base / name).resolve()
        try:
            _check_readable(str(path))
        except (OSError, ValueError) as err:
            raise ValueError(f"{where}: image {name!r} is missing or unreadable ({_reason(err)})") from None
        paths.append(str(path))
    return {**record, "prompt": instruction, "image": paths if isinstance(image, list) else paths[0]}


def _check_readable(path: str) -> None:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()


def _reason(err: Exception) -> str:
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]


@functools.lru_cache(maxsize=256)
def load_source_image(path: str, height: int, width: int) -> torch.Tensor:
    """``[3, height, width]`` float32 in ``[0, 1]``: the image at ``path`` in RGB, resized (bicubic) to the size."""
    from PIL import Image

    with Image.open(path) as image:
        resized = image.convert("RGB").resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def source_images(records: list[dict], height: int, width: int) -> torch.Tensor | None:
    """The records' source images ``[B, 3, height, width]`` (of several, the first: the one edited), or ``None``
    when no record is an edit."""
    if not any("image" in r for r in records):
        return None
    missing = [i for i, r in enumerate(records) if "image" not in r]
    if missing:
        raise ValueError(f"edit and text-only prompts mixed in one batch (records {missing[:5]} have no image)")
    firsts = [r["image"][0] if isinstance(r["image"], list) else r["image"] for r in records]
    return torch.stack([load_source_image(path, height, width) for path in firsts])
