"""What a transformer call selected — the key tiles each query tile of block-sparse attention attended, the image
tokens token pruning kept — recorded per sample, and replayed in a later call.

Rollouts draw their transitions under the selections that the rollout policy made; log-prob recomputation (and the
KL reference) must score them under the same ones, or after the first update the policy being trained is a
different sparse function from the one that acted. A :class:`SelectionRecorder` (each block-sparse processor, the
token pruner) keeps the index tensors of its last call, batch first; :func:`record` packs them per sample into one
``[B, total]`` integer row, :func:`replay` hands such rows back to the recorders, which then use them instead of
selecting. A replay stays set until the next :func:`replay` or :func:`clear`: gradient checkpointing re-runs the
forward during backward, and must select as the forward did.
"""

from __future__ import annotations

import math

import torch

SELECTION_DTYPE = torch.int32


class SelectionRecorder:
    """A module part that selects: on every call it notes its index tensors (batch first) in :attr:`recorded`, and
    while :attr:`replayed` is set it uses those instead of selecting."""

    recorded: list[torch.Tensor] | None = None
    replayed: list[torch.Tensor] | None = None

    def replayed_selection(self, slot: int) -> torch.Tensor | None:
        """The replayed index tensor of this call's ``slot``-th selection, or None: select afresh."""
        return None if self.replayed is None else self.replayed[slot]

    def note_selection(self, slot: int, index: torch.Tensor) -> None:
        """Record this call's ``slot``-th selection (slots come in order, from 0, every call)."""
        if slot == 0:
            self.recorded = []
        self.recorded.append(index)

def recorders(model: torch.nn.Module) -> list[SelectionRecorder]:
    """The model's recorders in a fixed order: the token pruner (an installed ``forward``), then the block-sparse
    processors in module order. Wrappers (DDP, peft) are looked through."""
    found = []
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, SelectionRecorder):
            found.append(forward)
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, SelectionRecorder) and processor not in found:
            found.append(processor)
    return found


Layout = tuple[tuple[tuple[int, ...], ...], ...]
"""Per recorder, the per-sample shape of each of its index tensors: how a packed row splits."""


def record(model: torch.nn.Module) -> tuple[torch.Tensor, Layout] | None:
    """The selections of ``model``'s last call, packed ``[B, total]`` (:data:`SELECTION_DTYPE`, on the model's
    device: no host sync), with their layout; None if nothing in it selects."""
    found = recorders(model)
    if not found:
        return None
    if any(r.recorded is None for r in found):
        raise RuntimeError("a selecting module has not run: record() follows a transformer call")
    tensors = [t for r in found for t in r.recorded]
    layout = tuple(tuple(tuple(t.shape[1:]) for t in r.recorded) for r in found)
    packed = torch.cat([t.reshape(len(t), -1).to(SELECTION_DTYPE) for t in tensors], dim=1)
    return packed, layout


def replay(model: torch.nn.Module, packed: torch.Tensor, layout: Layout) -> None:
    """Make ``model``'s recorders use the selections of ``packed`` ``[B, total]`` (rows in the coming call's batch
    order) until the next :func:`replay` or :func:`clear`."""
    found = recorders(model)
    if len(found) != len(layout):
        raise ValueError(f"the selection was recorded from {len(layout)} selecting modules, this model has {len(found)}")
    sizes = [math.prod(shape) for shapes in layout for shape in shapes]
    if packed.shape[1] != sum(sizes):
        raise ValueError(f"a packed selection of {packed.shape[1]} entries does not fit the layout ({sum(sizes)})")
    pieces = iter(packed.split(sizes, dim=1))
    device = next(model.parameters()).device
    for recorder, shapes in zip(found, layout):
        recorder.replayed = [next(pieces).reshape(len(packed), *shape).to(device, torch.long) for shape in shapes]


def clear(model: torch.nn.Module) -> None:
    """Back to selecting afresh on every call."""
    for recorder in recorders(model):
        recorder.replayed = None

