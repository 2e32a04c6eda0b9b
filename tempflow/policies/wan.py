"""Wan 2.1 text-to-video policy (1.3B and 14B), as ``WanPipeline`` samples: UMT5 prompt embeddings padded with zeros
to ``max_sequence_length``, latents ``[C, 1 + (frames − 1)/4, H/8, W/8]``, CFG with the negative prompt, the
scheduler's σ grid with its shift, and decoding through the VAE's ``latents_mean``/``latents_std`` to frames
``[F, 3, H, W]``, a few videos at a time (a video's decoded frames dwarf its latents).

The published checkpoints ship a ``UniPCMultistepScheduler`` (``flow_shift`` 3.0 at 480p, 5.0 at 720p): tempflow
takes its flow σ grid and steps it with the Euler ODE / SDE steps that RL needs (DESIGN §2), so its samples match
the stock pipeline's only under the Euler scheduler, ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``.
"""

from __future__ import annotations

import torch
from diffusers import WanPipeline

from .base import FlowPolicy, PromptEmbeds, denormalize_latents


class WanPolicy(FlowPolicy):
    family = "wan"
    pipeline_class = WanPipeline
    default_lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention of every block
    default_max_sequence_length = 512  # WanPipeline.__call__'s default
    t5_tokenizer_attribute = "tokenizer"
    rectangular = True
    video = True
    default_decode_batch_size = 1
    default_num_frames = 81  # the model card's (5 s at 16 fps)
    frame_rate = 16

    def __init__(self, pipeline, *args, **kwargs):
        super().__init__(pipeline, *args, **kwargs)
        self.num_frames = self.num_frames or self.default_num_frames
        temporal, spatial = self.pipeline.vae_scale_factor_temporal, self.pipeline.vae_scale_factor_spatial
        if self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise ValueError(f"wan: num_frames must be 1 + a multiple of {temporal} (e.g. 81), got {self.num_frames}")
        multiple = spatial * self.transformer.config.patch_size[1]
        if self.resolution % multiple or self.width % multiple:
            raise ValueError(f"wan: height (resolution) and width must be multiples of {multiple}, got "
                             f"{self.resolution} and {self.width}")

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            device=self.pipeline.text_encoder.device,
        )
        return PromptEmbeds({"prompt_embeds": embeds})

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        spatial = self.pipeline.vae_scale_factor_spatial
        frames = (self.num_frames - 1) // self.pipeline.vae_scale_factor_temporal + 1
        return (self.transformer.config.in_channels, frames, self.resolution // spatial, self.width // spatial)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Tokens per (frame, height, width) after the transformer's 3-D patches."""
        return tuple(size // patch for size, patch in zip(self.latent_shape[1:], self.transformer.config.patch_size))

    def _transformer_inputs(self, latents, sigmas, embeds):
        dtype = self.transformer.dtype
        return dict(
            hidden_states=latents.to(dtype),
            timestep=self._scheduler_timesteps(sigmas, latents.device),
            encoder_hidden_states=embeds.tensors["prompt_embeds"].to(dtype),
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → videos ``[B, F, 3, H, W]`` in ``[0, 1]``, ``decode_batch_size`` videos at a time."""
        vae = self.pipeline.vae
        videos = []
        with torch.no_grad():
            for chunk in latents.split(self.decode_batch_size):
                chunk = denormalize_latents(chunk.to(vae.device, vae.dtype), vae.config)
                frames = vae.decode(chunk, return_dict=False)[0].float()  # [B, 3, F, H, W] in [-1, 1]
                videos.append((frames / 2 + 0.5).clamp(0, 1).transpose(1, 2))
        return torch.cat(videos)
