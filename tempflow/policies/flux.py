"""FLUX.1 policy: packed 2×2 latents with RoPE position ids, guidance embedding instead of true CFG, and the
resolution-dependent σ shift of ``FluxPipeline``."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline

from .base import FlowPolicy, PromptEmbeds


class FluxPolicy(FlowPolicy):
    family = "flux"
    pipeline_class = FluxPipeline
    # TempFlow-GRPO's and Flow-GRPO's train_flux scripts: attention of the double and single blocks, and the double
    # blocks' feed-forward layers of both streams
    default_lora_target_modules = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )
    default_max_sequence_length = 512
    t5_tokenizer_attribute = "tokenizer_2"
    unbatched_inputs = ("txt_ids", "img_ids")
    true_cfg = False  # guidance is an embedding: the prediction is already the guided one

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.pipeline.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled})

    @property
    def _latent_hw(self) -> int:
        # FluxPipeline.prepare_latents: the VAE grid rounded down to an even size, for 2×2 packing
        return 2 * (self.resolution // (self.vae_scale_factor * 2))

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self._latent_hw // 2, self._latent_hw // 2)

    @classmethod
    def base_sigmas(cls, num_steps: int) -> list[float]:
        return np.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def initial_noise(self, generator: torch.Generator) -> torch.Tensor:
        channels = self.transformer.config.in_channels // 4
        size = self._latent_hw
        noise = torch.randn((1, channels, size, size), generator=generator, dtype=torch.float32)
        return FluxPipeline._pack_latents(noise, 1, channels, size, size)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return FluxPipeline._unpack_latents(latents, self.resolution, self.resolution, self.vae_scale_factor)

    def _transformer_inputs(self, latents, sigmas, embeds):
        batch, device, dtype = latents.shape[0], latents.device, self.transformer.dtype
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, self._latent_hw // 2, self._latent_hw // 2, device, dtype)
        context = embeds.tensors["prompt_embeds"]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32)
        return dict(
            hidden_states=latents.to(dtype),
            timestep=sigmas.to(device, torch.float32),
            guidance=guidance,
            pooled_projections=embeds.tensors["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=context.to(dtype),
            txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids,
        )
