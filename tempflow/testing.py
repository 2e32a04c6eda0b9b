"""Tiny, randomly initialised SD3, FLUX, Qwen-Image and Wan 2.1 pipelines built offline from configs, for fast CPU
tests: CLIP tokenizers use the real BPE vocabulary shipped with open-clip, T5/UMT5 tokenizers a small word-level
Unigram vocabulary, Qwen's a small byte-level BPE vocabulary with Qwen's pre-tokenizer, and every model is a few
layers of width 8–32 whose float32 weights depend only on ``seed``.

Also real-size transformers (SD3.5-Medium, FLUX.1-dev, Wan 2.1 1.3B; Wan 14B and Qwen-Image as configs) with random
weights, built from their configs (nothing downloaded), and policies around them whose prompt embeddings are random
tensors of the real shapes (no text encoder), for the GPU tests and benchmarks; ``cut=True`` keeps the real widths
with one or two blocks, for their CPU dry run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5EncoderModel,
    T5TokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from .model_configs import (
    FLUX_DEV,
    FLUX_SCHEDULER,
    QWEN_IMAGE,
    QWEN_IMAGE_SCHEDULER,
    SD35_MEDIUM,
    WAN_1_3B,
    WAN_14B,
)
from .offline_tokenizers import build_clip_tokenizer, build_qwen_tokenizer, build_t5_tokenizer, tiny_t5_config
from .policies import FlowPolicy, FluxPolicy, PromptEmbeds, SD3Policy, WanPolicy


def seeded_module(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # eval(): from_pretrained returns eval-mode modules, so a reloaded pipeline must match this one.
        return build().float().eval()


def _clip_text_config(tokenizer: CLIPTokenizer, hidden_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooling reads the hidden state at the first eos
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(seed: int, tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    config = tiny_t5_config(tokenizer, d_model)
    return seeded_module(seed, lambda: T5EncoderModel(config))


def _vae(seed: int, scaling_factor: float, shift_factor: float, latent_channels: int = 4) -> AutoencoderKL:
    """8x downsampling as in the real models, 8 channels in 4 norm groups."""
    return seeded_module(
        seed,
        lambda: AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    )


def build_tiny_sd3_pipeline(seed: int = 0, with_t5: bool = False) -> StableDiffusion3Pipeline:
    """SD3 with two CLIP encoders (widths 8 and 16, pooled 24), an optional T5 (width 32) and a 2-layer MM-DiT;
    64x64 images by default (4x4 patches of 2x2 latents)."""
    tokenizer = build_clip_tokenizer()
    tokenizer_3 = build_t5_tokenizer() if with_t5 else None
    return StableDiffusion3Pipeline(
        transformer=seeded_module(
            seed,
            lambda: SD3Transformer2DModel(
                sample_size=8,
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=32,
                caption_projection_dim=32,
                pooled_projection_dim=24,
                pos_embed_max_size=16,
            ),
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=seeded_module(seed, lambda: CLIPTextModelWithProjection(_clip_text_config(tokenizer, 8))),
        tokenizer=tokenizer,
        text_encoder_2=seeded_module(seed, lambda: CLIPTextModelWithProjection(_clip_text_config(tokenizer, 16))),
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=_t5_encoder(seed, tokenizer_3, d_model=32) if with_t5 else None,
        tokenizer_3=tokenizer_3,
    )


TINY_MMDIT_TEXT_LEN = 5
"""Text tokens of :func:`tiny_mmdit_inputs`; the image is 4x4 tokens."""


def build_tiny_flux_transformer(seed: int = 0, num_layers: int = 2, num_single_layers: int = 2) -> FluxTransformer2DModel:
    """``num_layers`` double-stream blocks, then ``num_single_layers`` single-stream blocks (by default indices
    0, 1 and 2, 3); 2 heads of 16; takes :func:`tiny_mmdit_inputs` ``("flux", ...)``."""
    return seeded_module(
        seed,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        ),
    )


def tiny_mmdit_inputs(family: str, batch: int, seed: int = 0) -> dict:
    """Random keyword inputs for a tiny transformer of ``family`` (``"sd3"``: 4x8x8 latents, context width 32,
    pooled 24; ``"flux"``: 16 packed tokens of 16, context width 32, pooled 16, guidance 3.5), drawn from
    ``seed``; the text is :data:`TINY_MMDIT_TEXT_LEN` tokens and the image 4x4 tokens."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    text_len = TINY_MMDIT_TEXT_LEN
    sigmas = torch.rand(batch, generator=generator)
    if family == "sd3":
        return dict(hidden_states=randn(batch, 4, 8, 8), encoder_hidden_states=randn(batch, text_len, 32),
                    pooled_projections=randn(batch, 24), timestep=sigmas * 1000)
    return dict(hidden_states=randn(batch, 16, 16), encoder_hidden_states=randn(batch, text_len, 32),
                pooled_projections=randn(batch, 16), timestep=sigmas, guidance=torch.full((batch,), 3.5),
                img_ids=FluxPipeline._prepare_latent_image_ids(batch, 4, 4, "cpu", torch.float32),
                txt_ids=torch.zeros(text_len, 3))


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev-like (guidance-distilled) with a CLIP encoder of width 16, a T5 of width 32 and one double- and
    one single-stream block. Pass ``height``/``width``: FLUX's pipeline defaults to 1024x1024."""
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    return FluxPipeline(
        transformer=build_tiny_flux_transformer(seed, num_layers=1, num_single_layers=1),
        scheduler=_flux_scheduler(),
        vae=_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=seeded_module(seed, lambda: CLIPTextModel(_clip_text_config(tokenizer, 16))),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(seed, tokenizer_2, d_model=32),
        tokenizer_2=tokenizer_2,
    )


def build_tiny_flux_kontext_pipeline(seed: int = 0) -> FluxKontextPipeline:
    """FLUX.1 Kontext-like: :func:`build_tiny_flux_pipeline`'s parts in ``FluxKontextPipeline`` (the same transformer
    class; the source image's tokens are appended to the noisy ones). Call it with ``height``/``width`` and
    ``_auto_resize=False``, or it resizes the source to Kontext's preferred 1024-pixel-area sizes."""
    flux = build_tiny_flux_pipeline(seed)
    return FluxKontextPipeline(**{name: getattr(flux, name) for name in (
        "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")})


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)


# Qwen-Image's and Wan's VAE statistics (their first 4 of 16 channels): decoding must undo this normalisation
_WAN_STYLE_LATENT_STATS = dict(latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075], latents_std=[2.8184, 1.4541, 2.3275, 2.6558])


def qwen_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen/Qwen-Image's scheduler (:data:`~tempflow.model_configs.QWEN_IMAGE_SCHEDULER`)."""
    return FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)


def build_tiny_qwen_image_edit_pipeline(seed: int = 0, plus: bool = False) -> QwenImageEditPipeline:
    """Qwen-Image-Edit: :func:`build_tiny_qwen_image_pipeline`'s transformer and VAE, a tokenizer that also knows
    Qwen2.5-VL's image tokens, and a processor that turns the source image into patches for the encoder's one-block
    vision tower (whose features replace the image tokens). The pipeline encodes the source at 1024² pixels.
    ``plus``: the same parts in ``QwenImageEditPlusPipeline`` (several sources; the VL encoder sees them at 384²)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = build_qwen_tokenizer(vision=True)
    image_tokens = dict(image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    base = build_tiny_qwen_image_pipeline(seed, tokenizer=tokenizer, **image_tokens)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(max_pixels=64 * 28 * 28),
                                 tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())
    pipeline_class = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return pipeline_class(transformer=base.transformer, scheduler=base.scheduler, vae=base.vae,
                          text_encoder=base.text_encoder, tokenizer=tokenizer, processor=processor)


def build_tiny_qwen_image_pipeline(seed: int = 0, tokenizer=None, **token_ids) -> QwenImagePipeline:
    """Qwen-Image with a 2-layer Qwen2.5-VL text encoder of width 32 (its vision tower one block of 16, unused), a
    2-block transformer (2 heads of 16, RoPE axes 4/6/6), an 8× Qwen-Image VAE with 4 latent channels, and the
    real model's scheduler; 64×64 images are 4×4 packed tokens. Pass ``height``/``width`` (its default is 1024).
    ``tokenizer`` and ``token_ids`` (the encoder's image token ids) are for the edit pipeline."""
    tokenizer = tokenizer or build_qwen_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text_config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "vocab_size": len(tokenizer), "bos_token_id": None, "eos_token_id": eos,
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32},
        vocab_size=len(tokenizer), **token_ids,
    )
    return QwenImagePipeline(
        transformer=seeded_module(seed, lambda: QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        )),
        scheduler=qwen_image_scheduler(),
        vae=seeded_module(seed, lambda: AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            **_WAN_STYLE_LATENT_STATS,
        )),
        text_encoder=seeded_module(seed, lambda: Qwen2_5_VLForConditionalGeneration(text_config)),
        tokenizer=tokenizer,
    )


def build_tiny_wan_transformer(seed: int = 0, num_layers: int = 2) -> WanTransformer3DModel:
    """Wan 2.1's 3-D transformer with ``num_layers`` blocks of 2 heads of 16, 4 latent channels, text width 32."""
    return seeded_module(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True, rope_max_seq_len=32,
    ))


def build_tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """Wan 2.1 text-to-video with a 2-layer UMT5 encoder of width 32, a 2-block transformer, a Wan VAE (8× in space,
    4× in time, 4 latent channels) and the Euler flow-matching scheduler with shift 3 (the published checkpoints'
    UniPC takes the same ``flow_shift``). 13 frames of 64×64 are 4×8×8 latents, 4×4×4 tokens."""
    tokenizer = build_t5_tokenizer()
    t5 = tiny_t5_config(tokenizer, 32)
    encoder_config = UMT5Config(**{key: getattr(t5, key) for key in (
        "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
        "dropout_rate", "feed_forward_proj", "tie_word_embeddings", "pad_token_id", "eos_token_id",
        "decoder_start_token_id")})
    return WanPipeline(
        transformer=build_tiny_wan_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=seeded_module(seed, lambda: AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
            **_WAN_STYLE_LATENT_STATS,
        )),
        text_encoder=seeded_module(seed, lambda: UMT5EncoderModel(encoder_config)),
        tokenizer=tokenizer,
    )


def save_tiny_pipeline(pipeline, directory) -> str:
    """Save ``pipeline`` so that ``<PipelineClass>.from_pretrained(directory)`` reloads it; returns the path.

    A SD3 pipeline built without T5 reloads, as the real one does, with
    ``from_pretrained(directory, text_encoder_3=None, tokenizer_3=None)``."""
    pipeline.save_pretrained(directory)
    return str(directory)


REAL_SIZES = ("sd35m", "flux-dev")
"""The image sizes the GPU tests run. :func:`build_real_size_policy` also builds ``wan-1.3b`` (the GPU suite's video
step); ``wan-14b`` and ``qwen-image`` are configs only."""
_TEXT_TOKENS = {"sd35m": 77 + 256, "flux-dev": 512, "wan-1.3b": 512}  # SD3.5: CLIP 77 + T5 256; FLUX: T5; Wan: UMT5
_MODEL_CLASSES = {"sd35m": SD3Transformer2DModel, "flux-dev": FluxTransformer2DModel, "wan-1.3b": WanTransformer3DModel,
                  "wan-14b": WanTransformer3DModel, "qwen-image": QwenImageTransformer2DModel}


def real_size_config(size: str, cut: bool = False) -> dict:
    """The transformer config of ``size`` (``"sd35m"``, ``"flux-dev"``, ``"wan-1.3b"``, ``"wan-14b"`` or
    ``"qwen-image"``). ``cut``: real widths with SD3.5-M's first block (dual attention, as blocks 0–12) and last block
    (context-pre-only), or FLUX's first double and single blocks, or two blocks of the others, and SD3.5-M's position
    table cut from 384² to 64² positions (384² take 7 s on a CPU)."""
    if size == "sd35m":
        cut_to = dict(num_layers=2, dual_attention_layers=(0,), pos_embed_max_size=64)
        return {**SD35_MEDIUM, **(cut_to if cut else {})}
    if size == "flux-dev":
        return {**FLUX_DEV, **(dict(num_layers=1, num_single_layers=1) if cut else {})}
    configs = {"wan-1.3b": WAN_1_3B, "wan-14b": WAN_14B, "qwen-image": QWEN_IMAGE}
    if size in configs:
        return {**configs[size], **(dict(num_layers=2) if cut else {})}
    raise ValueError(f"unknown real size {size!r}; expected one of {list(_MODEL_CLASSES)}")


def build_real_size_transformer(
    size: str, device="cpu", dtype: torch.dtype = torch.float32, cut: bool = False, seed: int = 0
) -> torch.nn.Module:
    """Random weights drawn from ``seed``, made on ``device`` in ``dtype`` directly (FLUX.1-dev made in float32 on
    the CPU first would take 48 GB and minutes), in eval mode."""
    config = real_size_config(size, cut)
    model_class = _MODEL_CLASSES[size]
    device = torch.device(device)
    rng_devices = []  # CUDA generators whose state fork_rng restores (the CPU's it always does)
    if device.type == "cuda":
        rng_devices.append(device.index if device.index is not None else torch.cuda.current_device())
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=rng_devices), device:
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = model_class(**config)
        finally:
            torch.set_default_dtype(default_dtype)
    # SD3's position table too, as from_pretrained(dtype=...) casts it; nn.Module's own to(), since diffusers' warns
    # about modules to keep in float32 even when a model has none
    return torch.nn.Module.to(model, dtype).eval()


def build_real_size_policy(
    size: str,
    resolution: int,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    cut: bool = False,
    text_tokens: int | None = None,
    prompts: Sequence[str] = (),
    seed: int = 0,
    width: int | None = None,
    num_frames: int | None = None,
) -> FlowPolicy:
    """A policy around :func:`build_real_size_transformer` and the tiny stand-in VAE (16 latent channels, the real
    scaling factors or latent statistics) whose prompt embeddings are random tensors of the family's shapes, cached
    for ``""`` and ``prompts``: no text encoder. ``text_tokens`` replaces the real text length (SD3.5: 333, FLUX and
    Wan: 512). CFG 4.5 for SD3.5, guidance 3.5 for FLUX and CFG 5 for Wan (``width``, ``num_frames``: its video
    size), as in the recipes."""
    transformer = build_real_size_transformer(size, device, dtype, cut, seed)
    no_text = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if size == "wan-1.3b":
        return _real_size_wan_policy(transformer, resolution, width, num_frames, device, dtype, text_tokens, prompts,
                                     seed)
    if size == "sd35m":
        vae = _vae(seed, scaling_factor=1.5305, shift_factor=0.0609, latent_channels=16)
        pipeline = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                            vae=vae, text_encoder_3=None, tokenizer_3=None, **no_text)
        policy = SD3Policy(pipeline, resolution=resolution, guidance_scale=4.5)
    else:
        vae = _vae(seed, scaling_factor=0.3611, shift_factor=0.1159, latent_channels=16)
        pipeline = FluxPipeline(transformer=transformer, scheduler=_flux_scheduler(), vae=vae, **no_text)
        policy = FluxPolicy(pipeline, resolution=resolution, guidance_scale=3.5)
    vae.to(device)
    shapes = {"prompt_embeds": (1, text_tokens or _TEXT_TOKENS[size], transformer.config.joint_attention_dim),
              "pooled_prompt_embeds": (1, transformer.config.pooled_projection_dim)}
    _cache_random_embeds(policy, shapes, prompts, dtype, seed)
    return policy


def _cache_random_embeds(policy: FlowPolicy, shapes: dict, prompts: Sequence[str], dtype, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for prompt in (policy.negative_prompt, *prompts):
        policy._embed_cache[prompt] = PromptEmbeds(
            {name: torch.randn(shape, generator=generator).to(dtype) for name, shape in shapes.items()}
        )


def _real_size_wan_policy(transformer, resolution, width, num_frames, device, dtype, text_tokens, prompts, seed):
    vae = seeded_module(seed, lambda: AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                       temperal_downsample=[False, True, True]))
    pipeline = WanPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                           vae=vae.to(device), text_encoder=None, tokenizer=None)
    policy = WanPolicy(pipeline, resolution=resolution, width=width, num_frames=num_frames, guidance_scale=5.0)
    shapes = {"prompt_embeds": (1, text_tokens or _TEXT_TOKENS["wan-1.3b"], transformer.config.text_dim)}
    _cache_random_embeds(policy, shapes, prompts, dtype, seed)
    return policy


@torch.no_grad()
def rollout_and_recomputed_log_probs(policy, noise_level: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """A small branched rollout's stored log-probs and the same steps' log-probs recomputed through
    ``policy.velocity`` (what the trainer's first inner step does): equal when the step is on-policy."""
    from .rollout import RolloutEngine

    embeds = policy.encode_prompts(["a red square"])
    engine = RolloutEngine(policy, noise_level=noise_level)
    rows = engine.branched(embeds, [0], [5], 3, [0, 1], 2).transitions
    velocity = policy.velocity(rows.latents, rows.sigmas, embeds[rows.prompt_index])
    out = engine.step(rows.latents, velocity, rows.sigmas, rows.sigmas_next, next_latents=rows.next_latents)
    return out.log_prob, rows.log_probs


@contextlib.contextmanager
def token_pruning(transformer: torch.nn.Module, family: str, pruning):
    """``apply_token_pruning`` for the duration of a ``with`` block; yields the pruner."""
    from .attention.pruning import apply_token_pruning, remove_token_pruning

    pruner = apply_token_pruning(transformer, family, pruning)
    try:
        yield pruner
    finally:
        remove_token_pruning(transformer)
