"""`torch.compile` of the transformer (DESIGN §6), with the number of compiled graphs kept small.

The transformer is compiled in place (``nn.Module.compile``): the module object, its parameters and its
state-dict keys stay what they were, so the LoRA adapter injected before, accelerate's ``prepare`` after, the
KL reference (the same module with its adapter disabled), checkpoints and LoRA export all see the same module.
Rollouts, log-prob recomputation and evaluation call that one module through ``FlowPolicy._forward``. Dynamo
traces at the first call, so compile after everything that changes the module's structure or ``forward``
(LoRA, gradient checkpointing, token pruning, the frozen reference copy of full fine-tuning, which stays
eager) and before that call.

Batch sizes vary from call to call: packed rollouts end on partial batches, CFG doubles the batch, training
recomputes micro-batches. A graph compiled for one size would be recompiled for every other (minutes each at
real sizes, and past torch's ``recompile_limit`` dynamo silently runs eager). Two ways to bound that:

- **dynamic batch** (no buckets): each call marks dimension 0 of its batched inputs dynamic, so one graph
  serves every batch size, per mode (rollout/evaluation: eval + no grad; recomputation: train + grad; KL
  reference: adapter disabled);
- **buckets**: static graphs (``dynamic=False``); each call's batch is padded with copies of its last row up
  to the smallest bucket that holds it, and the padded rows are dropped from the output. Transformer rows
  are independent (per-sample attention, no batch statistics), so the real rows' results do not change
  beyond the rounding that any change of batch size brings (matmul blocking: about 1e-6 in float32). A
  batch larger than the largest bucket runs in chunks of that size. One graph per bucket used, per mode.

Token pruning traces as it is (its per-sample top-k keeps shapes static); its keep-set cache costs one more
graph for the first call. Inductor reorders float operations, so compiled and eager results agree to about
1e-6, not bit for bit.
"""

from __future__ import annotations

import torch

from .config import COMPILE_MODES

GRAPHS_PER_SHAPE = 4
"""Graphs one batch shape may need: rollout and evaluation, recomputation, KL reference, and one spare (e.g.
SoftPAG's perturbed call, or token pruning's first call, made while its keep-set cache is empty)."""
DYNAMIC_SHAPES = 3
"""Batch "shapes" of the dynamic mode: the dynamic graph, batch 1 (which dynamo specialises), and one spare."""


def compile_transformer(
    transformer: torch.nn.Module, backend: str = "inductor", mode: str = "default", buckets=None
) -> None:
    """Compile ``transformer`` in place. ``buckets`` (batch sizes) selects static graphs over the dynamic batch
    dimension; raises ``recompile_limit`` so that every graph the buckets need stays compiled."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {list(COMPILE_MODES)}, got {mode!r}")
    if mode != "default" and backend != "inductor":
        raise ValueError(f"compile mode {mode!r} is an inductor mode; backend {backend!r} takes none")
    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"unknown torch.compile backend {backend!r}; see torch._dynamo.list_backends()")
    needed = GRAPHS_PER_SHAPE * (len(buckets) if buckets else DYNAMIC_SHAPES)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
    transformer.compile(backend=backend, mode=None if mode == "default" else mode, dynamic=False if buckets else None)


def compiled_call(model, inputs: dict, buckets, unbatched=()) -> torch.Tensor:
    """``model(**inputs, return_dict=False)[0]`` for a compiled transformer: over buckets (see the module
    docstring), or with the batch dimension marked dynamic. Tensors named in ``unbatched`` (e.g. FLUX's
    position ids) and non-tensors are passed as they are; every other tensor has the batch as dimension 0."""
    batched = [name for name, value in inputs.items() if torch.is_tensor(value) and name not in unbatched]
    if not buckets:
        for name in batched:
            torch._dynamo.maybe_mark_dynamic(inputs[name], 0)
        return model(**inputs, return_dict=False)[0]
    batch, largest = len(inputs["hidden_states"]), max(buckets)
    outputs = []
    for start in range(0, batch, largest):
        rows = min(largest, batch - start)
        size = min(b for b in buckets if b >= rows)
        chunk = dict(inputs)
        for name in batched:
            chunk[name] = pad_rows(inputs[name][start : start + rows], size)
        outputs.append(model(**chunk, return_dict=False)[0][:rows])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def pad_rows(values: torch.Tensor, size: int) -> torch.Tensor:
    """``values`` ``[n, ...]`` extended to ``[size, ...]`` with copies of its last row."""
    missing = size - len(values)
    if missing == 0:
        return values
    return torch.cat([values, values[-1:].expand(missing, *values.shape[1:])])


__all__ = ["COMPILE_MODES", "compile_transformer", "compiled_call", "pad_rows"]
