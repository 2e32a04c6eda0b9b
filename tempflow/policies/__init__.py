"""Model-family adapters (policies): SD3/SD3.5 and FLUX.1 behind one interface (see ``base.py``)."""

from __future__ import annotations

from .base import FlowPolicy, PromptEmbeds
from .flux import FluxPolicy
from .sd3 import SD3Policy

POLICY_CLASSES: dict[str, type[FlowPolicy]] = {"sd3": SD3Policy, "flux": FluxPolicy}
_PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def infer_family(model_name_or_path: str) -> str:
    """The family of a local pipeline (from its model_index.json) or, for hub ids, from the name."""
    from .base import check_model_location, read_pipeline_class_name

    check_model_location(model_name_or_path)
    class_name = read_pipeline_class_name(model_name_or_path)
    if class_name is not None:
        if class_name not in _PIPELINE_FAMILIES:
            raise ValueError(f"{model_name_or_path}: unsupported pipeline class {class_name!r}")
        return _PIPELINE_FAMILIES[class_name]
    name = str(model_name_or_path).lower()
    if "flux" in name:
        return "flux"
    if "stable-diffusion-3" in name or "sd3" in name:
        return "sd3"
    raise ValueError(f"cannot tell the model family of {model_name_or_path!r}; set model_family to sd3 or flux")


def load_policy(model_name_or_path: str, family: str = "auto", **kwargs) -> FlowPolicy:
    """Load a pipeline with ``from_pretrained`` and wrap it in its family's policy. ``model_name_or_path`` may
    also be a registered pipeline name (``shapes``, see :mod:`tempflow.registry`)."""
    from ..registry import resolve_pipeline

    model_name_or_path = resolve_pipeline(model_name_or_path)
    family = infer_family(model_name_or_path) if family == "auto" else family
    return POLICY_CLASSES[family].from_pretrained(model_name_or_path, **kwargs)


__all__ = ["FlowPolicy", "FluxPolicy", "POLICY_CLASSES", "PromptEmbeds", "SD3Policy", "infer_family", "load_policy"]
