"""Image–text cosine similarity under an open-clip model, registered as ``clip_score`` (a public CLIP, by
default OpenCLIP ViT-H-14 trained on LAION-2B) and ``hpsv2`` (Human Preference Score v2, Wu et al. 2023:
the same ViT-H-14 fine-tuned on human preferences, loaded from its checkpoint file, e.g.
``HPS_v2.1_compressed.pt``). Local weight files are read as state dicts (safetensors, or
``torch.load(weights_only=True)``)."""

from __future__ import annotations

import os

import torch

from . import register_reward, to_pil
from .loading import load_state_dict_file, pick_device


class OpenClipSimilarity:
    """``cos(image, text)`` per (image, prompt) pair under an open-clip model.

    Args:
        model_name (str): open-clip architecture name (``open_clip.list_models()``), or an ``hf-hub:`` /
            ``local-dir:`` model that carries its own weights.
        pretrained (str, optional): an open-clip pretrained tag (open-clip downloads it) or a weights file.
        device (str, optional): defaults to CUDA when available.
    """

    def __init__(
        self, model_name: str = "ViT-H-14", pretrained: str | None = "laion2b_s32b_b79k", device=None
    ):
        import open_clip

        self.device = pick_device(device)
        weights_file = pretrained if pretrained is not None and os.path.isfile(pretrained) else None
        if pretrained is None and ":" not in model_name:
            raise ValueError(
                f"{type(self).__name__}: give `pretrained` (a tag or a weights file) for {model_name!r}"
            )
        tag = None if weights_file else pretrained
        model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=tag, force_quick_gelu=_tag_needs_quick_gelu(open_clip, model_name, tag)
        )
        if weights_file:
            model.load_state_dict(load_state_dict_file(weights_file))
        self.model = model.eval().to(self.device)
        self.tokenizer = open_clip.get_tokenizer(model_name)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], **metadata) -> list[float]:
        pixels = torch.stack([self.preprocess(image) for image in to_pil(images)]).to(self.device)
        image_embeds = self.model.encode_image(pixels, normalize=True)
        text_embeds = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True)
        return (image_embeds * text_embeds).sum(dim=-1).float().cpu().tolist()


def _tag_needs_quick_gelu(open_clip, model_name: str, tag: str | None) -> bool:
    """Whether the weights of ``tag`` were trained with QuickGELU (OpenAI's CLIPs): open-clip 3 builds ``ViT-L-14``
    with plain GELU and only warns when such weights are loaded into it, which shifts every embedding."""
    return bool(tag and open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))


@register_reward("clip_score")
class ClipScore(OpenClipSimilarity):
    """CLIP score: cosine similarity in [-1, 1] (see :class:`OpenClipSimilarity` for the arguments)."""


@register_reward("hpsv2")
class HPSv2(OpenClipSimilarity):
    """HPSv2 score (≈ 0.2–0.35 for generated images): ``cos(image, text)`` under HPSv2's fine-tuned ViT-H-14.

    Args:
        checkpoint (str): the HPSv2 / HPSv2.1 checkpoint file (``{"state_dict": ...}`` or a bare state dict).
        model_name (str, default ``"ViT-H-14"``): the open-clip architecture the checkpoint fits.
        device (str, optional): defaults to CUDA when available.
    """

    def __init__(self, checkpoint: str, model_name: str = "ViT-H-14", device=None):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"hpsv2: no checkpoint file at {checkpoint!r}")
        super().__init__(model_name=model_name, pretrained=checkpoint, device=device)
