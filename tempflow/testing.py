"""Tiny, randomly initialised SD3 and FLUX pipelines built offline from configs, for fast CPU tests: CLIP
tokenizers use the real BPE vocabulary shipped with open-clip, T5 tokenizers a small word-level Unigram
vocabulary, and every model is a few layers of width 8–32 whose float32 weights depend only on ``seed``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

_CLIP_MERGES = 49152 - 256 - 2  # the merges open-clip's SimpleTokenizer keeps
_T5_MAX_LENGTH = 512
_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
_DEFAULT_T5_WORDS = (
    "a an the of and with on in to next above below left right top bottom photo picture image "
    "one two three four five six seven eight nine ten "
    "red green blue yellow orange purple pink black white gray brown "
    "square circle triangle star hexagon rectangle cube sphere cat dog"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + [256 + i for i in range(len(others))])}


@functools.cache
def _clip_vocab_dir() -> tempfile.TemporaryDirectory:
    """``vocab.json`` + ``merges.txt`` built, as open-clip does, from the BPE file open-clip ships."""
    package_dir = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    with gzip.open(Path(package_dir) / "bpe_simple_vocab_16e6.txt.gz") as f:
        merges = f.read().decode("utf-8").split("\n")[1 : _CLIP_MERGES + 1]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    directory = tempfile.TemporaryDirectory(prefix="tempflow-clip-tokenizer-")
    (Path(directory.name) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (Path(directory.name) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP tokenizer (49408 tokens, bos 49406, eos = pad 49407), padding to ``max_length``."""
    return CLIPTokenizer.from_pretrained(_clip_vocab_dir().name, model_max_length=max_length)


def _t5_backend(words: tuple[str, ...]) -> Tokenizer:
    """A SentencePiece-style Unigram tokenizer: one piece per word, characters as the fallback."""
    pieces = [(t, 0.0) for t in _T5_SPECIAL_TOKENS] + [("▁", -5.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -10.0) for c in string.ascii_letters + string.digits + string.punctuation]
    backend = Tokenizer(Unigram(pieces, unk_id=_T5_SPECIAL_TOKENS.index("<unk>")))
    metaspace = {"replacement": "▁", "prepend_scheme": "always", "split": True}
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    eos_id = _T5_SPECIAL_TOKENS.index("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return backend


def build_t5_tokenizer(
    vocab_words: list[str] | None = None, model_max_length: int = _T5_MAX_LENGTH
) -> T5TokenizerFast:
    """A T5-style tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) whose vocabulary is ``vocab_words``, each one
    token, plus single ASCII characters; defaults to colours, shapes, counts and spatial words."""
    words = tuple(vocab_words) if vocab_words is not None else tuple(_DEFAULT_T5_WORDS)
    pad, eos, unk = _T5_SPECIAL_TOKENS
    return T5TokenizerFast(
        tokenizer_object=_t5_backend(words),
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        extra_ids=0,
        model_max_length=model_max_length,
    )


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


def tiny_t5_config(tokenizer: T5TokenizerFast, d_model: int) -> T5Config:
    """A two-layer T5 encoder config sized by ``d_model`` (shared by the test pipelines and ShapesWorld)."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(seed: int, tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    config = tiny_t5_config(tokenizer, d_model)
    return seeded_module(seed, lambda: T5EncoderModel(config))


def _vae(seed: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """4 latent channels, 8x downsampling as in the real models."""
    return seeded_module(
        seed,
        lambda: AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
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
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=seeded_module(seed, lambda: CLIPTextModel(_clip_text_config(tokenizer, 16))),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(seed, tokenizer_2, d_model=32),
        tokenizer_2=tokenizer_2,
    )


def save_tiny_pipeline(pipeline, directory) -> str:
    """Save ``pipeline`` so that ``<PipelineClass>.from_pretrained(directory)`` reloads it; returns the path.

    A SD3 pipeline built without T5 reloads, as the real one does, with
    ``from_pretrained(directory, text_encoder_3=None, tokenizer_3=None)``."""
    pipeline.save_pretrained(directory)
    return str(directory)


@torch.no_grad()
def rollout_and_recomputed_log_probs(policy, noise_level: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """A small branched rollout's stored log-probs and the same steps' log-probs recomputed through
    ``policy.velocity`` (what the trainer's first inner step does): equal when the step is on-policy."""
    from .rollout import RolloutEngine
    from .sampling import sde_step

    embeds = policy.encode_prompts(["a red square"])
    rows = RolloutEngine(policy, noise_level=noise_level).branched(embeds, [0], [5], 3, [0, 1], 2).transitions
    velocity = policy.velocity(rows.latents, rows.sigmas, embeds[rows.prompt_index])
    out = sde_step(rows.latents, velocity, rows.sigmas, rows.sigmas_next, noise_level, next_latents=rows.next_latents)
    return out.log_prob, rows.log_probs
