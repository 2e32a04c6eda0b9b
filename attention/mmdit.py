"""What pruning, block-sparse attention and SoftPAG share about MMDiT transformers (SD3 joint blocks, FLUX double +
single blocks): the block list that their ``layers`` index, each block's attention modules, FLUX attention's
``Q, K, V`` and output projections (the processors change only what lies between), and which of them owns the
token grid."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from . import check_token_grid_users

TRANSFORMER_CLASSES = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}



def mmdit_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's blocks in order: SD3's joint blocks, or FLUX's double blocks then its single blocks (the
    indexing that pruning, block-sparse and SoftPAG layers use)."""
    return list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", []))


def block_attentions(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The block's self-attention modules: ``attn``, and SD3.5's image-only ``attn2`` where present."""
    return [module for module in (block.attn, getattr(block, "attn2", None)) if module is not None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's RoPE (diffusers' ``apply_rotary_emb``, interleaved pairs) on ``x`` ``[B, S, H, D]`` with tables
    ``[S, D]`` or, per sample, ``[B, S, D]``."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def sd3_joint_qkv(attn, hidden_states, encoder_hidden_states=None):
    """SD3 joint attention's image ``Q, K, V`` and (with a text stream) text ``Q, K, V``, each ``[B, H, L, D]``, as
    ``JointAttnProcessor2_0`` builds them (projections and QK norms); the text triple is None without text."""
    def heads(x):
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

    image = [heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))]
    if attn.norm_q is not None:
        image[0] = attn.norm_q(image[0])
    if attn.norm_k is not None:
        image[1] = attn.norm_k(image[1])
    if encoder_hidden_states is None:
        return image, None
    text = [heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)),
            heads(attn.add_v_proj(encoder_hidden_states))]
    if attn.norm_added_q is not None:
        text[0] = attn.norm_added_q(text[0])
    if attn.norm_added_k is not None:
        text[1] = attn.norm_added_k(text[1])
    return image, text


def sd3_attention_output(attn, image_out, text_out, dtype):
    """``JointAttnProcessor2_0``'s output projections of the image (and text) attention outputs ``[B, H, L, D]``:
    the image tokens, or (image, text) with a text stream (the last block's text output is not projected)."""
    image_out = attn.to_out[1](attn.to_out[0](image_out.transpose(1, 2).flatten(2).to(dtype)))
    if text_out is None:
        return image_out
    text_out = text_out.transpose(1, 2).flatten(2).to(dtype)
    if not attn.context_pre_only:
        text_out = attn.to_add_out(text_out)
    return image_out, text_out


def flux_joint_qkv(attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
    """FLUX attention's ``Q, K, V`` ``[B, S, H, D]`` as ``FluxAttnProcessor`` builds them (projections, QK norms,
    text tokens first), with RoPE from the shared table ``[S, D]`` or per-sample tables ``[B, S, D]``. Shared by
    the processors here, in block-sparse attention and in SoftPAG, which change only what follows."""
    query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
        attn, hidden_states, encoder_hidden_states
    )
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if attn.added_kv_proj_dim is not None:
        query = torch.cat([attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim))), query], dim=1)
        key = torch.cat([attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim))), key], dim=1)
        value = torch.cat([encoder_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
    if image_rotary_emb is not None:
        if image_rotary_emb[0].ndim == 2:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        else:
            cos, sin = image_rotary_emb
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)
    return query, key, value


def flux_attention_output(attn, hidden_states, encoder_hidden_states=None):
    """The tail of ``FluxAttnProcessor``: attention output ``[B, S, H·D]`` (text first) → the single block's
    output as it is, or the double block's (image, text) pair through their output projections."""
    if encoder_hidden_states is None:
        return hidden_states
    text_len = encoder_hidden_states.shape[1]
    encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
        [text_len, hidden_states.shape[1] - text_len], dim=1
    )
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
    return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def carry_backend(old, new):
    """``new`` with the dispatcher settings (``set_attention_backend``) of ``old``."""
    new._attention_backend = old._attention_backend
    new._parallel_config = old._parallel_config
    return new


_TOKEN_GRID_OWNER = "_tempflow_token_grid_owner"


def claim_token_grid(transformer: torch.nn.Module, owner: str) -> None:
    """Record that ``owner`` (token pruning or block-sparse attention) now relies on the transformer's image-token
    grid; raises while the other one holds it (see :func:`~tempflow.attention.check_token_grid_users`)."""
    current = getattr(transformer, _TOKEN_GRID_OWNER, None)
    check_token_grid_users({owner} | ({current} if current else set()))
    setattr(transformer, _TOKEN_GRID_OWNER, owner)


def release_token_grid(transformer: torch.nn.Module, owner: str) -> None:
    if getattr(transformer, _TOKEN_GRID_OWNER, None) == owner:
        delattr(transformer, _TOKEN_GRID_OWNER)
