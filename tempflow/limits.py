"""The bounds that a run's and a command's inputs are held to: the pixel multiple that a model's VAE and
transformer patches impose on height and width, the largest sample sizes worth trying, text length and seeds.

Torch-free, and reading only a local pipeline's small JSON files: config validation and the command line check
sizes here before any model loads, so that a size the model cannot take is one line at once instead of a
tensor-shape traceback (or a process that grows until the kernel kills it) minutes later.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_SIDE = 4096
"""Pixels per side: four times the sizes the supported families are trained at (1024-1328 px); one 4096x4096
sample already takes 0.2 GB as float32 pixels, its latents and activations many times that."""
MAX_FRAMES = 1025
"""Video frames: 1 + 4·256, over twelve times Wan 2.1's 81."""
MAX_TEXT_TOKENS = 1024
"""Text tokens per prompt: the most that any supported family's pipeline takes (Qwen-Image's; SD3, FLUX and
Wan take 512)."""
MAX_STEPS = 1000
"""Denoising steps: the 1000 timesteps that flow-matching schedulers are trained on (``num_train_timesteps``);
the published runs take 10 to 50."""
MAX_SEED = 2**32 - 1
"""The largest seed numpy's global generator (which ``accelerate.utils.set_seed`` seeds) accepts."""
DEFAULT_PIXEL_MULTIPLE = 16
"""What every supported family's published models need: an 8x-downsampling VAE and 2x2 latent patches."""


def pixel_multiple(model_name_or_path: str, family: str = "auto") -> tuple[int, str] | None:
    """What height and width must be multiples of for this model, and why: its VAE's downsampling times its
    transformer's latent patch (or the 2x2 packing of FLUX and Qwen-Image), from a local pipeline's configs or
    a known hub model's (:func:`~tempflow.model_configs.pipeline_configs`); for another hub id, what every
    supported family's published models need. None where it cannot be known here (a path that holds no
    pipeline, or one of an unsupported class): loading the model reports those."""
    from .model_configs import pipeline_configs
    from .preflight import looks_like_hub_id
    from .registry import resolve_pipeline

    try:
        configs = pipeline_configs(model_name_or_path)
        vae = _read_json(Path(resolve_pipeline(model_name_or_path)) / "vae" / "config.json")
    except (OSError, ValueError):
        if looks_like_hub_id(str(model_name_or_path)) and not Path(model_name_or_path).exists():
            return DEFAULT_PIXEL_MULTIPLE, "the VAE's 8x downsampling times 2x2 latent patches"
        return None
    family = configs.family if family == "auto" else family
    downsampling = _vae_downsampling(vae or {"_class_name": configs.vae_class, **configs.vae})
    patch = _latent_patch(family, configs.transformer)
    return downsampling * patch, (f"{family}: the VAE's {downsampling}x downsampling times {patch}x{patch} "
                                  "latent patches")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else None


def _vae_downsampling(vae: dict) -> int:
    """The pipelines' own ``vae_scale_factor`` (spatial), from the VAE's config; 8 without one, as theirs."""
    kind = vae.get("_class_name")
    if kind == "AutoencoderKLWan":
        return int(vae.get("scale_factor_spatial", 8))
    if kind == "AutoencoderKLQwenImage":
        return 2 ** len(vae.get("temperal_downsample", [False, True, True]))
    if "block_out_channels" in vae:
        return 2 ** (len(vae["block_out_channels"]) - 1)
    return 8


def _latent_patch(family: str, transformer: dict) -> int:
    """Latent pixels per token side: SD3's and Wan's patch embedding; FLUX and Qwen-Image pack 2x2 latents."""
    patch = transformer.get("patch_size", 2)
    if family == "sd3":
        return int(patch)
    if family == "wan":
        return int(patch[1])
    return 2


def sample_size_problem(multiple: tuple[int, str] | None, resolution: int, width: int | None = None,
                        num_frames: int | None = None) -> tuple[str, str] | None:
    """The first of ``resolution`` (the height), ``width`` and ``num_frames`` that cannot be sampled, as (its
    config name, why), or None. ``multiple``: :func:`pixel_multiple`'s answer for the model."""
    height, width_pixels, frames = resolution, width or resolution, num_frames or 1
    for name, pixels in (("resolution", resolution), ("width", width)):
        if pixels is None:
            continue
        if pixels < 1:
            return name, "must be positive"
        if pixels > MAX_SIDE:
            memory = _gigabytes(height * width_pixels * frames)
            return name, (f"must be at most {MAX_SIDE} pixels: one {height}x{width_pixels} sample would take "
                          f"{memory} as float32 pixels alone, its latents and activations many times that")
        if multiple is not None and pixels % multiple[0]:
            return name, f"must be a multiple of {multiple[0]} ({multiple[1]})"
    if num_frames is not None and num_frames < 1:
        return "num_frames", "must be positive"
    if num_frames is not None and num_frames > MAX_FRAMES:
        memory = _gigabytes(height * width_pixels * frames)
        return "num_frames", (f"must be at most {MAX_FRAMES}: one video of {num_frames} frames at "
                              f"{height}x{width_pixels} would take {memory} as float32 pixels alone")
    return None


def text_length_problem(max_sequence_length: int | None) -> str | None:
    """Why ``max_sequence_length`` text tokens per prompt cannot be encoded, or None (None itself: the
    family's default)."""
    if max_sequence_length is None:
        return None
    if max_sequence_length < 1:
        return "must be positive"
    if max_sequence_length > MAX_TEXT_TOKENS:
        return f"must be at most {MAX_TEXT_TOKENS} tokens, the most any supported family's pipeline takes"
    return None


def _gigabytes(pixels: int) -> str:
    return f"{pixels * 3 * 4 / 1e9:,.1f} GB"
