"""The LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann et al.), registered as
``aesthetic``: an MLP (768→1024→128→64→16→1) on the L2-normalised CLIP ViT-L/14 image embedding, scoring
roughly 1–10 as in DDPO and Flow-GRPO. The CLIP model loads with ``from_pretrained``; the head loads from a
weights file, e.g. ``sac+logos+ava1-l14-linearMSE.pth`` of
github.com/christophschuhmann/improved-aesthetic-predictor."""

from __future__ import annotations

import torch
from torch import nn

from . import register_reward, to_pil
from .loading import load_state_dict_file, pick_device, pooled


class AestheticHead(nn.Module):
    """The predictor's MLP; the dropouts keep the original state-dict keys (``layers.0``, ``layers.2``...)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


@register_reward("aesthetic")
class AestheticScore:
    """The aesthetic score of each image (the prompt is ignored).

    Args:
        head (str): path of the MLP weights (``.pth``/``.pt`` state dict, or ``.safetensors``).
        clip_model (str): hub id or directory of the CLIP model whose image tower embeds the images.
        device (str, optional): defaults to CUDA when available.
    """

    def __init__(
        self, head: str, clip_model: str = "openai/clip-vit-large-patch14", device: str | None = None
    ):
        from transformers import AutoImageProcessor, CLIPModel

        self.device = pick_device(device)
        self.processor = AutoImageProcessor.from_pretrained(clip_model)
        # The whole CLIPModel, as DDPO and Flow-GRPO load it: a vision-only class does not read the projection
        # width of a full CLIP config, and from_pretrained would silently re-initialise the projection.
        self.clip = CLIPModel.from_pretrained(clip_model).eval().to(self.device)
        state_dict = load_state_dict_file(head)
        embed_dim = self.clip.config.projection_dim
        head_dim = state_dict["layers.0.weight"].shape[1] if "layers.0.weight" in state_dict else None
        if head_dim != embed_dim:
            raise ValueError(
                f"aesthetic head {head!r} expects {head_dim}-d embeddings; {clip_model!r} gives {embed_dim}"
            )
        self.head = AestheticHead(embed_dim)
        self.head.load_state_dict(state_dict)
        self.head.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str], **metadata) -> list[float]:
        inputs = self.processor(images=to_pil(images), return_tensors="pt").to(self.device)
        embeds = pooled(self.clip.get_image_features(**inputs))
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.head(embeds).float().cpu().tolist()
