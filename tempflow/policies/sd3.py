"""Stable Diffusion 3 / 3.5 policy: the MMDiT's inputs (latents, σ·1000, CLIP + T5 embeddings, pooled CLIP); CFG with
the empty negative prompt as in ``StableDiffusion3Pipeline``."""

from __future__ import annotations

from diffusers import StableDiffusion3Pipeline

from .base import FlowPolicy, PromptEmbeds


class SD3Policy(FlowPolicy):
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    # the joint attention's projections, named as TempFlow-GRPO's and Flow-GRPO's train_sd3 scripts name them: not
    # the second self-attention (attn2) of SD3.5-M's dual-attention blocks
    default_lora_target_modules = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
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

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.resolution // self.vae_scale_factor
        return (self.transformer.config.in_channels, size, size)

    @property
    def token_grid(self) -> tuple[int, int]:
        patch = self.transformer.config.patch_size
        return (self.latent_shape[1] // patch, self.latent_shape[2] // patch)

    def _transformer_inputs(self, latents, sigmas, embeds):
        dtype = self.transformer.dtype
        return dict(
            hidden_states=latents.to(dtype),
            timestep=self._scheduler_timesteps(sigmas, latents.device),
            encoder_hidden_states=embeds.tensors["prompt_embeds"].to(dtype),
            pooled_projections=embeds.tensors["pooled_prompt_embeds"].to(dtype),
        )
