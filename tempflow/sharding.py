"""FSDP2 (torch's ``fully_shard``, prepared by accelerate) in the trainer: which blocks are sharded, the frozen KL
reference sharded like the policy, and whole tensors for export.

Under FSDP2 each process holds a 1/N slice of every weight (a ``DTensor``). What the trainer keeps beside the model —
the EMA and DiffusionNFT's old policy — is built from those sharded parameters, so it is sharded too and no process
ever holds a whole copy; each process checkpoints its own slice (:mod:`tempflow.state_files`), so a checkpoint
resumes on the same number of processes. Export (LoRA or the full transformer) gathers whole tensors: every process
takes part, the main one writes.
"""

from __future__ import annotations

from pathlib import Path

import torch


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


def save_whole_model(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Write a gathered state dict as a diffusers model directory (``from_pretrained`` loads it): the model's
    config and one safetensors file. ``save_pretrained`` would read the model's own, sharded, state dict."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.save_config(directory)
    save_file({name: t.contiguous() for name, t in state.items()}, str(directory / SAFETENSORS_WEIGHTS_NAME))
