"""Stable Diffusion 3 / 3.5 policy: MMDiT velocity with classifier-free guidance as one doubled batch."""

from __future__ import annotations

import torch
from diffusers import StableDiffusion3Pipeline

from .base import FlowPolicy, PromptEmbeds, classifier_free_guidance, expand_batch


class SD3Policy(FlowPolicy):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    default_lora_target_modules = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )
    default_max_sequence_length = 256
    t5_tokenizer_attribute = "tokenizer_3"

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.pipeline.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled})

    def _negative_embeds(self) -> PromptEmbeds:
        """The empty prompt's embeddings (CFG's unconditional branch), kept on the device after first use."""
        cached = getattr(self, "_negative", None)
        if cached is None or cached.tensors["prompt_embeds"].device != self.device:
            self._negative = cached = self.encode_prompts([""])
        return cached

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.resolution // self.vae_scale_factor
        return (self.transformer.config.in_channels, size, size)

    @property
    def token_grid(self) -> tuple[int, int]:
        patch = self.transformer.config.patch_size
        return (self.latent_shape[1] // patch, self.latent_shape[2] // patch)

    @property
    def image_seq_len(self) -> int:
        height, width = self.token_grid
        return height * width

    def initial_noise(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((1, *self.latent_shape), generator=generator, dtype=torch.float32)

    def velocity(self, latents, sigmas, embeds, model=None):
        model = model or self.transformer
        batch, dtype = latents.shape[0], self.transformer.dtype
        timesteps = sigmas.to(latents.device, torch.float32) * self.pipeline.scheduler.config.num_train_timesteps
        context, pooled = embeds.tensors["prompt_embeds"], embeds.tensors["pooled_prompt_embeds"]
        conditional = dict(
            hidden_states=latents.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=context.to(dtype),
            pooled_projections=pooled.to(dtype),
        )
        if not self.do_cfg:
            prediction = self._forward(model, **conditional)
            return self._softpag_guidance(model, prediction, prediction, conditional)
        negative = self._negative_embeds()
        prediction = self._forward(
            model,
            hidden_states=torch.cat([latents, latents]).to(dtype),
            timestep=torch.cat([timesteps, timesteps]),
            encoder_hidden_states=torch.cat([expand_batch(negative.tensors["prompt_embeds"], batch), context]).to(dtype),
            pooled_projections=torch.cat([expand_batch(negative.tensors["pooled_prompt_embeds"], batch), pooled]).to(dtype),
        )
        uncond, cond = prediction.chunk(2)
        guided = classifier_free_guidance(uncond, cond, self.guidance_scale, self.cfg_uncond_gradient)
        return self._softpag_guidance(model, guided, cond, conditional)
