"""Qwen-Image policy, as ``QwenImagePipeline`` samples: prompts through the pipeline's own Qwen2.5-VL encoder and
chat template (the template's prefix dropped, padding masked), 2×2-packed latents with the image RoPE shapes the
pipeline passes, true CFG with the negative prompt and its norm rescale, and the scheduler's resolution-dependent
shift (``mu`` from the image's token count, as FLUX).

Prompts of different lengths share a batch through :class:`~tempflow.policies.base.PromptEmbeds` padding and the
text mask, as in the pipeline's own batches; the mask is dropped when it masks nothing, as the pipeline does.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import QwenImagePipeline

from .base import PROMPT_MASK, FlowPolicy, PromptEmbeds, classifier_free_guidance, denormalize_latents


def rescaled_guidance(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float, uncond_gradient: bool = True):
    """Qwen-Image's true CFG: ``v_uncond + s·(v_cond − v_uncond)`` rescaled, token by token, to the norm of
    ``v_cond`` (``QwenImagePipeline.__call__``)."""
    guided = classifier_free_guidance(v_uncond, v_cond, scale, uncond_gradient)
    return guided * (v_cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))


class QwenImagePolicy(FlowPolicy):
    family = "qwen_image"
    pipeline_class = QwenImagePipeline
    # the MMDiT's attention projections of both streams and their MLPs, as TempFlow-GRPO's train_qwenimage_pr.py
    default_lora_target_modules = (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    )
    default_max_sequence_length = 512  # QwenImagePipeline.__call__'s default
    default_negative_prompt = " "  # the model card's: CFG needs a negative prompt, " " when there is none
    rectangular = True

    def _pipeline_max_sequence_length(self) -> int:
        return self.default_max_sequence_length

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        embeds, mask = self.pipeline.encode_prompt(
            prompt=prompts, device=self.pipeline.text_encoder.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # the pipeline drops a mask without padding
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return PromptEmbeds({"prompt_embeds": embeds, PROMPT_MASK: mask})

    @property
    def _latent_hw(self) -> tuple[int, int]:
        # QwenImagePipeline.prepare_latents: the VAE grid rounded down to even sizes, for 2×2 packing
        factor = self.vae_scale_factor * 2
        return 2 * (self.resolution // factor), 2 * (self.width // factor)

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    @property
    def token_grid(self) -> tuple[int, int]:
        height, width = self._latent_hw
        return height // 2, width // 2

    @classmethod
    def base_sigmas(cls, num_steps: int) -> list[float]:
        return np.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def initial_noise(self, generator: torch.Generator) -> torch.Tensor:
        channels = self.transformer.config.in_channels // 4
        height, width = self._latent_hw
        noise = torch.randn((1, 1, channels, height, width), generator=generator, dtype=torch.float32)
        return QwenImagePipeline._pack_latents(noise, 1, channels, height, width)

    def _transformer_inputs(self, latents, sigmas, embeds):
        dtype = self.transformer.dtype
        mask = embeds.tensors[PROMPT_MASK]
        return dict(
            hidden_states=latents.to(dtype),
            timestep=sigmas.to(latents.device, dtype),
            encoder_hidden_states=embeds.tensors["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, *self.token_grid)]] * len(latents),
        )

    def _guide(self, uncond, cond):
        return rescaled_guidance(uncond, cond, self.guidance_scale, self.cfg_uncond_gradient)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents de-normalised with the VAE's per-channel ``latents_mean``/``latents_std`` and decoded
        as one-frame videos, as the pipeline does; ``[B, 3, H, W]`` in ``[0, 1]``."""
        vae = self.pipeline.vae
        images = []
        with torch.no_grad():
            for chunk in self._unpack(latents).split(self.decode_batch_size):
                chunk = denormalize_latents(chunk.to(vae.dtype), vae.config)
                images.append((vae.decode(chunk, return_dict=False)[0][:, :, 0].float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return QwenImagePipeline._unpack_latents(latents, self.resolution, self.width, self.vae_scale_factor)

