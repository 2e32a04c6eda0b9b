"""VSA-style block-sparse attention for MMDiT transformers (SD3 joint attention, FLUX double + single blocks) and Wan
2.1's video self-attention (3-D tiles over frames × height × width; its cross-attention to the text stays dense).

Image tokens are grouped into tiles (2-D ``8×8`` = 64 tokens for images, 3-D ``4×4×4`` for video latents) and
reordered tile by tile. Per sample and head:

1. **coarse**: attention between tile means, ``S = mean(Q_tile) · mean(K_tile)ᵀ · d^-½``; each query tile keeps
   the ``top_k = ⌈density · n_tiles⌉`` key tiles with the highest score;
2. **fine**: every image query attends to all text keys plus the image keys of its tile's selected tiles
   (:func:`~tempflow.attention.block_sparse_kernels.block_sparse_attention`); text queries stay dense;
3. optional **gate** (zero-initialised, per head): ``O += g · softmax(S) · mean(V_tile)``, the coarse output
   broadcast over the query tile, so a dense-trained model starts as plain top-k sparse attention;
4. optional **delta correction**: exact attention for one anchor query per tile (its middle token), and the
   anchor's ``dense − sparse`` difference added to every query of its tile.

At ``density = 1`` every tile is selected and the result is dense attention. Everything is computed per sample,
so a sample's output does not depend on its batch: rollouts and log-prob recomputation, which batch
differently, compute the same function (and both go through the processors installed here).

:func:`apply_block_sparse` swaps the attention processors of the chosen layers for
:class:`BlockSparseJointAttnProcessor` (SD3), :class:`BlockSparseFluxAttnProcessor` (FLUX) or
:class:`BlockSparseWanAttnProcessor` (Wan's ``attn1``); they repeat diffusers' projections and replace only the
attention call. The token grid (latent height × width in tokens; frames × height × width for video) is given at
install time: FLUX's single blocks see text and image tokens concatenated, and the image tokens are the last
``prod(grid)`` of them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from . import BLOCK_SPARSE, BLOCK_SPARSE_KERNELS
from .backends import DispatchedJointAttnProcessor
from .block_sparse_kernels import (
    TRITON_BLOCK_SIZES,
    TRITON_HEAD_DIMS,
    _triton_interpreting,
    block_sparse_attention,
)
from .mmdit import (
    block_attentions,
    claim_token_grid,
    flux_attention_output,
    flux_joint_qkv,
    mmdit_blocks,
    release_token_grid,
    sd3_attention_output,
    sd3_joint_qkv,
)
from .selection import SelectionRecorder
from .wan import wan_attention_output, wan_blocks, wan_self_attentions, wan_self_qkv


@dataclass(frozen=True)
class BlockSparse:
    """Where and how sparse.

    Args:
        density (`float`, defaults to `1.0`):
            Fraction of the key tiles each query tile attends to, in ``(0, 1]`` (``1 − density`` is the sparsity);
            at least one tile is kept.
        tile (`tuple[int, ...]`, defaults to `(8, 8)`):
            Tile shape in tokens, over the token grid's (height, width) or (frames, height, width).
        layers (`tuple[int, ...]`, defaults to `()`):
            Blocks whose attention is sparse (FLUX counts double blocks, then single blocks). Empty: every block.
        gate (`bool`, defaults to `False`):
            Add the coarse tile-level output through a zero-initialised learnable per-head gate.
        delta_correction (`bool`, defaults to `False`):
            Correct each tile by its anchor query's exact ``dense − sparse`` difference.
        kernel (`str`, defaults to `"auto"`):
            Fine-stage implementation: ``triton``, ``flex``, ``torch`` or ``auto`` (see ``block_sparse_attention``).
    """

    density: float = 1.0
    tile: tuple[int, ...] = (8, 8)
    layers: tuple[int, ...] = ()
    gate: bool = False
    delta_correction: bool = False
    kernel: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "tile", tuple(int(t) for t in self.tile))
        object.__setattr__(self, "layers", tuple(sorted(int(layer) for layer in self.layers)))
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"block-sparse density must lie in (0, 1], got {self.density}")
        if len(self.tile) not in (2, 3) or any(t < 1 for t in self.tile):
            raise ValueError(f"block-sparse tile must be 2 or 3 positive sizes, got {list(self.tile)}")
        if len(set(self.layers)) != len(self.layers) or any(layer < 0 for layer in self.layers):
            raise ValueError(f"block-sparse layers must be distinct non-negative block indices, got {list(self.layers)}")
        if self.kernel not in BLOCK_SPARSE_KERNELS:
            raise ValueError(f"block-sparse kernel must be one of {list(BLOCK_SPARSE_KERNELS)}, got {self.kernel!r}")

    @property
    def tile_tokens(self) -> int:
        return math.prod(self.tile)

    def top_k(self, num_tiles: int) -> int:
        return max(1, math.ceil(self.density * num_tiles - 1e-9))


def tile_order(grid: tuple[int, ...], tile: tuple[int, ...]) -> torch.Tensor:
    """Permutation of the row-major token grid that lists the tokens tile by tile (row-major inside a tile)."""
    if len(grid) != len(tile):
        raise ValueError(f"token grid {list(grid)} and tile {list(tile)} must have the same number of dimensions")
    if any(g % t for g, t in zip(grid, tile)):
        raise ValueError(f"token grid {list(grid)} is not divisible into tiles of {list(tile)}")
    index = torch.arange(math.prod(grid))
    split = [size for g, t in zip(grid, tile) for size in (g // t, t)]
    dims = len(grid)
    outer, inner = list(range(0, 2 * dims, 2)), list(range(1, 2 * dims, 2))
    return index.view(split).permute(*outer, *inner).flatten()


@functools.lru_cache(maxsize=32)
def _tile_order_on(grid: tuple[int, ...], tile: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """:func:`tile_order` on ``device``, built once per (grid, tile, device): no host-to-device copy per call."""
    return tile_order(grid, tile).to(device)


def tile_means(x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """``[B, H, n·T, D]`` in tile order → ``[B, H, n, D]`` per-tile means."""
    return x.unflatten(2, (-1, tile_tokens)).mean(dim=3)


def sparse_image_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    text_key: torch.Tensor | None,
    text_value: torch.Tensor | None,
    grid: tuple[int, ...],
    sparse: BlockSparse,
    gate: torch.Tensor | None = None,
    recorder: SelectionRecorder | None = None,
) -> torch.Tensor:
    """Block-sparse attention of image queries ``[B, H, N, D]`` (row-major grid order) over the image keys and
    all text keys ``[B, H, P, D]``; returns ``[B, H, N, D]`` in the input order. ``gate``: per-head ``[H]``.
    ``recorder``: records the selected key tiles ``[B, H, n_tiles, top_k]``, or replays earlier ones."""
    order = _tile_order_on(tuple(grid), sparse.tile, query.device)
    if query.shape[2] != len(order):
        raise ValueError(
            f"{query.shape[2]} image tokens do not fill the token grid {list(grid)} block-sparse attention was set "
            "up for (set it again after changing the resolution)"
        )
    tokens = sparse.tile_tokens
    q, k, v = query[:, :, order], key[:, :, order], value[:, :, order]
    num_tiles = q.shape[2] // tokens
    scale = q.shape[-1] ** -0.5

    coarse = None

    def coarse_scores():
        nonlocal coarse
        if coarse is None:
            coarse = (tile_means(q, tokens) @ tile_means(k, tokens).transpose(-1, -2)).float() * scale
        return coarse

    block_index = None if recorder is None else recorder.replayed_selection(0)
    if block_index is None:
        block_index = coarse_scores().topk(sparse.top_k(num_tiles), dim=-1).indices
    if recorder is not None:
        recorder.note_selection(0, block_index)
    prefix = 0 if text_key is None else text_key.shape[2]
    keys = k if text_key is None else torch.cat([text_key, k], dim=2)
    values = v if text_value is None else torch.cat([text_value, v], dim=2)
    kernel = sparse.kernel
    if kernel == "auto" and _triton_interpreting() and (tokens not in TRITON_BLOCK_SIZES
                                                        or q.shape[-1] not in TRITON_HEAD_DIMS):
        kernel = "torch"  # e.g. ShapesWorld's 2×2 tiles: below the Triton kernel's smallest block
    out, _ = block_sparse_attention(
        q, keys, values, block_index, block_size=tokens, dense_prefix=prefix, scale=scale, backend=kernel,
        check_index=False,  # top-k indices are distinct and in range by construction
    )
    if gate is not None:
        coarse_out = coarse_scores().softmax(dim=-1).to(v.dtype) @ tile_means(v, tokens)
        out = out + gate.view(1, -1, 1, 1).to(out.dtype) * coarse_out.repeat_interleave(tokens, dim=2)
    if sparse.delta_correction:
        anchors = torch.arange(num_tiles, device=q.device) * tokens + tokens // 2
        exact = F.scaled_dot_product_attention(q[:, :, anchors], keys, values, scale=scale)
        out = out + (exact - out[:, :, anchors]).repeat_interleave(tokens, dim=2)
    return out[:, :, torch.argsort(order)]


def joint_sparse_attention(image_qkv, text_qkv, grid, sparse: BlockSparse, gate=None, recorder=None):
    """MMDiT joint attention, ``[B, H, L, D]`` triples: image queries block-sparse, text queries dense over all
    keys. Returns (image output, text output or None)."""
    q, k, v = image_qkv
    if text_qkv is None:
        return sparse_image_attention(q, k, v, None, None, grid, sparse, gate, recorder), None
    text_q, text_k, text_v = text_qkv
    image_out = sparse_image_attention(q, k, v, text_k, text_v, grid, sparse, gate, recorder)
    text_out = F.scaled_dot_product_attention(text_q, torch.cat([text_k, k], dim=2), torch.cat([text_v, v], dim=2))
    return image_out, text_out


class _SparseProcessor(torch.nn.Module, SelectionRecorder):
    """Holds the setting, the grid and the optional per-head gate (a parameter of the transformer once set); records
    (or replays) its key-tile selection (:mod:`~tempflow.attention.selection`)."""

    def __init__(self, sparse: BlockSparse, grid: tuple[int, ...], heads: int):
        super().__init__()
        self.sparse, self.grid = sparse, tuple(grid)
        self.gate = torch.nn.Parameter(torch.zeros(heads)) if sparse.gate else None

    def attend(self, image_qkv, text_qkv):
        return joint_sparse_attention(image_qkv, text_qkv, self.grid, self.sparse, self.gate, recorder=self)


class BlockSparseJointAttnProcessor(_SparseProcessor):
    """SD3's ``JointAttnProcessor2_0`` with block-sparse image attention (image tokens first, text last)."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        image_qkv, text_qkv = sd3_joint_qkv(attn, hidden_states, encoder_hidden_states)
        image_out, text_out = self.attend(image_qkv, text_qkv)
        return sd3_attention_output(attn, image_out, text_out, hidden_states.dtype)


class BlockSparseFluxAttnProcessor(_SparseProcessor):
    """FLUX's ``FluxAttnProcessor`` with block-sparse image attention (text tokens first, image tokens last; in
    single blocks they arrive concatenated and the image tokens are the last ``prod(grid)``)."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("block-sparse FLUX attention does not take an attention mask")
        query, key, value = flux_joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

        text_len = query.shape[1] - math.prod(self.grid)
        if text_len < 0:
            raise ValueError(f"{query.shape[1]} tokens cannot hold the {math.prod(self.grid)} of token grid {self.grid}")
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        image_qkv = [x[:, :, text_len:] for x in (q, k, v)]
        text_qkv = [x[:, :, :text_len] for x in (q, k, v)] if text_len else None
        image_out, text_out = self.attend(image_qkv, text_qkv)
        out = image_out if text_out is None else torch.cat([text_out, image_out], dim=2)
        return flux_attention_output(attn, out.transpose(1, 2).flatten(2, 3).to(query.dtype), encoder_hidden_states)


class BlockSparseWanAttnProcessor(_SparseProcessor):
    """Wan's ``WanAttnProcessor`` for a block's self-attention (``attn1``: video tokens only, 3-D RoPE), with
    block-sparse attention over the tiles of the frames × height × width token grid."""

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("block-sparse Wan attention replaces self-attention only (no text, no mask)")
        query, key, value = wan_self_qkv(attn, hidden_states, rotary_emb)
        out, _ = self.attend([x.transpose(1, 2) for x in (query, key, value)], None)
        return wan_attention_output(attn, out.transpose(1, 2).flatten(2).type_as(query))


# family: (its blocks, a block's attentions that go sparse, the processors it may replace, the sparse processor)
_LAYOUTS = {
    "sd3": (mmdit_blocks, block_attentions, (JointAttnProcessor2_0, DispatchedJointAttnProcessor),
            BlockSparseJointAttnProcessor),
    "flux": (mmdit_blocks, block_attentions, (FluxAttnProcessor,), BlockSparseFluxAttnProcessor),
    "wan": (wan_blocks, wan_self_attentions, (WanAttnProcessor,), BlockSparseWanAttnProcessor),
}


def apply_block_sparse(transformer: torch.nn.Module, family: str, sparse: BlockSparse | None, grid) -> None:
    """Make the chosen blocks' attention block-sparse for a token ``grid`` (or restore dense with None).

    Install before LoRA wrapping and ``accelerator.prepare``; the gates (when on) become transformer parameters.
    """
    remove_block_sparse(transformer)
    if sparse is None:
        return
    if family not in _LAYOUTS:
        raise ValueError(f"block-sparse attention supports the families {list(_LAYOUTS)}, got {family!r}")
    tile_order(tuple(grid), sparse.tile)  # validates grid against tile
    list_blocks, attentions, expected, processor_class = _LAYOUTS[family]
    blocks = [attentions(block) for block in list_blocks(transformer)]
    bad = [layer for layer in sparse.layers if layer >= len(blocks)]
    if bad:
        raise ValueError(f"block-sparse layers {bad} out of range: this transformer has {len(blocks)} blocks")
    claim_token_grid(transformer, BLOCK_SPARSE)
    for index, modules in enumerate(blocks):
        if sparse.layers and index not in sparse.layers:
            continue
        for module in modules:
            if not isinstance(module.processor, expected):
                raise ValueError(
                    f"block-sparse attention replaces {expected[0].__name__}, found {type(module.processor).__name__}"
                )
            processor = processor_class(sparse, grid, module.heads).to(next(module.parameters()).device)
            processor.replaced = module.processor  # restored on removal (it carries the dense attention backend)
            module.set_processor(processor)


def uses_block_sparse(transformer: torch.nn.Module) -> bool:
    return any(isinstance(getattr(m, "processor", None), _SparseProcessor) for m in transformer.modules())


def remove_block_sparse(transformer: torch.nn.Module) -> None:
    """Restore the processors that :func:`apply_block_sparse` replaced."""
    release_token_grid(transformer, BLOCK_SPARSE)
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), _SparseProcessor):
            module.set_processor(module.processor.replaced)
