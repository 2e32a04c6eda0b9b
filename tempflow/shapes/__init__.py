"""ShapesWorld: the tiny embedded world — scenes, prompts, a detector reward and a tiny SD3 pipeline."""

from pathlib import Path


def pipeline_path() -> Path:
    """Directory of the shipped, pretrained ShapesWorld ``StableDiffusion3Pipeline``."""
    path = Path(__file__).parent / "pipeline"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the ShapesWorld pipeline is missing from {path}; run `tempflow pretrain-shapes`")
    return path
