"""Representation-Shift token pruning for MMDiT transformers (SD3 joint blocks, FLUX double + single blocks) and Wan
2.1's video transformer (self-attention, cross-attention to the text and MLP per block).

A token's importance is the size of the update a block applies to it. After each chosen block we take
``‖h_out − h_in‖₂`` per image token, i.e. the block's whole residual update of the image stream (attention
and MLP branches together; DESIGN §7 names the MLP branch ``gate_mlp ⊙ ff(x)``, but the total update needs no
change inside diffusers' blocks and ranks tokens by the same idea). Each sample keeps its top ``keep_ratio``
fraction of the image tokens that are still active; later blocks run on those plus all text tokens, and before
``norm_out`` the kept tokens are scattered back among the pruned ones, which keep the hidden state they had
when pruned. Attention stays dense over fewer tokens, so any fused kernel still applies.

Selection is per sample, so a sample's prediction does not depend on what else is in its batch: rollouts and
log-prob recomputation, which batch samples differently, compute the same function. Gradients flow through
the kept tokens' path and the pruned tokens' frozen states; the choice of tokens itself is not differentiated.

``apply_token_pruning`` replaces the transformer's ``forward`` with a :class:`TokenPruner` that repeats
diffusers' loop over the real modules (embedders, blocks, ``norm_out``, ``proj_out``). FLUX applies RoPE
inside attention from one table shared by the batch; with per-sample token sets that table becomes
``[B, S, D]`` (its text rows plus the kept image rows of each sample), which
:class:`PerSampleRotaryFluxAttnProcessor` applies. Wan's blocks take video tokens only (the text enters through
cross-attention, whose queries are the kept tokens) and its own processor already applies per-sample 3-D RoPE tables
``[B, k, 1, D]``, gathered with the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from . import TOKEN_PRUNING
from .mmdit import (
    TRANSFORMER_CLASSES,
    carry_backend,
    claim_token_grid,
    flux_attention_output,
    flux_joint_qkv,
    mmdit_blocks,
    release_token_grid,
)
from .selection import SelectionRecorder
from .wan import wan_blocks

PRUNABLE_TRANSFORMERS = {**TRANSFORMER_CLASSES, "wan": WanTransformer3DModel}


@dataclass(frozen=True)
class TokenPruning:
    """Where and how much to prune.

    Args:
        layers (`tuple[int, ...]`, defaults to `()`):
            Indices of the blocks after which image tokens are pruned (FLUX counts its double blocks, then its
            single blocks). Pruning is progressive: each listed block keeps ``keep_ratio`` of the tokens still
            active. Empty: no pruning, the model is left untouched.
        keep_ratio (`float`, defaults to `1.0`):
            Fraction of the active image tokens each sample keeps at each pruning block, in ``(0, 1]``.
        refresh_every (`int`, defaults to `1`):
            Rank tokens afresh every this many transformer calls; the calls in between reuse the last ranked
            keep sets while the batch shape stays the same (a new shape ranks at once). Above 1, a call's result
            depends on earlier calls, which log-prob recomputation cannot replay: use it for sampling and
            evaluation only, and 1 whenever rollouts are trained on.
    """

    layers: tuple[int, ...] = ()
    keep_ratio: float = 1.0
    refresh_every: int = 1

    def __post_init__(self):
        layers = tuple(int(layer) for layer in self.layers)
        if len(set(layers)) != len(layers) or any(layer < 0 for layer in layers):
            raise ValueError(f"token pruning layers must be distinct non-negative block indices, got {list(self.layers)}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"token pruning keep_ratio must lie in (0, 1], got {self.keep_ratio}")
        if self.refresh_every < 1:
            raise ValueError(f"token pruning refresh_every must be at least 1, got {self.refresh_every}")
        object.__setattr__(self, "layers", tuple(sorted(layers)))

    def check_layers(self, num_blocks: int) -> None:
        """Pruning after the last block would change nothing, so layers must lie in ``[0, num_blocks - 2]``."""
        bad = [layer for layer in self.layers if layer > num_blocks - 2]
        if bad:
            raise ValueError(
                f"token pruning layers {bad} out of range: this transformer has {num_blocks} blocks, so layers "
                f"must lie in [0, {num_blocks - 2}]"
            )


class TokenPruner(SelectionRecorder):
    """The pruned ``forward`` installed on one transformer, with the keep sets it may reuse across calls; it records
    (or replays) them per call (:mod:`~tempflow.attention.selection`).

    ``kept_positions`` holds, after each call, one ``[B, k]`` tensor per pruning layer: the positions (in the
    full image sequence, ascending) of the tokens that stay active after that layer. Each pruning layer keeps
    ``max(1, round(keep_ratio · n))`` of the ``n`` active tokens. The forward takes the arguments of the model's
    own forward that the policies pass; ControlNet residuals, ``skip_layers`` and ``joint_attention_kwargs``
    (IP-Adapter, LoRA scale) are not supported.
    """

    def __init__(self, transformer: torch.nn.Module, family: str, pruning: TokenPruning):
        self.transformer = transformer
        self.family = family
        self.pruning = pruning
        self.blocks = wan_blocks(transformer) if family == "wan" else mmdit_blocks(transformer)
        pruning.check_layers(len(self.blocks))
        self.kept_positions: list[torch.Tensor] = []
        self._keeps: list[torch.Tensor] | None = None  # indices into the active tokens, one per pruning layer
        self._keeps_key = None
        self._calls_since_refresh = 0

    def __call__(self, *args, **kwargs):
        forward = {"sd3": self._sd3_forward, "flux": self._flux_forward, "wan": self._wan_forward}[self.family]
        return forward(*args, **kwargs)

    def _sd3_forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict=True):
        model = self.transformer
        batch, _, height, width = hidden_states.shape
        image = model.pos_embed(hidden_states).contiguous()
        temb = model.time_text_embed(timestep, pooled_projections)
        text = model.context_embedder(encoder_hidden_states)
        image = model.proj_out(model.norm_out(self._run_blocks(image, text, temb), temb))

        patch = model.config.patch_size
        image = image.reshape(batch, height // patch, width // patch, patch, patch, model.out_channels)
        output = torch.einsum("nhwpqc->nchpwq", image)
        output = output.reshape(batch, model.out_channels, height // patch * patch, width // patch * patch)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _flux_forward(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance=None,
        return_dict=True,
    ):
        model = self.transformer
        image = model.x_embedder(hidden_states)
        timestep = timestep.to(image.dtype) * 1000
        if guidance is None:
            temb = model.time_text_embed(timestep, pooled_projections)
        else:
            temb = model.time_text_embed(timestep, guidance.to(image.dtype) * 1000, pooled_projections)
        text = model.context_embedder(encoder_hidden_states)
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids  # diffusers' deprecated batched ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = model.pos_embed(torch.cat([txt_ids, img_ids]))
        output = model.proj_out(model.norm_out(self._run_blocks(image, text, temb, rotary), temb))
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _wan_forward(
        self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None, return_dict=True,
        attention_kwargs=None,
    ):
        """``WanTransformer3DModel.forward`` for text-to-video (one timestep per sample) with pruned blocks."""
        if timestep.ndim != 1 or encoder_hidden_states_image is not None:
            raise ValueError("token pruning for wan supports text-to-video: one timestep per sample, no image input")
        model = self.transformer
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = model.config.patch_size
        rotary = model.rope(hidden_states)
        image = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, text, _ = model.condition_embedder(timestep, encoder_hidden_states, None)
        image = self._run_blocks(image, text, timestep_proj.unflatten(1, (6, -1)), rotary)
        shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        image = model.proj_out((model.norm_out(image.float()) * (1 + scale) + shift).type_as(image))
        image = image.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        output = image.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    def _run_blocks(self, image, text, temb, rotary=None):
        """All blocks on image ``[B, N, C]`` and text tokens, pruning after ``pruning.layers``; returns the image
        tokens ``[B, N, C]`` with every token at its last hidden state."""
        key = (image.shape, image.device)
        reused = self._reusable_keeps(key)
        keeps, self.kept_positions = [], []
        full = positions = None  # the full image sequence, and where the active tokens sit in it
        block_rotary = rotary
        for index, block in enumerate(self.blocks):
            block_input = image
            text, image = self._call_block(block, image, text, temb, block_rotary)
            if index not in self.pruning.layers:
                continue
            keep = self.replayed_selection(len(keeps))
            if keep is None:
                keep = reused[len(keeps)] if reused else top_tokens(image - block_input, self.pruning.keep_ratio)
            self.note_selection(len(keeps), keep)
            keeps.append(keep)
            if full is None:
                full, positions = image, keep
            else:
                full, positions = scatter_tokens(full, positions, image), positions.gather(1, keep)
            image = gather_tokens(image, keep)
            self.kept_positions.append(positions)
            if self.family == "wan":
                block_rotary = tuple(table[0, :, 0][positions].unsqueeze(2) for table in rotary)  # [B, k, 1, D]
            elif rotary is not None:
                block_rotary = gather_rotary(rotary, text.shape[1], positions)
        self._remember(keeps, key, reused is not None)
        return scatter_tokens(full, positions, image)

    def _call_block(self, block, image, text, temb, rotary):
        # SD3, FLUX and Wan blocks share the positional order (hidden, encoder_hidden, temb[, rotary]); Wan's returns
        # the video tokens alone (the text is not updated)
        args = (image, text, temb) if rotary is None else (image, text, temb, rotary)
        if torch.is_grad_enabled() and self.transformer.gradient_checkpointing:
            out = self.transformer._gradient_checkpointing_func(block, *args)
        else:
            out = block(*args)
        return (text, out) if self.family == "wan" else out

    def _reusable_keeps(self, key) -> list[torch.Tensor] | None:
        if self._keeps is None or key != self._keeps_key or self._calls_since_refresh >= self.pruning.refresh_every:
            return None
        return self._keeps

    def _remember(self, keeps: list[torch.Tensor], key, reused: bool) -> None:
        if reused:
            self._calls_since_refresh += 1
        else:
            self._keeps, self._keeps_key, self._calls_since_refresh = keeps, key, 1

    def reset(self) -> None:
        """Forget the stored keep sets: the next call ranks tokens afresh."""
        self._keeps, self._keeps_key, self._calls_since_refresh = None, None, 0


def top_tokens(update: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Indices ``[B, k]`` (ascending) of each sample's tokens with the largest update norm ``‖update‖₂``."""
    scores = update.detach().float().norm(dim=-1)
    count = max(1, round(keep_ratio * scores.shape[1]))
    return scores.topk(count, dim=1).indices.sort(dim=1).values


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b]]`` for ``tokens`` ``[B, N, C]`` and ``index`` ``[B, k]``."""
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(full: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A copy of ``full`` ``[B, N, C]`` with ``tokens`` ``[B, k, C]`` written at ``positions`` ``[B, k]``."""
    return full.scatter(1, positions.unsqueeze(-1).expand(-1, -1, full.shape[-1]), tokens)


def gather_rotary(rotary, text_len: int, positions: torch.Tensor):
    """Per-sample FLUX RoPE tables ``[B, text_len + k, D]``: the shared text rows, then each sample's kept image
    rows, from the model's table ``[text_len + N, D]`` (rows ordered as ``cat(txt_ids, img_ids)``)."""
    return tuple(
        torch.cat([table[:text_len].expand(len(positions), -1, -1), table[text_len:][positions]], dim=1)
        for table in rotary
    )


class PerSampleRotaryFluxAttnProcessor(FluxAttnProcessor):
    """``FluxAttnProcessor`` that also accepts per-sample RoPE tables ``[B, S, D]``; with the model's shared
    ``[S, D]`` table it is ``FluxAttnProcessor`` itself. The attention backend set on the model still applies."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if image_rotary_emb is None or image_rotary_emb[0].ndim == 2:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        query, key, value = flux_joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        return flux_attention_output(attn, hidden_states.flatten(2, 3).to(query.dtype), encoder_hidden_states)


def apply_token_pruning(transformer: torch.nn.Module, family: str, pruning: TokenPruning | None) -> TokenPruner | None:
    """Make ``transformer``'s forward prune tokens as ``pruning`` says (replacing any earlier setting); no
    layers (or None) restores the dense model. Returns the installed :class:`TokenPruner`, or None.

    Install before ``accelerator.prepare`` (which wraps ``forward`` for autocast and DDP); a deep copy of the
    transformer (e.g. a frozen KL reference) carries its own pruner.
    """
    remove_token_pruning(transformer)
    if pruning is None or not pruning.layers:
        return None
    if family not in PRUNABLE_TRANSFORMERS:
        raise ValueError(f"token pruning supports the families {list(PRUNABLE_TRANSFORMERS)}, got {family!r}")
    if not isinstance(transformer, PRUNABLE_TRANSFORMERS[family]):
        raise ValueError(
            f"token pruning for {family!r} needs a {PRUNABLE_TRANSFORMERS[family].__name__}, got "
            f"{type(transformer).__name__}"
        )
    claim_token_grid(transformer, TOKEN_PRUNING)
    pruner = TokenPruner(transformer, family, pruning)
    if family == "flux":
        _install_per_sample_rotary(transformer)
    transformer.forward = pruner
    return pruner


def remove_token_pruning(transformer: torch.nn.Module) -> None:
    """Undo :func:`apply_token_pruning` (a no-op on a transformer without pruning)."""
    if not isinstance(transformer.__dict__.get("forward"), TokenPruner):
        return
    release_token_grid(transformer, TOKEN_PRUNING)
    del transformer.forward
    for module in transformer.modules():
        if isinstance(module, FluxAttention) and isinstance(module.processor, PerSampleRotaryFluxAttnProcessor):
            module.set_processor(carry_backend(module.processor, FluxAttnProcessor()))


def _install_per_sample_rotary(transformer: torch.nn.Module) -> None:
    for module in transformer.modules():
        if not isinstance(module, FluxAttention):
            continue
        if type(module.processor) is not FluxAttnProcessor:
            raise ValueError(
                f"token pruning needs FLUX's default attention processor, found {type(module.processor).__name__}"
            )
        module.set_processor(carry_backend(module.processor, PerSampleRotaryFluxAttnProcessor()))
