"""FLUX.1 Kontext policy (image editing): FLUX with the source image's VAE latents appended to the noisy tokens, as
``FluxKontextPipeline`` does — packed 2×2 like them, with position ids whose first coordinate is 1 — and only the
target tokens denoised. The source is encoded once per (instruction, image) and travels with the prompt's
embeddings (``image_latents``), so rollouts, the loss and evaluation condition on it alike."""

from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline, FluxPipeline

from ..editing import load_source_image
from .base import PromptEmbeds
from .flux import FluxPolicy

IMAGE_LATENTS = "image_latents"


class FluxKontextPolicy(FluxPolicy):
    family = "flux_kontext"
    pipeline_class = FluxKontextPipeline
    edits = True
    # Flow-GRPO's train_flux_kontext.py: FLUX's 12 targets and the single blocks' MLP input projection
    default_lora_target_modules = (*FluxPolicy.default_lora_target_modules, "proj_mlp")

    def set_token_pruning(self, pruning) -> None:
        if pruning is not None:
            raise ValueError(f"token pruning is not supported for {self.family}: it would prune the source image's "
                             "tokens, which the edit is conditioned on")
        super().set_token_pruning(pruning)

    def set_block_sparse(self, sparse) -> None:
        if sparse is not None:
            raise ValueError(f"block-sparse attention is not supported for {self.family}: its tiles do not know the "
                             "source image's tokens, which every query must see")
        super().set_block_sparse(sparse)

    def _encode_edits(self, prompts: tuple[str, ...], images: tuple[str, ...]) -> PromptEmbeds:
        text = self._encode(list(prompts))
        return PromptEmbeds({**text.tensors, IMAGE_LATENTS: self.encode_source_images(images)})

    def encode_source_images(self, images: tuple[str, ...]) -> torch.Tensor:
        """Packed VAE latents ``[B, tokens, 4·C]`` of source images (paths) resized (bicubic) to the output size,
        as Flow-GRPO's Kontext script feeds ``FluxKontextPipeline.prepare_latents`` (the VAE's mode, shifted and
        scaled)."""
        vae, size = self.pipeline.vae, self._latent_hw * self.vae_scale_factor
        pixels = torch.stack([load_source_image(path, size, size) for path in images]) * 2 - 1
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        channels, height, width = latents.shape[1:]
        return FluxPipeline._pack_latents(latents, len(latents), channels, height, width)

    def _transformer_inputs(self, latents, sigmas, embeds):
        inputs = super()._transformer_inputs(latents, sigmas, embeds)
        source = embeds.tensors[IMAGE_LATENTS]
        grid = self._latent_hw // 2
        source_ids = FluxPipeline._prepare_latent_image_ids(len(latents), grid, grid, latents.device, inputs["img_ids"].dtype)
        source_ids[..., 0] = 1  # the pipeline's mark of the condition image's tokens
        inputs["hidden_states"] = torch.cat([inputs["hidden_states"], source.to(inputs["hidden_states"].dtype)], dim=1)
        inputs["img_ids"] = torch.cat([inputs["img_ids"], source_ids])
        return inputs

    def _forward(self, model: torch.nn.Module, **inputs) -> torch.Tensor:
        """The prediction for the target tokens (the source image's come after them)."""
        return super()._forward(model, **inputs)[:, : self.image_seq_len]
