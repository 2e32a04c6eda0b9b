"""Build and pretrain ShapesWorld's tiny but real ``StableDiffusion3Pipeline`` (the shipped ``pipeline/``).

Everything is made from scratch and offline, from a seed: a CLIP-style BPE tokenizer trained on the prompt
vocabulary (shared by both CLIP encoders), a T5 tokenizer of the same words, two tiny CLIP text encoders and a
tiny T5 encoder (random and frozen), a small ``AutoencoderKL`` (4x downsampling: 64x64 images, 4x16x16
latents) and a small MM-DiT. Pretraining has two stages, on scenes rendered on the fly by
:func:`tempflow.shapes.world.render_scene` for the prompts of the shipped train set:

1. the VAE learns to reconstruct scenes (MSE and a tiny KL term); its ``scaling_factor`` and
   ``shift_factor`` are then set from the statistics of its latents, as in SD3;
2. the transformer learns rectified flow (``x_σ = (1 − σ)·x₀ + σ·ε``, target ``ε − x₀``, logit-normal σ) with
   10% of the captions dropped to the empty prompt for classifier-free guidance, and an EMA of its weights
   is what gets saved.

``--init-from`` continues the transformer of a saved pipeline instead (its VAE and text encoders are kept), and
``--unmentioned-object-rate`` adds objects that the captions leave out, to build bases with a known flaw.

:func:`evaluate_pipeline` scores a saved pipeline on the held-out eval prompts with the tempflow SD3 policy,
ODE rollouts and the ShapesWorld detector. ``python -m tempflow.shapes.pretrain`` (``tempflow
pretrain-shapes``) runs the whole thing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ..offline_tokenizers import build_t5_tokenizer, tiny_t5_config
from .detector import strict_score
from .world import BACKGROUND, COLORS, MAX_OBJECTS, SHAPES, TASKS, VOCABULARY, load_prompt_set, render_scene

IMAGE_SIZE = 64
LATENT_CHANNELS = 4
VAE_CHANNELS = (16, 32, 64)  # three levels: 4x downsampling, 16x16 latents
CLIP_MAX_LENGTH = 16  # the longest prompt is 14 words (one token each) plus bos and eos
MAX_SEQUENCE_LENGTH = 8  # T5 tokens (CLIP sees the whole prompt); saved as tokenizer_3's model_max_length
CLIP_WIDTH = 64
JOINT_ATTENTION_DIM = 128  # the T5 width; the two CLIP widths, summed, are zero-padded up to it
TRANSFORMER_LAYERS = 6
PATCH_SIZE = 4  # 4x4 latent patches: 16 image tokens, 2.5x cheaper per step than 2x2 at equal accuracy per second
ATTENTION_HEADS, ATTENTION_HEAD_DIM = 4, 32
SCHEDULER_SHIFT = 3.0
CAPTION_DROPOUT = 0.1
VAE_KL_WEIGHT = 1e-6
VAE_CROP_SIZE = 32
CROP_FRACTION = 0.8  # of the VAE steps; the rest see whole scenes
VAE_FOREGROUND_WEIGHT = 5.0
EMA_DECAY = 0.999
MAX_SCENE_POOL = 16384  # encoded scenes the transformer trains on
DEFAULT_VAE_STEPS, DEFAULT_VAE_BATCH_SIZE = 600, 32
DEFAULT_TRANSFORMER_STEPS, DEFAULT_BATCH_SIZE = 10000, 32
TRANSFORMER_LR = 3e-3
RECOMMENDED_GUIDANCE_SCALE = 4.5
RECOMMENDED_NUM_STEPS = 20

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
BACKGROUND_PIXEL = torch.tensor(BACKGROUND).float().div(127.5).sub(1).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------- components


def build_clip_tokenizer(words=VOCABULARY, max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP-style byte-level BPE tokenizer whose merges are learned from ``words``: each word is one token,
    any other text falls back to byte pieces. The vocabulary is laid out as CLIP's is (bytes, bytes that end a
    word, merges, then ``<|startoftext|>`` and ``<|endoftext|>``, the latter also padding)."""
    byte_chars = list(bytes_to_unicode().values())
    backend = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, end_of_word_suffix="</w>", initial_alphabet=byte_chars, show_progress=False
    )
    backend.train_from_iterator(words, trainer)
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in json.loads(backend.to_str())["model"]["merges"]]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges] + [_BOS, _EOS]
    with tempfile.TemporaryDirectory(prefix="tempflow-shapes-clip-tokenizer-") as directory:
        (Path(directory) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (Path(directory) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(directory, model_max_length=max_length, pad_token=_EOS)


def _clip_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_WIDTH,
        intermediate_size=4 * CLIP_WIDTH,
        projection_dim=CLIP_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output is read at the first eos
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def _t5_encoder(tokenizer) -> T5EncoderModel:
    return T5EncoderModel(tiny_t5_config(tokenizer, JOINT_ATTENTION_DIM))


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # set from the latent statistics after the VAE is trained
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def _transformer(patch_size: int = PATCH_SIZE) -> SD3Transformer2DModel:
    latent_size = IMAGE_SIZE // 2 ** (len(VAE_CHANNELS) - 1)
    if latent_size % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the {latent_size}x{latent_size} latent grid")
    return SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=patch_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=TRANSFORMER_LAYERS,
        attention_head_dim=ATTENTION_HEAD_DIM,
        num_attention_heads=ATTENTION_HEADS,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        caption_projection_dim=ATTENTION_HEADS * ATTENTION_HEAD_DIM,
        pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=latent_size,  # the sin-cos table; a larger one would only add to the saved size
        qk_norm="rms_norm",  # as SD3.5
    )


def build_shapes_pipeline(seed: int = 0, patch_size: int = PATCH_SIZE) -> StableDiffusion3Pipeline:
    """The untrained ShapesWorld pipeline: every weight is a pure function of ``seed`` (float32, eval mode);
    ``patch_size`` 2 gives 64 image tokens instead of 16."""
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer(list(VOCABULARY), model_max_length=MAX_SEQUENCE_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {
            "text_encoder": _clip_text_encoder(clip_tokenizer),
            "text_encoder_2": _clip_text_encoder(clip_tokenizer),
            "text_encoder_3": _t5_encoder(t5_tokenizer),
            "vae": _vae(),
            "transformer": _transformer(patch_size),
        }
    for module in modules.values():
        module.float().eval().requires_grad_(False)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        tokenizer=clip_tokenizer,
        tokenizer_2=copy.deepcopy(clip_tokenizer),
        tokenizer_3=t5_tokenizer,
        **modules,
    )


# ----------------------------------------------------------------------------------------------------- data


class SceneStream:
    """Prompts of the shipped train set with fresh random renderings, drawn from a seeded numpy generator.

    With ``unmentioned_object_rate`` q > 0, each scene gets, with probability q, one extra object of a random
    shape and colour that its caption does not mention: the incomplete captions of web alt-text, which name the
    subject and leave the rest out. A model trained on them adds unrequested objects to some of its images, a
    flaw that GenEval-style strict scoring fails and the detector's partial reward penalises (at the demo's
    budget RL did not remove it; see BENCHMARKS.md).
    """

    def __init__(self, seed: int, unmentioned_object_rate: float = 0.0):
        if not 0.0 <= unmentioned_object_rate <= 1.0:
            raise ValueError(f"unmentioned_object_rate must be in [0, 1], got {unmentioned_object_rate}")
        self.rng = np.random.default_rng(seed)
        self.entries = load_prompt_set("train")
        self.unmentioned_object_rate = unmentioned_object_rate

    def next_batch(self, batch_size: int) -> tuple[list[str], torch.Tensor]:
        """``batch_size`` prompts and their renderings ``[B, 3, H, W]`` in ``[-1, 1]``."""
        picks = [self.entries[i] for i in self.rng.integers(len(self.entries), size=batch_size)]
        return [p["prompt"] for p in picks], render_images([self.scene_spec(p["spec"]) for p in picks], self.rng)

    def scene_spec(self, spec: dict) -> dict:
        """What gets drawn for a caption's ``spec``: the spec itself, or it plus an unmentioned object (not in
        scenes that already hold the world's maximum of four)."""
        if not self.unmentioned_object_rate or self.rng.random() >= self.unmentioned_object_rate:
            return spec  # (no draw at rate 0: the clean stream is the one the shipped base was trained on)
        if sum(o["count"] for o in spec["objects"]) >= MAX_OBJECTS:
            return spec
        extra = {"shape": str(self.rng.choice(SHAPES)), "color": str(self.rng.choice(list(COLORS))), "count": 1}
        return {**spec, "objects": [*spec["objects"], extra]}


def render_images(specs: list[dict], rng: np.random.Generator) -> torch.Tensor:
    arrays = np.stack([render_scene(spec, rng, IMAGE_SIZE) for spec in specs])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8_arrays(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in ``[-1, 1]`` → ``[B, H, W, 3]`` uint8."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------------ schedules


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_fraction: float = 0.1) -> float:
    """Learning-rate multiplier: linear warmup, then a cosine decay to ``final_fraction``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float = EMA_DECAY) -> None:
    """EMA whose decay ramps up from 0, so the average forgets the random initialisation quickly."""
    decay = min(decay, (1 + step) / (10 + step))
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)


def _progress(iterable, description: str, enabled: bool):
    return tqdm(iterable, desc=description, disable=not enabled, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------ VAE


def random_crops(images: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One random ``size``x``size`` crop per image, at a multiple of 4 pixels (the latent grid)."""
    corners = rng.integers(0, (images.shape[-1] - size) // 4 + 1, size=(len(images), 2)) * 4
    return torch.stack([image[:, y : y + size, x : x + size] for image, (y, x) in zip(images, corners)])


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """MSE with the shape pixels weighted up: they cover a tenth of a scene but carry all of its content."""
    foreground = (images - BACKGROUND_PIXEL.to(images)).abs().amax(dim=1, keepdim=True) > 0.05
    weights = 1 + (VAE_FOREGROUND_WEIGHT - 1) * foreground.float()
    return (weights * (reconstruction - images) ** 2).mean()


def train_vae(
    vae: AutoencoderKL,
    scenes: SceneStream,
    steps: int,
    batch_size: int,
    device: str,
    lr: float = 2e-3,
    crop_size: int = VAE_CROP_SIZE,
    progress: bool = True,
) -> dict:
    """Reconstruction training with a foreground-weighted MSE and a tiny KL term, on random crops (the VAE is
    convolutional and crops are cheaper) and then, for the last steps, on whole scenes at the same cost per
    step: its group norms see whole-image statistics at inference, and crops alone leave a tinted background.
    Returns the final smoothed losses."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, steps // 20))
    smoothed_loss = None
    bar = _progress(range(steps), "VAE", progress)
    for step in bar:
        if step < CROP_FRACTION * steps:
            images = random_crops(scenes.next_batch(batch_size)[1], crop_size, scenes.rng).to(device)
        else:
            images = scenes.next_batch(max(1, batch_size * crop_size**2 // IMAGE_SIZE**2))[1].to(device)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / images[0].numel()
        loss = reconstruction_loss(reconstruction, images) + VAE_KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        smoothed_loss = loss.item() if smoothed_loss is None else 0.98 * smoothed_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed_loss:.5f}", kl=f"{kl.item():.2f}")
    vae.eval().requires_grad_(False)
    return {"vae_loss": smoothed_loss, "vae_kl": kl.item()}


@torch.no_grad()
def measure_vae(vae: AutoencoderKL, seed: int, num_scenes: int, device: str) -> dict:
    """Latent mean and std (for ``shift_factor`` and ``scaling_factor``) and the detector's strict accuracy
    on reconstructions of ``num_scenes`` held-out renderings of the eval prompts."""
    rng = np.random.default_rng(seed)
    entries = load_prompt_set("eval")
    specs = [entries[i % len(entries)]["spec"] for i in range(num_scenes)]
    latents, correct = [], []
    for start in range(0, num_scenes, 50):
        chunk = specs[start : start + 50]
        images = render_images(chunk, rng).to(device)
        chunk_latents = vae.encode(images).latent_dist.sample()
        reconstructions = to_uint8_arrays(vae.decode(chunk_latents).sample)
        latents.append(chunk_latents.cpu())
        correct += [strict_score(image, spec) for image, spec in zip(reconstructions, chunk)]
    latents = torch.cat(latents)
    return {
        "latent_mean": latents.mean().item(),
        "latent_std": latents.std().item(),
        "vae_reconstruction_strict": float(np.mean(correct)),
    }


# ---------------------------------------------------------------------------------------------- transformer


@torch.no_grad()
def encode_prompt_table(pipeline: StableDiffusion3Pipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` and ``pooled_prompt_embeds`` of each prompt (rows in the order of ``prompts``),
    through the pipeline's own ``encode_prompt`` so that training sees what sampling will."""
    embeds, pooled = [], []
    for start in range(0, len(prompts), 256):
        chunk_embeds, _, chunk_pooled, _ = pipeline.encode_prompt(
            prompts[start : start + 256],
            None,
            None,
            device=pipeline.transformer.device,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        embeds.append(chunk_embeds)
        pooled.append(chunk_pooled)
    return {"prompt_embeds": torch.cat(embeds), "pooled_prompt_embeds": torch.cat(pooled)}


def sample_sigmas(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal σ (SD3's training distribution): most weight in the middle of the path."""
    return torch.sigmoid(torch.randn(batch_size, generator=generator))


@torch.no_grad()
def encode_scene_pool(
    vae: AutoencoderKL, scenes: SceneStream, pool_size: int, device: str, progress: bool = True
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Render and encode ``pool_size`` scenes once: their prompts and the mean and std of their latent
    posteriors. Encoding every training batch afresh would cost as much as the transformer step itself."""
    prompts, means, stds = [], [], []
    for start in _progress(range(0, pool_size, 64), "encoding scenes", progress):
        batch_prompts, images = scenes.next_batch(min(64, pool_size - start))
        posterior = vae.encode(images.to(device)).latent_dist
        prompts += batch_prompts
        means.append(posterior.mean)
        stds.append(posterior.std)
    return prompts, torch.cat(means), torch.cat(stds)


def train_transformer(
    pipeline: StableDiffusion3Pipeline,
    scenes: SceneStream,
    steps: int,
    batch_size: int,
    device: str,
    seed: int,
    pool_size: int = 16384,
    lr: float = TRANSFORMER_LR,
    progress: bool = True,
    snapshot_every: int = 0,
    on_snapshot=None,
) -> tuple[SD3Transformer2DModel, dict]:
    """Rectified-flow training of ``pipeline.transformer`` on a pool of encoded scenes (a fresh posterior
    sample each time a scene is drawn); returns the EMA copy of the transformer and the final smoothed loss.
    Every ``snapshot_every`` steps (0: never) ``on_snapshot(step, ema)`` is called."""
    transformer, vae = pipeline.transformer, pipeline.vae
    pool_prompts, pool_means, pool_stds = encode_scene_pool(vae, scenes, pool_size, device, progress)
    prompts = sorted(set(pool_prompts) | {""})
    row_of = {prompt: row for row, prompt in enumerate(prompts)}
    pool_rows = torch.tensor([row_of[p] for p in pool_prompts])
    table = encode_prompt_table(pipeline, prompts)
    ema = copy.deepcopy(transformer).requires_grad_(False)
    transformer.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, steps // 20))
    generator = torch.Generator().manual_seed(seed)
    empty_row = row_of[""]
    smoothed_loss = None
    bar = _progress(range(steps), "transformer", progress)
    for step in bar:
        picks = torch.randint(len(pool_prompts), (batch_size,), generator=generator)
        dropped = torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT
        rows = torch.where(dropped, empty_row, pool_rows[picks]).to(device)
        posterior_noise = torch.randn(pool_means[picks].shape, generator=generator).to(device)
        clean = pool_means[picks] + pool_stds[picks] * posterior_noise
        clean = (clean - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(clean.shape, generator=generator).to(device)
        sigmas = sample_sigmas(batch_size, generator).to(device)
        noisy = (1 - sigmas[:, None, None, None]) * clean + sigmas[:, None, None, None] * noise
        prediction = transformer(
            hidden_states=noisy,
            timestep=sigmas * pipeline.scheduler.config.num_train_timesteps,
            encoder_hidden_states=table["prompt_embeds"][rows],
            pooled_projections=table["pooled_prompt_embeds"][rows],
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(prediction, noise - clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        update_ema(ema, transformer, step)
        if snapshot_every and on_snapshot is not None and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            on_snapshot(step + 1, ema)
        smoothed_loss = loss.item() if smoothed_loss is None else 0.98 * smoothed_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed_loss:.4f}")
    transformer.eval().requires_grad_(False)
    return ema.eval(), {"flow_loss": smoothed_loss}


# ---------------------------------------------------------------------------------------------- pretraining


def pretrain_shapes(
    output_dir: str | Path,
    seed: int = 0,
    vae_steps: int = DEFAULT_VAE_STEPS,
    transformer_steps: int = DEFAULT_TRANSFORMER_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    progress: bool = True,
    vae_batch_size: int = DEFAULT_VAE_BATCH_SIZE,
    vae_eval_scenes: int = 200,
    snapshot_every: int = 0,
    init_from: str | Path | None = None,
    unmentioned_object_rate: float = 0.0,
    transformer_lr: float = TRANSFORMER_LR,
    patch_size: int | None = None,
) -> dict:
    """Build the pipeline from ``seed``, train the VAE then the transformer, set the VAE's latent scaling and
    ``save_pretrained`` the result (EMA transformer weights) to ``output_dir``; returns the measured metrics.
    With ``snapshot_every``, intermediate pipelines are saved beside it as ``<output_dir>-step<N>``.

    ``init_from`` continues from a saved pipeline instead: its VAE and text encoders are kept as they are and
    only the transformer trains, ``transformer_steps`` more steps; with a ``patch_size`` other than the saved
    transformer's, that transformer starts afresh (from ``seed``) at the new patch size on the kept VAE and text
    encoders. ``unmentioned_object_rate`` sets the share of training scenes with an object their caption leaves
    out (see :class:`SceneStream`).
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    metrics = {}
    if init_from is None:
        pipeline = build_shapes_pipeline(seed, patch_size or PATCH_SIZE).to(device)
        metrics.update(train_vae(pipeline.vae, SceneStream(seed + 1), vae_steps, vae_batch_size, device, progress=progress))
        metrics.update(measure_vae(pipeline.vae, seed + 2, vae_eval_scenes, device))
        pipeline.vae.register_to_config(
            scaling_factor=1 / metrics["latent_std"], shift_factor=metrics["latent_mean"]
        )
    else:
        if not Path(init_from, "model_index.json").is_file():
            raise FileNotFoundError(f"init_from {str(init_from)!r} is not a saved pipeline (no model_index.json)")
        pipeline = StableDiffusion3Pipeline.from_pretrained(init_from)
        if patch_size is not None and patch_size != pipeline.transformer.config.patch_size:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                pipeline.transformer = _transformer(patch_size).float().eval().requires_grad_(False)
        pipeline = pipeline.to(device)
    metrics["vae_seconds"] = time.perf_counter() - started

    def save_snapshot(step: int, ema: SD3Transformer2DModel) -> None:
        snapshot = copy.copy(pipeline)
        snapshot.transformer = ema
        snapshot.save_pretrained(f"{output_dir}-step{step}")

    pipeline.transformer, flow_metrics = train_transformer(
        pipeline,
        SceneStream(seed + 3, unmentioned_object_rate),
        transformer_steps,
        batch_size,
        device,
        seed=seed,
        pool_size=min(MAX_SCENE_POOL, transformer_steps * batch_size),
        lr=transformer_lr,
        progress=progress,
        snapshot_every=snapshot_every,
        on_snapshot=save_snapshot,
    )
    metrics.update(flow_metrics)
    pipeline.to("cpu").save_pretrained(output_dir)
    metrics["seconds"] = time.perf_counter() - started
    metrics["transformer_seconds"] = metrics["seconds"] - metrics["vae_seconds"]
    return metrics


# ----------------------------------------------------------------------------------------------- evaluation


def evaluate_pipeline(
    path: str | Path,
    guidance_scale: float = RECOMMENDED_GUIDANCE_SCALE,
    num_steps: int = RECOMMENDED_NUM_STEPS,
    num_prompts: int = 200,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Strict accuracy and mean partial reward on the first ``num_prompts`` held-out eval prompts, one ODE
    sample each (seeds ``seed + i``), with the tempflow SD3 policy; also the strict accuracy per task."""
    from tempflow.policies import load_policy
    from tempflow.rollout import RolloutEngine

    from .reward import shapes_reward, shapes_strict_reward

    entries = load_prompt_set("eval")[:num_prompts]
    prompts, specs = [e["prompt"] for e in entries], [e["spec"] for e in entries]
    policy = load_policy(
        str(path), resolution=IMAGE_SIZE, guidance_scale=guidance_scale, max_sequence_length=max_sequence_length
    ).to(device)
    engine = RolloutEngine(policy, noise_level=0.7, batch_size=64)
    embeds = policy.encode_prompts(prompts)
    latents = engine.sample(embeds, list(range(len(prompts))), [seed + i for i in range(len(prompts))], num_steps)
    images = policy.decode(latents)
    strict = shapes_strict_reward(images, prompts, spec=specs)
    partial = shapes_reward(images, prompts, spec=specs)
    by_task = defaultdict(list)
    for spec, score in zip(specs, strict):
        by_task[spec["task"]].append(score)
    return {
        "strict_accuracy": float(np.mean(strict)),
        "partial": float(np.mean(partial)),
        "per_task": {task: float(np.mean(by_task[task])) for task in TASKS if by_task[task]},
    }


def main(argv: list[str] | None = None) -> int:
    """``tempflow pretrain-shapes``: pretrain, save, evaluate and print the metrics as JSON; returns 0."""
    parser = argparse.ArgumentParser(
        prog="tempflow pretrain-shapes",
        description="Pretrain ShapesWorld's tiny StableDiffusion3Pipeline from scratch on rendered scenes, save "
        "it with save_pretrained and report its held-out accuracy.",
    )
    parser.add_argument("--output-dir", default="outputs/shapes-pipeline", help="where to save the pipeline")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the rendered data")
    parser.add_argument("--vae-steps", type=int, default=DEFAULT_VAE_STEPS)
    parser.add_argument("--transformer-steps", type=int, default=DEFAULT_TRANSFORMER_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="scenes per transformer step")
    parser.add_argument("--vae-batch-size", type=int, default=DEFAULT_VAE_BATCH_SIZE, help="crops per VAE step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--snapshot-every", type=int, default=0, help="also save the pipeline every N transformer steps"
    )
    parser.add_argument(
        "--init-from", default=None,
        help="continue from this saved pipeline: keep its VAE and text encoders, train only the transformer",
    )
    parser.add_argument(
        "--unmentioned-object-rate", type=float, default=0.0,
        help="share of training scenes with one extra object that the caption leaves out (incomplete captions)",
    )
    parser.add_argument("--transformer-lr", type=float, default=TRANSFORMER_LR, help="peak transformer learning rate")
    parser.add_argument(
        "--patch-size", type=int, default=None,
        help=f"latent patch size of the transformer (default {PATCH_SIZE}: 16 image tokens; 2: 64); with --init-from, "
        "a different size trains a new transformer on the kept VAE and text encoders",
    )
    parser.add_argument("--skip-eval", action="store_true", help="do not evaluate the saved pipeline")
    args = parser.parse_args(argv)
    metrics = pretrain_shapes(
        args.output_dir,
        seed=args.seed,
        vae_steps=args.vae_steps,
        transformer_steps=args.transformer_steps,
        batch_size=args.batch_size,
        vae_batch_size=args.vae_batch_size,
        device=args.device,
        snapshot_every=args.snapshot_every,
        init_from=args.init_from,
        unmentioned_object_rate=args.unmentioned_object_rate,
        transformer_lr=args.transformer_lr,
        patch_size=args.patch_size,
    )
    if not args.skip_eval:
        metrics["eval"] = evaluate_pipeline(args.output_dir, device=args.device)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
