"""Qwen-Image-Edit policy (image editing): Qwen-Image whose prompt is encoded by Qwen2.5-VL together with the source
image, and whose source image's VAE latents are appended to the noisy tokens, as ``QwenImageEditPipeline`` does; only
the target tokens are denoised. The negative prompt is encoded with each source image too (CFG's unconditional
branch sees the image), and both travel with the prompt's embeddings, so rollouts, the loss and evaluation condition
alike.

The source is resized to the output's aspect ratio and then, as the pipeline does, to ``condition_area`` pixels
(the pipeline's 1024² by default; Flow-GRPO's edit runs use 512²): every source of a run has one size, so their
latents batch without padding."""

from __future__ import annotations

import math

import torch
from diffusers import QwenImageEditPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

from ..editing import load_source_image
from .base import PROMPT_MASK, PromptEmbeds
from .flux_kontext import IMAGE_LATENTS
from .qwen_image import QwenImagePolicy

NEGATIVE, NEGATIVE_MASK = "negative_prompt_embeds", "negative_prompt_embeds_mask"


class QwenImageEditPolicy(QwenImagePolicy):
    family = "qwen_image_edit"
    pipeline_class = QwenImageEditPipeline
    edits = True
    condition_area = 1024 * 1024
    """Pixels of the source image as the transformer and the VL encoder see it (the pipeline's target area)."""

    @property
    def condition_size(self) -> tuple[int, int]:
        """(height, width) of the source as encoded: ``condition_area`` pixels at the output's aspect ratio."""
        width, height, _ = calculate_dimensions(self.condition_area, self.width / self.resolution)
        return height, width

    @property
    def condition_grid(self) -> tuple[int, int]:
        height, width = self.condition_size
        return height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2

    def _encode_edits(self, prompts: tuple[str, ...], images: tuple[str, ...]) -> PromptEmbeds:
        """Per (instruction, image): the prompt and the negative prompt encoded by the VL model with the image, and
        the image's packed latents."""
        from PIL import Image

        pipeline = self.pipeline
        height, width = self.condition_size
        rows = []
        for prompt, path in zip(prompts, images):
            pixels = load_source_image(path, self.resolution, self.width)  # the output's aspect ratio first
            picture = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            conditioned = pipeline.image_processor.resize(picture, height, width)
            tensors = {}
            for text, (embeds_name, mask_name) in ((prompt, ("prompt_embeds", PROMPT_MASK)),
                                                   (self.negative_prompt, (NEGATIVE, NEGATIVE_MASK))):
                embeds, mask = pipeline.encode_prompt(image=conditioned, prompt=[text], device=self.device,
                                                      max_sequence_length=self.max_sequence_length)
                if mask is None:
                    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
                tensors[embeds_name], tensors[mask_name] = embeds, mask
            vae_input = pipeline.image_processor.preprocess(conditioned, height, width).unsqueeze(2)
            latents = pipeline._encode_vae_image(vae_input.to(self.device, pipeline.vae.dtype), generator=None)
            channels, grid_h, grid_w = latents.shape[1], *latents.shape[3:]
            tensors[IMAGE_LATENTS] = pipeline._pack_latents(latents, 1, channels, grid_h, grid_w)
            rows.append(PromptEmbeds(tensors))
        return PromptEmbeds.cat(rows)

    def _unconditional_embeds(self, embeds: PromptEmbeds) -> PromptEmbeds:
        tensors = embeds.tensors
        return PromptEmbeds({"prompt_embeds": tensors[NEGATIVE], PROMPT_MASK: tensors[NEGATIVE_MASK],
                             IMAGE_LATENTS: tensors[IMAGE_LATENTS]})

    def _transformer_inputs(self, latents, sigmas, embeds):
        inputs = super()._transformer_inputs(latents, sigmas, embeds)
        source = embeds.tensors[IMAGE_LATENTS].to(inputs["hidden_states"].dtype)
        inputs["hidden_states"] = torch.cat([inputs["hidden_states"], source], dim=1)
        inputs["img_shapes"] = [[(1, *self.token_grid), (1, *self.condition_grid)]] * len(latents)
        return inputs

    def _forward(self, model: torch.nn.Module, **inputs) -> torch.Tensor:
        """The prediction for the target tokens (the source image's come after them)."""
        return super()._forward(model, **inputs)[:, : math.prod(self.token_grid)]
