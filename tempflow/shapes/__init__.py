"""ShapesWorld: the tiny embedded world — scenes, prompts, a detector reward and a tiny SD3 pipeline."""

from pathlib import Path

from ..registry import register_pipeline, register_prompt_sets


@register_pipeline("shapes")
def pipeline_path() -> Path:
    """Directory of the shipped, pretrained ShapesWorld ``StableDiffusion3Pipeline``."""
    path = Path(__file__).parent / "pipeline"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the ShapesWorld pipeline is missing from {path}; run `tempflow pretrain-shapes`")
    return path


@register_prompt_sets("shapes")
def prompt_set(name: str) -> list[dict]:
    """``shapes:train`` / ``shapes:eval``: the shipped ShapesWorld prompt sets."""
    from .world import load_prompt_set

    return load_prompt_set(name)
