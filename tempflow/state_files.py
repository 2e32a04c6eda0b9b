"""The trainer state that accelerate would pickle, written without pickle: the EMA's and DiffusionNFT's old policy's
tensors (each process's slices under FSDP), and each process's random number generator states, as safetensors with
their scalars in JSON metadata. Resuming reads them back exactly; nothing in a checkpoint needs unpickling to resume
but what accelerate and DeepSpeed write for the model and optimizer themselves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

STATE_DIR = "tensor_state"
"""Checkpoint subdirectory of the tensor states (``{name}/part-{index}.safetensors``)."""
RNG_FILE = "rng_state_{}.safetensors"
ACCELERATE_RNG_FILE = "random_states_{}.pkl"
"""What accelerate's ``save_state`` writes per process (pickled); replaced by :data:`RNG_FILE`."""


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded tensor (the tensor itself when not sharded)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def save_tensors(directory: Path, name: str, index: int, tensors: list[torch.Tensor], scalars: dict) -> None:
    """``tensors`` (this process's slices) and the (JSON) ``scalars`` of one state, as part ``index``."""
    from safetensors.torch import save_file

    folder = directory / STATE_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"{k}": local(t).detach().contiguous().cpu() for k, t in enumerate(tensors)},
              str(folder / f"part-{index}.safetensors"), metadata={"scalars": json.dumps(scalars)})


def load_tensors(directory: Path, name: str, index: int, tensors: list[torch.Tensor]) -> dict:
    """Copy part ``index`` of a saved state into ``tensors`` (in place); returns its scalars."""
    from safetensors import safe_open

    path = directory / STATE_DIR / name / f"part-{index}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a sharded checkpoint resumes on the process count that wrote it")
    with safe_open(str(path), "pt") as f:
        if len(f.keys()) != len(tensors):
            raise ValueError(f"{path} holds {len(f.keys())} tensors; this run's {name} has {len(tensors)}")
        for k, tensor in enumerate(tensors):
            local(tensor).copy_(f.get_tensor(str(k)))
        return json.loads(f.metadata()["scalars"])


def save_rng_state(directory: Path, rank: int) -> None:
    """This process's Python, NumPy, torch CPU and CUDA generator states; removes accelerate's pickled copy."""
    from safetensors.torch import save_file

    version, words, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    scalars = {"python": [version, list(words), gauss], "numpy": [kind, int(position), int(has_gauss), float(cached)]}
    save_file(tensors, str(directory / RNG_FILE.format(rank)), metadata={"scalars": json.dumps(scalars)})
    (directory / ACCELERATE_RNG_FILE.format(rank)).unlink(missing_ok=True)


def load_rng_state(directory: Path, rank: int) -> None:
    from safetensors import safe_open

    with safe_open(str(directory / RNG_FILE.format(rank)), "pt") as f:
        scalars = json.loads(f.metadata()["scalars"])
        version, words, gauss = scalars["python"]
        random.setstate((version, tuple(words), gauss))
        kind, position, has_gauss, cached = scalars["numpy"]
        np.random.set_state((kind, f.get_tensor("numpy_keys").numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(f.get_tensor("torch"))
        if "cuda" in f.keys() and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(f.get_tensor("cuda")))
