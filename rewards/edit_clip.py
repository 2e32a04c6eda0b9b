"""Rewards for image editing under an open-clip model, from the output, its source image (``source_images``, which
the trainer hands every reward of an edit prompt) and the instruction:

- ``edit_consistency``: ``cos(E(output), E(source))``, how much of the source the edit kept (Flow-GRPO's
  ``image_similarity`` for its Kontext and Qwen-Image-Edit runs, which weigh it against a task reward so that an
  edit does not redraw the whole picture);
- ``edit_direction``: ``cos(E(output) − E(source), E(instruction))``, whether the image moved the way the
  instruction says (CLIP directional similarity, Gal et al. 2021, with the instruction as the text direction).

Both need the edit's source images and load CLIP like ``clip_score`` (a pretrained tag or a local weights file), by
default OpenAI's ViT-L/14 as Flow-GRPO does."""

from __future__ import annotations

import torch

from . import register_reward, to_pil
from .clip_similarity import OpenClipSimilarity


class _EditClip(OpenClipSimilarity):
    """Defaults to OpenAI's CLIP ViT-L/14, the model of Flow-GRPO's ``image_similarity``."""

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = "openai", device=None):
        super().__init__(model_name=model_name, pretrained=pretrained, device=device)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in to_pil(images)]).to(self.device)
        return self.model.encode_image(pixels, normalize=True)

    def _features(self, images, source_images):
        if source_images is None:
            raise ValueError(f"{type(self).__name__} scores edits: its prompts need source images (edit records)")
        return self._image_features(images), self._image_features(source_images)


@register_reward("edit_consistency")
class EditConsistency(_EditClip):
    """``cos(E(output), E(source))`` in [-1, 1] (arguments as ``clip_score``)."""

    @torch.no_grad()
    def __call__(self, images, prompts, source_images=None, **metadata) -> list[float]:
        output, source = self._features(images, source_images)
        return (output * source).sum(dim=-1).float().cpu().tolist()


@register_reward("edit_direction")
class EditDirection(_EditClip):
    """``cos(E(output) − E(source), E(instruction))`` in [-1, 1]; 0 for an output identical to its source
    (arguments as ``clip_score``)."""

    @torch.no_grad()
    def __call__(self, images, prompts, source_images=None, **metadata) -> list[float]:
        output, source = self._features(images, source_images)
        change = output - source
        text = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True)
        norms = change.norm(dim=-1)
        cosines = (change * text).sum(dim=-1) / norms.clamp(min=1e-12)
        return torch.where(norms > 1e-6, cosines, torch.zeros_like(cosines)).float().cpu().tolist()
