"""PickScore (Kirstain et al., 2023), registered as ``pickscore``: a CLIP-H model fine-tuned on human
preferences between generated images. The score is ``logit_scale · cos(image, text)`` as in the PickScore
repository (≈ 18–24 for SD-class images); ``normalize=True`` divides it by 26 as Flow-GRPO's training reward
does. The processor and the model load with ``from_pretrained`` from hub ids or local directories."""

from __future__ import annotations

import torch

from . import register_reward, to_pil
from .loading import pick_device, pooled

PICKSCORE_NORMALIZER = 26.0  # Flow-GRPO's constant: brings typical scores near [0, 1]


@register_reward("pickscore")
class PickScore:
    """The PickScore of each (image, prompt) pair.

    Args:
        processor (str): hub id or directory of the CLIP processor (default: the CLIP-H one PickScore uses).
        model (str): hub id or directory of the PickScore ``CLIPModel``.
        normalize (bool, default False): divide scores by 26 (Flow-GRPO); off, they are the published scale.
        device (str, optional): defaults to CUDA when available.
    """

    def __init__(
        self,
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        model: str = "yuvalkirstain/PickScore_v1",
        normalize: bool = False,
        device: str | None = None,
    ):
        from transformers import AutoProcessor, CLIPModel

        self.device = pick_device(device)
        self.processor = AutoProcessor.from_pretrained(processor)
        self.model = CLIPModel.from_pretrained(model).eval().to(self.device)
        self.normalize = normalize

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], **metadata) -> list[float]:
        image_inputs = self.processor(images=to_pil(images), return_tensors="pt").to(self.device)
        text_inputs = self.processor(
            text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        image_embeds = pooled(self.model.get_image_features(**image_inputs))
        text_embeds = pooled(self.model.get_text_features(**text_inputs))
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        scores = self.model.logit_scale.exp() * cosine
        if self.normalize:
            scores = scores / PICKSCORE_NORMALIZER
        return scores.float().cpu().tolist()
