"""FSDP2 (torch's ``fully_shard``, prepared by accelerate) in the trainer: which blocks are sharded, the frozen KL
reference sharded like the policy, whole tensors for export, and per-rank files for the states that live on shards.

Under FSDP2 each process holds a 1/N slice of every weight (a ``DTensor``). What the trainer keeps beside the model —
the EMA and DiffusionNFT's old policy — is built from those sharded parameters, so it is sharded too and no process
ever holds a whole copy; each process saves and loads its own slice (``shard-{rank}.safetensors``, no pickle), so a
checkpoint resumes on the same number of processes. Export (LoRA or the full transformer) gathers whole tensors:
every process takes part, the main one writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHARDED_STATE_DIR = "sharded_state"
"""Checkpoint subdirectory of the per-rank states (``{name}/shard-{rank}.safetensors``)."""


def block_classes(transformer: torch.nn.Module, family: str, requested: list[str] | None) -> list[str]:
    """The transformer block classes FSDP2 shards one unit each: ``requested`` (the accelerate config's
    ``fsdp_transformer_layer_cls_to_wrap``) or, without it, the family's blocks as diffusers declares them
    (``_no_split_modules``: SD3's joint blocks, FLUX's double and single blocks, Qwen-Image's and Wan's blocks).
    Raises ValueError naming the family and the block classes its transformer has when one is not there."""
    present = {type(m).__name__ for m in transformer.modules()}
    declared = [name for name in getattr(transformer, "_no_split_modules", None) or [] if name in present]
    wanted = list(requested or declared)
    missing = [name for name in wanted if name not in present]
    if missing or not wanted:
        found = sorted(name for name in present if name.endswith("Block")) or sorted(present)
        what = f"has no block class {', '.join(missing)}" if missing else "declares no block classes to shard"
        raise ValueError(f"FSDP: model family {family} {what}; its transformer's block classes are: "
                         f"{', '.join(found)} (set fsdp_transformer_layer_cls_to_wrap to those, or leave it unset)")
    return wanted


def shard_like_policy(model: torch.nn.Module, classes: list[str], plugin) -> torch.nn.Module:
    """Shard a frozen copy (full fine-tuning's KL reference) as accelerate sharded the policy: one unit per block,
    then the rest, with the plugin's mixed precision and resharding; forward-only, so no optimizer is involved."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {"reshard_after_forward": plugin.reshard_after_forward,
               "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    for module in model.modules():
        if type(module).__name__ in classes:
            fully_shard(module, **options)
    fully_shard(model, **options)
    return model


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process must call it, in the same order); others as they
    are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded tensor (the tensor itself when not sharded)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def save_whole_model(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Write a gathered state dict as a diffusers model directory (``from_pretrained`` loads it): the model's
    config and one safetensors file. ``save_pretrained`` would read the model's own, sharded, state dict."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.save_config(directory)
    save_file({name: t.contiguous() for name, t in state.items()}, str(directory / SAFETENSORS_WEIGHTS_NAME))


def save_shard(directory: Path, name: str, rank: int, tensors: list[torch.Tensor], scalars: dict) -> None:
    """This process's slices of ``tensors`` and the (JSON) ``scalars`` of one sharded state."""
    from safetensors.torch import save_file

    folder = directory / SHARDED_STATE_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"{k}": local(t).detach().contiguous().cpu() for k, t in enumerate(tensors)},
              str(folder / f"shard-{rank}.safetensors"), metadata={"scalars": json.dumps(scalars)})


def load_shard(directory: Path, name: str, rank: int, tensors: list[torch.Tensor]) -> dict:
    """Copy this process's saved slices into ``tensors`` (in place); returns the saved scalars."""
    from safetensors import safe_open

    path = directory / SHARDED_STATE_DIR / name / f"shard-{rank}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a sharded checkpoint resumes on the process count that wrote it")
    with safe_open(str(path), "pt") as f:
        if len(f.keys()) != len(tensors):
            raise ValueError(f"{path} holds {len(f.keys())} tensors; this run's {name} has {len(tensors)}")
        for k, tensor in enumerate(tensors):
            local(tensor).copy_(f.get_tensor(str(k)))
        return json.loads(f.metadata()["scalars"])
