"""SoftPAG: perturbed-attention guidance with a soft perturbation at chosen (layer, head) pairs.

In the perturbed pass the attention output of each chosen head becomes, for the image tokens,

    O' = (1 − u) · softmax(QKᵀ/√d) V + u · V

so ``u = 1`` is PAG's identity attention (each image token keeps its own value) and ``u = 0`` changes nothing.
Text tokens keep their attention output, as in diffusers' PAG for SD3, which perturbs only the image stream.
(diffusers' SD3 PAG lets an image token still attend to the text tokens besides itself; here ``u = 1`` is the
identity over all keys, the PAG paper's definition.) The guided velocity is

    v = v_guided + s · (v_cond − v_perturbed)

with ``v_guided`` the family's usual prediction (CFG for SD3, guidance embedding for FLUX), ``v_cond`` the
conditional prediction and ``v_perturbed`` the conditional prediction under :func:`softpag_attention`; the
policies compute it in ``velocity()`` (:func:`~tempflow.policies.base.perturbed_attention_guidance`).

It is a sampling and evaluation tool: a training rollout with it would be followed by a log-prob
recomputation that had to repeat the extra pass, so the rollout engine refuses SDE rollouts while it is on.

The processors repeat diffusers' ``JointAttnProcessor2_0`` (SD3; both attentions of SD3.5's dual-attention
blocks) and ``FluxAttnProcessor`` (FLUX double and single blocks, RoPE included) and change only the attention
output, so ``u = 0`` is bit-for-bit the model. They accept FLUX's per-sample RoPE tables of token pruning, and
FLUX's dispatcher settings (``set_attention_backend``) carry over to them.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .mmdit import (
    TRANSFORMER_CLASSES,
    block_attentions,
    carry_backend,
    flux_attention_output,
    flux_joint_qkv,
    mmdit_blocks,
)
from .pruning import PerSampleRotaryFluxAttnProcessor


@dataclass(frozen=True)
class SoftPAG:
    """Perturbed-attention guidance settings.

    Args:
        scale (`float`, defaults to `0.0`):
            The PAG scale ``s`` (non-negative); 0 turns guidance off.
        layers (`tuple[int, ...]`, defaults to `()`):
            Indices of the blocks whose attention is perturbed (FLUX counts its double blocks, then its single
            blocks). A positive scale needs at least one.
        heads (`tuple[int, ...] | None`, defaults to `None`):
            Heads perturbed in those blocks; None: all heads.
        softness (`float`, defaults to `1.0`):
            ``u`` in ``[0, 1]``: a perturbed head outputs ``(1 − u)·attention + u·V`` for the image tokens
            (1: PAG's identity attention; 0: no perturbation).
    """

    scale: float = 0.0
    layers: tuple[int, ...] = ()
    heads: tuple[int, ...] | None = None
    softness: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"SoftPAG scale must be a non-negative number, got {self.scale}")
        layers = _distinct_indices(self.layers, "layers")
        heads = None if self.heads is None else _distinct_indices(self.heads, "heads")
        if heads == ():
            raise ValueError("SoftPAG heads must name at least one head (None perturbs all heads)")
        if not 0.0 <= self.softness <= 1.0:
            raise ValueError(f"SoftPAG softness u must lie in [0, 1], got {self.softness}")
        if self.scale > 0 and not layers:
            raise ValueError(f"SoftPAG scale {self.scale} needs at least one layer to perturb")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "heads", heads)

    @property
    def active(self) -> bool:
        """Whether guidance changes the velocity at all (a positive scale)."""
        return self.scale > 0

    def head_softness(self, num_heads: int) -> list[float]:
        """``u`` of each of ``num_heads`` heads: ``softness`` at the chosen heads, 0 elsewhere."""
        return [self.softness if self.heads is None or h in self.heads else 0.0 for h in range(num_heads)]


def _distinct_indices(values, name: str) -> tuple[int, ...]:
    indices = tuple(int(v) for v in values)
    if len(set(indices)) != len(indices) or any(i < 0 for i in indices):
        raise ValueError(f"SoftPAG {name} must be distinct non-negative indices, got {list(values)}")
    return tuple(sorted(indices))


def soft_identity(attended: torch.Tensor, value: torch.Tensor, head_softness: torch.Tensor, tokens: slice):
    """``(1 − u_h)·attended + u_h·value`` on the rows ``tokens``, other rows unchanged; ``attended`` and
    ``value`` are ``[B, S, H, D]``, ``head_softness`` is ``u`` per head ``[H]``. ``lerp`` is exact at ``u = 0``
    (the attention output) and at ``u = 1`` (the value)."""
    start, stop, _ = tokens.indices(attended.shape[1])
    weight = head_softness.to(attended.device, attended.dtype)[:, None]
    mixed = torch.lerp(attended[:, start:stop], value[:, start:stop].to(attended.dtype), weight)
    return torch.cat([attended[:, :start], mixed, attended[:, stop:]], dim=1)


class SoftPAGJointAttnProcessor(JointAttnProcessor2_0):
    """SD3's ``JointAttnProcessor2_0`` with the soft identity on the image tokens (first in the joint sequence;
    all tokens for SD3.5's image-only ``attn2``) at the heads whose ``u`` is non-zero."""

    def __init__(self, head_softness: list[float]):
        super().__init__()
        self.head_softness = torch.tensor(head_softness)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image_len = hidden_states.shape[:2]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_query = attn.add_q_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            text_key = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            text_value = attn.add_v_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)

        attended = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        attended = soft_identity(attended.transpose(1, 2), value.transpose(1, 2), self.head_softness, slice(0, image_len))
        hidden_states = attended.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class SoftPAGFluxAttnProcessor(FluxAttnProcessor):
    """FLUX's ``FluxAttnProcessor`` with the soft identity on the image tokens (after the text tokens) at the
    heads whose ``u`` is non-zero. Takes the shared RoPE table ``[S, D]`` or token pruning's per-sample tables
    ``[B, S, D]``. A single block's attention sees text and image tokens concatenated: ``text_len`` is set
    before each call by :func:`softpag_attention`'s hook on the block."""

    def __init__(self, head_softness: list[float]):
        super().__init__()
        self.head_softness = torch.tensor(head_softness)
        self.text_len: int | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value = flux_joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

        attended = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.text_len
        if text_len is None:
            raise RuntimeError("SoftPAGFluxAttnProcessor in a single block needs text_len (set by softpag_attention)")
        attended = soft_identity(attended, value, self.head_softness, slice(text_len, None))
        return flux_attention_output(attn, attended.flatten(2, 3).to(query.dtype), encoder_hidden_states)


# The processors SoftPAG may stand in for: anything else (block-sparse, IP-Adapter) changes attention in a way
# the soft identity would silently drop.
REPLACEABLE_PROCESSORS = {
    "sd3": (JointAttnProcessor2_0,),
    "flux": (FluxAttnProcessor, PerSampleRotaryFluxAttnProcessor),
}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer inside DDP (``module``) and ``torch.compile`` (``_orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def check_softpag(model: torch.nn.Module, family: str, softpag: SoftPAG) -> None:
    """Raise a ``ValueError`` unless ``softpag``'s layers and heads exist in ``model`` and the chosen blocks run
    the family's default attention processor (the one SoftPAG's processor repeats)."""
    if family not in TRANSFORMER_CLASSES:
        raise ValueError(f"SoftPAG supports the families {list(TRANSFORMER_CLASSES)}, got {family!r}")
    transformer = _unwrap(model)
    if not isinstance(transformer, TRANSFORMER_CLASSES[family]):
        raise ValueError(
            f"SoftPAG for {family!r} needs a {TRANSFORMER_CLASSES[family].__name__}, got {type(transformer).__name__}"
        )
    blocks = mmdit_blocks(transformer)
    bad = [layer for layer in softpag.layers if layer >= len(blocks)]
    if bad:
        raise ValueError(
            f"SoftPAG layers {bad} out of range: this transformer has {len(blocks)} blocks, so layers must lie in "
            f"[0, {len(blocks) - 1}]"
        )
    for layer in softpag.layers:
        for attn in block_attentions(blocks[layer]):
            if softpag.heads is not None and max(softpag.heads) >= attn.heads:
                raise ValueError(
                    f"SoftPAG heads {list(softpag.heads)} out of range: block {layer} has {attn.heads} heads"
                )
            if type(attn.processor) not in REPLACEABLE_PROCESSORS[family]:
                raise ValueError(
                    f"SoftPAG replaces the default attention processor of block {layer}, which runs "
                    f"{type(attn.processor).__name__} (e.g. block-sparse attention); the two cannot be combined"
                )


@contextlib.contextmanager
def softpag_attention(model: torch.nn.Module, family: str, softpag: SoftPAG):
    """Within the block, ``model``'s chosen blocks run SoftPAG's processors (the perturbed pass); the original
    processors, with their dispatcher settings, come back on exit. Works with token pruning installed (its
    ``forward`` still calls the same blocks)."""
    check_softpag(model, family, softpag)
    blocks = mmdit_blocks(_unwrap(model))
    replaced, hooks = [], []
    try:
        for layer in softpag.layers:
            for attn in block_attentions(blocks[layer]):
                original = attn.processor
                if family == "sd3":
                    processor = SoftPAGJointAttnProcessor(softpag.head_softness(attn.heads))
                else:
                    processor = carry_backend(original, SoftPAGFluxAttnProcessor(softpag.head_softness(attn.heads)))
                replaced.append((attn, original))
                attn.set_processor(processor)
                if family == "flux" and attn.added_kv_proj_dim is None:
                    hooks.append(blocks[layer].register_forward_pre_hook(_text_len_hook(processor), with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for attn, original in reversed(replaced):
            attn.set_processor(original)


def _text_len_hook(processor: SoftPAGFluxAttnProcessor):
    """A FLUX single block's pre-hook that tells ``processor`` how many of its tokens are text."""

    def hook(block, args, kwargs):
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        processor.text_len = text.shape[1]

    return hook
