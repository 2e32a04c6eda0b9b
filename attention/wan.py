"""What block-sparse attention needs to know about Wan 2.1's transformer (``WanTransformer3DModel``): its blocks, each
block's self-attention over the video tokens (``attn1``; ``attn2`` is the cross-attention to the text, which stays
dense), and the ``Q, K, V`` that ``WanAttnProcessor`` builds (projections, RMS norms across heads, the 3-D RoPE), so
a processor changes only what lies between them and the output projection."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import _get_qkv_projections


def wan_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's blocks in order (the indexing of block-sparse ``layers``)."""
    return list(transformer.blocks)


def wan_self_attentions(block: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.attn1]


def rotate_wan(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on ``x`` ``[B, S, H, D]`` with tables ``[1, S, 1, D]`` (interleaved pairs; ``WanAttnProcessor``)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def wan_self_qkv(attn, hidden_states: torch.Tensor, rotary_emb=None):
    """Self-attention's ``Q, K, V`` ``[B, S, H, D]`` as ``WanAttnProcessor`` builds them."""
    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
    if rotary_emb is not None:
        query, key = rotate_wan(query, *rotary_emb), rotate_wan(key, *rotary_emb)
    return query, key, value


def wan_attention_output(attn, hidden_states: torch.Tensor) -> torch.Tensor:
    """The tail of ``WanAttnProcessor``: attention output ``[B, S, H·D]`` through the output projection."""
    return attn.to_out[1](attn.to_out[0](hidden_states))
