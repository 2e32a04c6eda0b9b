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
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
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

    def _encode_edits(self, prompts: tuple[str, ...], images: tuple) -> PromptEmbeds:
        """Per (instruction, image): the prompt and the negative prompt encoded by the VL model with the image, and
        the image's packed latents."""
        rows = []
        for prompt, paths in zip(prompts, images):
            pictures = [self._source_picture(path) for path in ((paths,) if isinstance(paths, str) else paths)]
            tensors = {}
            for text, (embeds_name, mask_name) in ((prompt, ("prompt_embeds", PROMPT_MASK)),
                                                   (self.negative_prompt, (NEGATIVE, NEGATIVE_MASK))):
                embeds, mask = self.pipeline.encode_prompt(image=self._encoder_images(pictures), prompt=[text],
                                                           device=self.device,
                                                           max_sequence_length=self.max_sequence_length)
                if mask is None:
                    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
                tensors[embeds_name], tensors[mask_name] = embeds, mask
            tensors[IMAGE_LATENTS] = torch.cat([self._source_latents(picture) for picture in pictures], dim=1)
            rows.append(PromptEmbeds(tensors))
        return PromptEmbeds.cat(rows)

    def _source_picture(self, path: str):
        """The source as a PIL image at the output's aspect ratio (resized to the output size)."""
        from PIL import Image

        pixels = load_source_image(path, self.resolution, self.width)
        return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))

    def _encoder_images(self, pictures: list):
        """What the VL encoder sees: the pipeline's resize to the condition size (one image)."""
        height, width = self.condition_size
        return self.pipeline.image_processor.resize(pictures[0], height, width)

    def _source_latents(self, picture) -> torch.Tensor:
        """Packed, normalised VAE latents ``[1, tokens, 4·C]`` of one source: the pipeline encodes the image it
        resized for the VL encoder."""
        height, width = self.condition_size
        return self._vae_latents(self.pipeline.image_processor.resize(picture, height, width))

    def _vae_latents(self, picture) -> torch.Tensor:
        pipeline = self.pipeline
        height, width = self.condition_size
        vae_input = pipeline.image_processor.preprocess(picture, height, width).unsqueeze(2)
        latents = pipeline._encode_vae_image(vae_input.to(self.device, pipeline.vae.dtype), generator=None)
        channels, grid_h, grid_w = latents.shape[1], *latents.shape[3:]
        return pipeline._pack_latents(latents, 1, channels, grid_h, grid_w)

    def _unconditional_embeds(self, embeds: PromptEmbeds) -> PromptEmbeds:
        tensors = embeds.tensors
        return PromptEmbeds({"prompt_embeds": tensors[NEGATIVE], PROMPT_MASK: tensors[NEGATIVE_MASK],
                             IMAGE_LATENTS: tensors[IMAGE_LATENTS]})

    def _transformer_inputs(self, latents, sigmas, embeds):
        inputs = super()._transformer_inputs(latents, sigmas, embeds)
        source = embeds.tensors[IMAGE_LATENTS].to(inputs["hidden_states"].dtype)
        inputs["hidden_states"] = torch.cat([inputs["hidden_states"], source], dim=1)
        sources = source.shape[1] // math.prod(self.condition_grid)  # source images per row (Plus: several)
        inputs["img_shapes"] = [[(1, *self.token_grid), *[(1, *self.condition_grid)] * sources]] * len(latents)
        return inputs

    def _forward(self, model: torch.nn.Module, **inputs) -> torch.Tensor:
        """The prediction for the target tokens (the source image's come after them)."""
        return super()._forward(model, **inputs)[:, : math.prod(self.token_grid)]


class QwenImageEditPlusPolicy(QwenImageEditPolicy):
    """Qwen-Image-Edit-Plus (``QwenImageEditPlusPipeline``): one to several source images per instruction (an edit
    record's ``image`` may be a list), the VL encoder seeing each at 384² pixels and the transformer their latents at
    ``condition_area`` (the pipeline's 1024²) pixels, appended in order."""

    family = "qwen_image_edit_plus"
    pipeline_class = QwenImageEditPlusPipeline
    encoder_area = 384 * 384
    """Pixels of each source image as the VL encoder sees it (the pipeline's ``CONDITION_IMAGE_SIZE``)."""

    def _encoder_images(self, pictures: list):
        width, height, _ = calculate_dimensions(self.encoder_area, self.width / self.resolution)
        return [self.pipeline.image_processor.resize(picture, height, width) for picture in pictures]

    def _source_latents(self, picture) -> torch.Tensor:
        return self._vae_latents(picture)  # the pipeline encodes the source itself, not the VL encoder's copy
