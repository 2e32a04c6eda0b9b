"""Model-family adapters (policies): SD3/SD3.5, FLUX.1, Qwen-Image and Wan 2.1 text-to-video, and the image editors
FLUX.1 Kontext and Qwen-Image-Edit, behind one interface (see ``base.py``)."""

from __future__ import annotations

from .base import FlowPolicy, PromptEmbeds
from .flux import FluxPolicy
from .flux_kontext import FluxKontextPolicy
from .qwen_image import QwenImagePolicy
from .qwen_image_edit import QwenImageEditPlusPolicy, QwenImageEditPolicy
from .sd3 import SD3Policy
from .wan import WanPolicy

POLICY_CLASSES: dict[str, type[FlowPolicy]] = {
    "sd3": SD3Policy, "flux": FluxPolicy, "flux_kontext": FluxKontextPolicy, "qwen_image": QwenImagePolicy,
    "qwen_image_edit": QwenImageEditPolicy, "qwen_image_edit_plus": QwenImageEditPlusPolicy, "wan": WanPolicy,
}
_PIPELINE_FAMILIES = {policy.pipeline_class.__name__: family for family, policy in POLICY_CLASSES.items()}
_HUB_NAME_FAMILIES = (("kontext", "flux_kontext"), ("flux", "flux"), ("stable-diffusion-3", "sd3"), ("sd3", "sd3"),
                      ("qwen-image-edit-2509", "qwen_image_edit_plus"), ("qwen-image-edit-plus", "qwen_image_edit_plus"),
                      ("qwen-image-edit", "qwen_image_edit"), ("qwen-image", "qwen_image"), ("wan2.1", "wan"),
                      ("wan-ai", "wan"))
"""Hub ids say their family in their name (first match wins): ``Qwen/Qwen-Image``, ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``."""


def infer_family(model_name_or_path: str) -> str:
    """The family of a local pipeline (from its model_index.json) or, for hub ids, from the name."""
    from .base import check_model_location, read_pipeline_class_name

    check_model_location(model_name_or_path)
    class_name = read_pipeline_class_name(model_name_or_path)
    if class_name is not None:
        if class_name not in _PIPELINE_FAMILIES:
            raise ValueError(f"{model_name_or_path}: unsupported pipeline class {class_name!r}; supported: "
                             f"{sorted(_PIPELINE_FAMILIES)}")
        return _PIPELINE_FAMILIES[class_name]
    name = str(model_name_or_path).lower()
    for part, family in _HUB_NAME_FAMILIES:
        if part in name:
            return family
    raise ValueError(f"cannot tell the model family of {model_name_or_path!r}; set model_family to one of "
                     f"{sorted(POLICY_CLASSES)}")


def load_policy(model_name_or_path: str, family: str = "auto", **kwargs) -> FlowPolicy:
    """Load a pipeline with ``from_pretrained`` and wrap it in its family's policy. ``model_name_or_path`` may
    also be a registered pipeline name (``shapes``, see :mod:`tempflow.registry`)."""
    from ..registry import resolve_pipeline

    model_name_or_path = resolve_pipeline(model_name_or_path)
    family = infer_family(model_name_or_path) if family == "auto" else family
    return POLICY_CLASSES[family].from_pretrained(model_name_or_path, **kwargs)


__all__ = [
    "POLICY_CLASSES", "FlowPolicy", "FluxKontextPolicy", "FluxPolicy", "PromptEmbeds", "QwenImageEditPlusPolicy", "QwenImageEditPolicy",
    "QwenImagePolicy", "SD3Policy", "WanPolicy",
    "infer_family", "load_policy",
]
