"""The published configs of the hub models that tempflow's recipes name: each transformer's ``config.json`` and its
scheduler's ``scheduler_config.json``, so that code which needs a model's shape but not its weights (building it on
the meta device to resolve LoRA target modules, computing its σ schedule, the GPU suite's random-weight models)
works offline. A local pipeline directory is read from disk instead (:func:`pipeline_configs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
"""stabilityai/stable-diffusion-3.5-medium's transformer (2.24 B parameters): the hub's ``transformer/config.json``.
diffusers 0.42.1 tells SD3.5-M checkpoints by their 384² = 147456 positions and 9216 = 6·1536-wide adaLN
(``infer_diffusers_model_type``, ``loaders/single_file_utils.py``) and reads the dual-attention layers and the
q/k norm off the weights."""

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
"""black-forest-labs/FLUX.1-dev's transformer (11.9 B parameters): ``FluxTransformer2DModel``'s defaults in diffusers
0.42.1 plus the guidance embedding, whose weights are how diffusers tells dev from schnell checkpoints."""

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
"""Wan-AI/Wan2.1-T2V-1.3B-Diffusers' transformer (1.42 B parameters): 30 blocks of 12 heads of 128, FFN 8960."""

WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
"""Wan-AI/Wan2.1-T2V-14B-Diffusers' transformer (14.29 B parameters)."""

QWEN_IMAGE = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
"""Qwen/Qwen-Image's transformer (20.43 B parameters): ``QwenImageTransformer2DModel``'s defaults in diffusers 0.42."""

SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False,
)
"""SD3.5's ``AutoencoderKL`` (``vae/config.json``): 16 latent channels, no quant convs (83.7 M parameters)."""

FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
"""FLUX.1's: SD3's architecture with its own latent scaling."""

SD35_SCHEDULER = dict(shift=3.0)
"""SD3.5's ``FlowMatchEulerDiscreteScheduler``: a fixed shift of 3."""

FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
"""FLUX.1-dev's: the σ shift grows with the image's token count."""

QWEN_IMAGE_SCHEDULER = dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                            time_shift_type="exponential")
"""Qwen/Qwen-Image's: an exponential shift growing with the image's token count (up to 8192 tokens) and the σ
schedule stretched to end at 0.02."""

WAN_SCHEDULER = dict(shift=3.0)
"""Wan 2.1 at 480p, stepped with Euler: its checkpoints ship UniPC with ``flow_shift`` 3.0, whose σ grid tempflow
takes (README, model families)."""


@dataclass(frozen=True)
class ModelConfigs:
    """What a model's shape is made of: its family, the transformer's diffusers class and config, the scheduler's
    config, and where they were read."""

    family: str
    transformer_class: str
    transformer: dict
    scheduler: dict = field(default_factory=dict)
    source: str = "the hub model's published configs (tempflow.model_configs)"
    vae_class: str = ""
    vae: dict = field(default_factory=dict)
    """The VAE's diffusers class and config (Wan's and Qwen-Image's are their classes' defaults)."""


_HUB = "the hub model's published configs (tempflow.model_configs)"
HUB_MODELS: dict[str, ModelConfigs] = {
    "stabilityai/stable-diffusion-3.5-medium": ModelConfigs("sd3", "SD3Transformer2DModel", SD35_MEDIUM, SD35_SCHEDULER,
                                                            _HUB, "AutoencoderKL", SD3_VAE),
    "black-forest-labs/FLUX.1-dev": ModelConfigs("flux", "FluxTransformer2DModel", FLUX_DEV, FLUX_SCHEDULER, _HUB,
                                                 "AutoencoderKL", FLUX_VAE),
    "black-forest-labs/FLUX.1-Kontext-dev": ModelConfigs("flux_kontext", "FluxTransformer2DModel", FLUX_DEV,
                                                         FLUX_SCHEDULER, _HUB, "AutoencoderKL", FLUX_VAE),
    "Qwen/Qwen-Image": ModelConfigs("qwen_image", "QwenImageTransformer2DModel", QWEN_IMAGE, QWEN_IMAGE_SCHEDULER, _HUB,
                                    "AutoencoderKLQwenImage"),
    "Qwen/Qwen-Image-Edit": ModelConfigs("qwen_image_edit", "QwenImageTransformer2DModel", QWEN_IMAGE,
                                         QWEN_IMAGE_SCHEDULER, _HUB, "AutoencoderKLQwenImage"),
    "Qwen/Qwen-Image-Edit-2509": ModelConfigs("qwen_image_edit_plus", "QwenImageTransformer2DModel", QWEN_IMAGE,
                                              QWEN_IMAGE_SCHEDULER, _HUB, "AutoencoderKLQwenImage"),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": ModelConfigs("wan", "WanTransformer3DModel", WAN_1_3B, WAN_SCHEDULER, _HUB,
                                                     "AutoencoderKLWan"),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": ModelConfigs("wan", "WanTransformer3DModel", WAN_14B, WAN_SCHEDULER, _HUB,
                                                    "AutoencoderKLWan"),
}
"""The hub models the recipes name, by hub id."""

_FAMILY_OF_PIPELINE = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "FluxKontextPipeline": "flux_kontext",
                       "QwenImagePipeline": "qwen_image", "QwenImageEditPipeline": "qwen_image_edit",
                       "QwenImageEditPlusPipeline": "qwen_image_edit_plus",
                       "WanPipeline": "wan"}


def pipeline_configs(model_name_or_path: str) -> ModelConfigs:
    """The configs of a local pipeline directory (its ``model_index.json``, ``transformer/config.json`` and
    ``scheduler/scheduler_config.json``), else of a hub id in :data:`HUB_MODELS`. Raises ``ValueError`` naming the
    model when neither holds: nothing is downloaded."""
    from .registry import resolve_pipeline

    path = Path(resolve_pipeline(model_name_or_path))
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        transformer = json.loads((path / "transformer" / "config.json").read_text())
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
        family = _FAMILY_OF_PIPELINE.get(index.get("_class_name"))
        if family is None:
            raise ValueError(f"{model_name_or_path}: unsupported pipeline class {index.get('_class_name')!r}")
        return ModelConfigs(family, index["transformer"][1], _without_metadata(transformer),
                            _without_metadata(scheduler), f"the configs in {path}")
    if model_name_or_path in HUB_MODELS:
        return HUB_MODELS[model_name_or_path]
    raise ValueError(f"no config of {model_name_or_path!r} offline: it is neither a local pipeline directory nor one "
                     f"of the hub models tempflow knows ({', '.join(sorted(HUB_MODELS))})")


def _without_metadata(config: dict) -> dict:
    """A saved config without diffusers' bookkeeping keys (``_class_name``, ``_diffusers_version``)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}
