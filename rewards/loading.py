"""Shared loading helpers for the model-based rewards: the device a reward runs on, a weights-file reader
that never unpickles arbitrary objects (safetensors, or ``torch.load(weights_only=True)``), and the pooled
embedding of a transformers CLIP call (a tensor before transformers 5, a model output with
``pooler_output`` since)."""

from __future__ import annotations

import os

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the first CUDA device when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch checkpoint; a ``{"state_dict": ...}`` wrapper and the
    ``module.`` prefix of DistributedDataParallel checkpoints are removed."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        checkpoint = load_file(path, device="cpu")
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path!r} holds no state dict (a mapping of names to tensors)")
    if all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    return checkpoint


def pooled(output) -> torch.Tensor:
    """The embedding returned by ``CLIPModel.get_image_features`` / ``get_text_features``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output
