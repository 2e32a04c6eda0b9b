"""``tempflow plan``: the memory a recipe needs on each GPU, per layout (DDP, DeepSpeed ZeRO-2/3, FSDP2), and the
layouts that fit, computed from the model's configs on the meta device: nothing is downloaded or allocated.

What is computed, not assumed: the transformer is built from its config on the meta device with the recipe's LoRA
(the policy's own ``add_lora``), and one training micro-batch runs forward and backward through the family's policy
(``velocity``, CFG and all) on meta tensors, with and without diffusers' gradient checkpointing, while
:class:`LiveTensorBytes` follows every tensor made: the most bytes alive at once is the micro-batch's activation
peak (what autograd saves, intermediates, the backward's transients). Attention is traced as the fused kernel the GPU
runs (no attention matrix). A rollout call (the rollout batch, no gradient) is traced the same way. The other pipeline components (text encoders, VAE) stay on the GPU in tempflow; their
sizes come from their configs for a local pipeline and from the published parameter counts for the hub models.

The VAE's decoding of one ``decode_batch_size`` chunk is traced the same way. Not counted: reward models (PickScore,
OCR, ...: they load on their own device), the CUDA context and allocator fragmentation (leave 5–10 % of the card).
"""

from __future__ import annotations

import contextlib
import json
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .config import TempFlowGRPOConfig
from .model_configs import ModelConfigs, pipeline_configs

GiB = 2**30
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

HUB_TEXT_ENCODER_PARAMS: dict[str, dict[str, int]] = {
    "stabilityai/stable-diffusion-3.5-medium": {
        "text_encoder (CLIP-L/14, projection)": 123_650_304, "text_encoder_2 (OpenCLIP bigG/14)": 694_659_840,
        "text_encoder_3 (T5-v1.1-XXL encoder)": 4_762_310_656},
    "black-forest-labs/FLUX.1-dev": {
        "text_encoder (CLIP-L/14)": 123_060_480, "text_encoder_2 (T5-v1.1-XXL encoder)": 4_762_310_656},
    "black-forest-labs/FLUX.1-Kontext-dev": {
        "text_encoder (CLIP-L/14)": 123_060_480, "text_encoder_2 (T5-v1.1-XXL encoder)": 4_762_310_656},
    "Qwen/Qwen-Image": {"text_encoder (Qwen2.5-VL-7B-Instruct)": 8_292_166_656},
    "Qwen/Qwen-Image-Edit": {"text_encoder (Qwen2.5-VL-7B-Instruct)": 8_292_166_656},
    "Qwen/Qwen-Image-Edit-2509": {"text_encoder (Qwen2.5-VL-7B-Instruct)": 8_292_166_656},
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": {"text_encoder (UMT5-XXL encoder)": 5_680_910_336},
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": {"text_encoder (UMT5-XXL encoder)": 5_680_910_336},
}
"""Parameter counts of the hub pipelines' text encoders, from their published configs (T5-v1.1-XXL encoder:
32128×4096 embeddings + 24 blocks of 4·4096² attention and 3·4096·10240 gated FFN; UMT5-XXL the same with 256384
tokens; the CLIP text towers and Qwen2.5-VL-7B as their model cards count them). The VAEs are built from their
configs (:mod:`tempflow.model_configs`)."""


@dataclass
class ModelMemory:
    """Bytes one process holds for a recipe before any sharding."""

    transformer: int
    """The transformer's weights (LoRA adapter included), in the recipe's precision."""
    trainable: int
    """The weights that train (the LoRA adapter, or all), in their own precision."""
    largest_block: int
    """The largest transformer block's weights: what sharded layouts gather at a time (two with prefetch)."""
    components: dict[str, int]
    """The other pipeline components (text encoders, VAE), kept on the GPU."""
    activations: int
    """Saved for the backward pass of one training micro-batch, with the recipe's gradient checkpointing."""
    activations_other: int
    """The same with gradient checkpointing the other way."""
    rollout_call: int
    """The most bytes one rollout call's (no-gradient) intermediates hold at once."""
    decode_call: int
    """The most bytes the VAE's decoding of one ``decode_batch_size`` chunk holds at once (images included)."""
    rollout_rows: int
    """An iteration's training rows kept on the GPU (latents, next latents, KL reference means)."""
    notes: list[str] = field(default_factory=list)


LAYOUTS = ("ddp", "zero2", "fsdp2", "zero3")  # simplest first: a tie goes to the earlier
LAYOUT_NAMES = {"ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}
LAUNCH_CONFIGS = {"ddp": "multi_gpu.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml",
                  "fsdp2": "fsdp2_1x8.yaml"}


def per_gpu(memory: ModelMemory, config: TempFlowGRPOConfig, layout: str, gpus: int) -> dict[str, int] | str:
    """Bytes per GPU by part under ``layout`` on ``gpus`` processes, or why the layout cannot run the recipe."""
    if layout == "zero3" and (config.use_lora or config.use_ema):
        return "ZeRO-3 runs full fine-tuning without EMA only (use_lora: false, use_ema: false)"
    if layout == "zero3" and config.algorithm == "diffusion_nft":
        return "ZeRO-3 cannot swap in DiffusionNFT's old policy"
    float32_masters = layout == "zero2" or (layout == "fsdp2" and config.mixed_precision != "no")
    if config.lora_dtype != "float32" and float32_masters:
        return f"lora_dtype {config.lora_dtype}: this layout keeps float32 master weights (lora_dtype float32 runs)"
    n = gpus
    shard_weights = layout in ("zero3", "fsdp2")
    shard_states = layout in ("zero2", "zero3", "fsdp2")
    trainable = memory.trainable
    frozen_reference = memory.transformer if (not config.use_lora and config.beta > 0) else 0
    parts = {
        "transformer weights": memory.transformer // n if shard_weights else memory.transformer,
        "gradients": trainable // n if shard_states else trainable,
        "optimizer (AdamW)": 2 * trainable // n if shard_states else 2 * trainable,
        "EMA": 0 if not config.use_ema or config.ema_offload else (trainable // n if layout == "fsdp2" else trainable),
        "KL reference": frozen_reference // n if layout == "fsdp2" else frozen_reference,
        "old policy (DiffusionNFT)": 0 if config.algorithm != "diffusion_nft" else
        (trainable // n if layout == "fsdp2" else trainable),
        "text encoders + VAE": sum(memory.components.values()),
        "rollout rows": memory.rollout_rows,
        "activations (training, rollout, decode peak)": max(memory.activations, memory.rollout_call,
                                                                  memory.decode_call),
    }
    if layout == "ddp" and gpus > 1:
        parts["DDP gradient buckets"] = trainable
    if shard_weights and gpus > 1:
        parts["gathered blocks (FSDP prefetch: 2)" if layout == "fsdp2" else "gathered block"] = (
            (2 if layout == "fsdp2" else 1) * memory.largest_block)
    return parts


@dataclass
class Plan:
    config: TempFlowGRPOConfig
    memory: ModelMemory
    gpus: int
    gpu_memory_gb: float
    rows: dict[str, dict[str, int] | str]

    def total(self, layout: str) -> float | None:
        parts = self.rows[layout]
        return None if isinstance(parts, str) else sum(parts.values()) / GiB

    def fitting(self) -> list[str]:
        return [layout for layout in LAYOUTS if (total := self.total(layout)) is not None
                and total <= self.gpu_memory_gb]

    def smallest_fit(self, max_gpus: int = 1024) -> tuple[str, int] | None:
        """The layout and process count with the fewest GPUs (ties: the simplest layout) that fits."""
        for gpus in _powers_of_two(self.gpus, max_gpus):
            for layout in LAYOUTS:
                parts = per_gpu(self.memory, self.config, layout, gpus)
                if not isinstance(parts, str) and sum(parts.values()) / GiB <= self.gpu_memory_gb:
                    return layout, gpus
        return None

    def lines(self) -> list[str]:
        config, memory = self.config, self.memory
        training = f"LoRA r={config.lora_r}" if config.use_lora else "full fine-tuning"
        precision = {"no": "fp32"}.get(config.mixed_precision, config.mixed_precision)
        out = [f"plan for {config.model_name_or_path} ({config.algorithm}, {training}, {precision}, micro-batch "
               f"{config.per_device_train_batch_size}, rollout batch {config.rollout_batch_size}, gradient "
               f"checkpointing {'on' if config.gradient_checkpointing else 'off'}) on {self.gpus} GPU(s) of "
               f"{self.gpu_memory_gb:g} GiB", ""]
        totals = [t for k in LAYOUTS if (t := self.total(k)) is not None]
        unit, scale = ("MiB", 2**20) if totals and max(totals) < 1 else ("GiB", GiB)
        header = f"{unit + ' per GPU':46}" + "".join(f"{LAYOUT_NAMES[k]:>18}" for k in LAYOUTS)
        out.append(header)
        names = list(dict.fromkeys(name for parts in self.rows.values() if not isinstance(parts, str)
                                   for name in parts))
        for name in names:
            if not any(not isinstance(p, str) and p.get(name) for p in self.rows.values()):
                continue  # a part this recipe does not have
            cells = []
            for layout in LAYOUTS:
                parts = self.rows[layout]
                cells.append("—" if isinstance(parts, str) else f"{parts.get(name, 0) / scale:.2f}")
            out.append(f"{name:46}" + "".join(f"{c:>18}" for c in cells))
        out.append(f"{'total':46}" + "".join(
            f"{'—' if self.total(k) is None else f'{self.total(k) * GiB / scale:.2f}':>18}" for k in LAYOUTS))
        out.append("")
        for layout in LAYOUTS:
            parts = self.rows[layout]
            if isinstance(parts, str):
                out.append(f"{LAYOUT_NAMES[layout]}: not possible: {parts}")
        other = "off" if config.gradient_checkpointing else "on"
        out.append(f"activations: training {memory.activations / scale:.2f} {unit} (with gradient checkpointing "
                   f"{other}: {memory.activations_other / scale:.2f}), a rollout call {memory.rollout_call / scale:.2f}, "
                   f"decoding {memory.decode_call / scale:.2f} {unit}")
        fits = self.fitting()
        if fits:
            out.append("fits: " + ", ".join(f"{LAYOUT_NAMES[k]} (recipes/accelerate/{LAUNCH_CONFIGS[k]})" for k in fits))
        else:
            smallest = self.smallest_fit()
            out.append(f"does not fit {self.gpus} GPU(s) of {self.gpu_memory_gb:g} GiB: " + (
                f"the smallest layout that does is {LAYOUT_NAMES[smallest[0]]} on {smallest[1]} GPUs"
                if smallest else "no layout fits at any process count (activations and rollout calls are per GPU: "
                                 "lower per_device_train_batch_size or rollout_batch_size"
                                 + ("" if config.gradient_checkpointing else ", or turn on gradient_checkpointing")
                                 + ")"))
        out += [f"note: {n}" for n in memory.notes]
        return out


def plan(config: TempFlowGRPOConfig, gpus: int, gpu_memory_gb: float) -> Plan:
    memory = model_memory(config)
    return Plan(config, memory, gpus, gpu_memory_gb, {k: per_gpu(memory, config, k, gpus) for k in LAYOUTS})


# --- measuring on the meta device ------------------------------------------------------------------------------
def model_memory(config: TempFlowGRPOConfig) -> ModelMemory:
    """:class:`ModelMemory` of ``config``'s model and sizes, from meta-device passes."""
    model = pipeline_configs(config.model_name_or_path)
    dtype = _DTYPES[config.mixed_precision]
    local_modules = _local_components(config.model_name_or_path)
    if "vae" not in local_modules and model.vae_class:
        import diffusers

        with torch.device("meta"):
            local_modules["vae"] = getattr(diffusers, model.vae_class).from_config(model.vae)
    if "vae" in local_modules:
        torch.nn.Module.to(local_modules["vae"], dtype)
    policy = meta_policy(model, config, dtype, local_modules)
    if config.use_lora:
        trainable = policy.add_lora(config.lora_r, config.lora_alpha, config.lora_init,
                                    config.lora_target_modules, getattr(torch, config.lora_dtype))
    else:
        policy.transformer.requires_grad_(True)
        trainable = list(policy.transformer.parameters())
    transformer = policy.transformer
    blocks = _blocks(transformer)
    with_checkpointing = _training_peak(policy, config, trainable, checkpointing=True)
    without = _training_peak(policy, config, trainable, checkpointing=False)
    samples, in_flight = _rollout_sizes(config)
    rollout_call = _rollout_peak(policy, min(config.rollout_batch_size, in_flight))
    decode_call = _decode_peak(policy, min(policy.decode_batch_size, samples)) if policy.pipeline.vae is not None else 0
    latent_bytes = 4 * math.prod(_latents(policy, 1).shape)
    rows = 0 if config.algorithm == "diffusion_nft" else config.rows_per_iteration * latent_bytes * (
        2 + (config.beta > 0))
    components = {f"{name} ({type(module).__name__})": sum(p.numel() for p in module.parameters())
                  for name, module in local_modules.items()}
    if not model.source.startswith("the configs in"):
        components.update(HUB_TEXT_ENCODER_PARAMS.get(config.model_name_or_path, {}))
    notes = []
    if not components:
        notes.append("text encoder and VAE sizes unknown for this model: not counted")
    if not decode_call:
        notes.append("VAE decoding not traced (no VAE config for this model)")
    if config.token_pruning_layers or config.block_sparse_density < 1:
        notes.append("traced with dense attention: token pruning and block-sparse attention change the activations "
                     "by their share of the attention (not modelled)")
    return ModelMemory(
        transformer=_bytes(transformer.parameters()),
        trainable=_bytes(trainable),
        largest_block=max((_bytes(b.parameters()) for b in blocks), default=0),
        components={name: count * dtype.itemsize for name, count in components.items()},
        activations=with_checkpointing if config.gradient_checkpointing else without,
        activations_other=without if config.gradient_checkpointing else with_checkpointing,
        rollout_call=rollout_call,
        decode_call=decode_call,
        rollout_rows=rows,
        notes=notes,
    )


def meta_policy(model: ModelConfigs, config: TempFlowGRPOConfig, dtype: torch.dtype,
                local_modules: dict[str, torch.nn.Module]):
    """The family's policy around its transformer built on the meta device (no VAE or text encoders: the pipelines'
    default scale factors are the real ones), with prompt embeddings of the family's shapes cached as meta tensors
    of ``max_sequence_length`` tokens (an upper bound for Qwen-Image, whose prompts are as long as they are)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .policies import POLICY_CLASSES
    from .policies.base import PROMPT_MASK, PromptEmbeds

    with torch.device("meta"):
        transformer = getattr(diffusers, model.transformer_class).from_config(model.transformer)
    torch.nn.Module.to(transformer, dtype)
    policy_class = POLICY_CLASSES[model.family]
    components = {name: None for name in policy_class.pipeline_class._get_signature_keys(policy_class.pipeline_class)[0]
                  if name not in ("transformer", "scheduler")}
    components.update(_local_tokenizers(config.model_name_or_path))  # their lengths set the text tokens
    if "vae" in local_modules:  # its blocks set the latent size (the pipelines' default without one is 8)
        components["vae"] = local_modules["vae"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler)
    pipeline = policy_class.pipeline_class(transformer=transformer, scheduler=scheduler, **components)
    kwargs = dict(resolution=config.resolution, guidance_scale=config.guidance_scale,
                  max_sequence_length=config.max_sequence_length, negative_prompt=config.negative_prompt)
    if policy_class.rectangular:
        kwargs["width"] = config.width
    if policy_class.video:
        kwargs["num_frames"] = config.num_frames
    policy = policy_class(pipeline, **kwargs)
    if config.edit_condition_area is not None:
        policy.condition_area = config.edit_condition_area
    tokens, cfg = policy.max_sequence_length, transformer.config
    if model.family == "sd3":
        tokens += pipeline.tokenizer_max_length  # CLIP's tokens before T5's
    text_dim = getattr(cfg, "joint_attention_dim", None) or cfg.text_dim
    tensors = {"prompt_embeds": torch.empty(1, tokens, text_dim, device="meta", dtype=dtype)}
    if getattr(cfg, "pooled_projection_dim", None):
        tensors["pooled_prompt_embeds"] = torch.empty(1, cfg.pooled_projection_dim, device="meta", dtype=dtype)
    if model.family.startswith("qwen_image"):
        tensors[PROMPT_MASK] = torch.ones(1, tokens, dtype=torch.long)  # on the CPU: the policy tests it for padding
    if policy.edits:  # the source image's packed latents (Kontext: as many tokens as the output's)
        source_tokens = math.prod(getattr(policy, "condition_grid", policy.token_grid))
        tensors["image_latents"] = torch.empty(1, source_tokens, cfg.in_channels, device="meta", dtype=dtype)
    if model.family.startswith("qwen_image_edit"):  # the negative prompt, encoded with the source image
        tensors["negative_prompt_embeds"] = tensors["prompt_embeds"]
        tensors["negative_prompt_embeds_mask"] = tensors[PROMPT_MASK]
    policy._embed_cache[""] = PromptEmbeds(tensors)
    policy._negative = (policy.negative_prompt, PromptEmbeds(tensors))  # as encoded, without moving the mask
    return policy


def _embeds(policy, batch: int):
    from .policies.base import PROMPT_MASK, PromptEmbeds

    tensors = {name: t.expand(batch, *t.shape[1:]) for name, t in policy._embed_cache[""].tensors.items()}
    if PROMPT_MASK in tensors:  # the meta policy's mask lives on the CPU; the rest on meta
        tensors[PROMPT_MASK] = tensors[PROMPT_MASK].contiguous()
    return PromptEmbeds(tensors)


def _latents(policy, batch: int) -> torch.Tensor:
    """A batch of latents as the family lays them out (packed for FLUX and Qwen-Image), on meta."""
    one = policy.initial_noise(torch.Generator().manual_seed(0))
    return torch.empty(batch, *one.shape[1:], device="meta", dtype=one.dtype)


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(transformer, "_no_split_modules", None) or [])
    return [m for m in transformer.modules() if type(m).__name__ in names]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _training_peak(policy, config: TempFlowGRPOConfig, trainable: list[torch.Tensor], checkpointing: bool) -> int:
    """The most bytes one training micro-batch's forward (the policy's velocity, CFG included) and backward hold at
    once: what autograd saves, the intermediates, and the backward's transients. The trainable weights' gradients
    are made beforehand, so they are not counted here (they are their own part)."""
    transformer = policy.transformer
    for weight in trainable:
        weight.grad = torch.zeros_like(weight)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    batch = config.per_device_train_batch_size
    latents, sigmas, embeds = _latents(policy, batch), torch.full((batch,), 0.5, device="meta"), _embeds(policy, batch)
    try:
        with _train_mode(transformer), _fused_attention_on_meta(), LiveTensorBytes() as tracker:
            policy.velocity(latents, sigmas, embeds).float().square().mean().backward()
    finally:
        if checkpointing:
            transformer.disable_gradient_checkpointing()
        for weight in trainable:
            weight.grad = None
    return tracker.peak


class LiveTensorBytes(TorchDispatchMode):
    """The most bytes the tensors made inside the mode hold at once (storages counted once, freed with their last
    tensor): on meta tensors what a call would allocate, on real ones what it did (the CPU tests measure training
    steps with it; on a GPU ``torch.cuda.max_memory_allocated`` says the same)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage → [bytes, tensors alive]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                key = tensor.untyped_storage()._cdata
                if key in inputs and key not in self.live:
                    continue  # a view or an in-place result of memory made before: nothing allocated
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage()._cdata
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [tensor.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


def _rollout_sizes(config: TempFlowGRPOConfig) -> tuple[int, int]:
    """An iteration's scored samples per process, and the most latents its rollout has in flight (the engine packs
    at most ``rollout_batch_size`` of them into one call)."""
    if config.branched:
        paths = config.prompts_per_iteration * config.seeds_per_prompt
        return config.rows_per_iteration, paths + config.rows_per_iteration
    samples = config.prompts_per_iteration * config.num_generations
    return samples, samples


def _rollout_peak(policy, batch: int) -> int:
    latents, sigmas, embeds = _latents(policy, batch), torch.full((batch,), 0.5, device="meta"), _embeds(policy, batch)
    with torch.no_grad(), _fused_attention_on_meta(), LiveTensorBytes() as tracker:
        policy.velocity(latents, sigmas, embeds)
    return tracker.peak


def _decode_peak(policy, batch: int) -> int:
    latents = _latents(policy, batch)
    with _fused_attention_on_meta(), LiveTensorBytes() as tracker:
        policy.decode(latents)
    return tracker.peak


@contextlib.contextmanager
def _fused_attention_on_meta():
    """Attention on meta tensors as the GPU runs it: a fused kernel (flash), which keeps no attention matrix. SDPA on
    the meta device would otherwise take the math path and count the [B, heads, L, L] matrices."""
    functional = torch.nn.functional
    dense = functional.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or attn_mask is not None or kwargs.get("enable_gqa"):
            return dense(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]

    functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = dense


@contextlib.contextmanager
def _train_mode(module: torch.nn.Module):
    was = module.training
    module.train()
    try:
        yield
    finally:
        module.train(was)


def _local_components(model_name_or_path: str) -> dict[str, torch.nn.Module]:
    """A local pipeline's text encoders and VAE built from their saved configs on the meta device (none for a hub
    id)."""
    import diffusers
    import transformers

    from .registry import resolve_pipeline

    path = Path(resolve_pipeline(model_name_or_path))
    if not (path / "model_index.json").is_file():
        return {}
    index = json.loads((path / "model_index.json").read_text())
    modules = {}
    for name, entry in index.items():
        if (name.startswith(("_", "tokenizer")) or name in ("transformer", "scheduler") or not isinstance(entry, list)
                or entry[1] is None):
            continue
        library, class_name = entry
        with torch.device("meta"):
            if library == "diffusers":
                model_class = getattr(diffusers, class_name)
                modules[name] = model_class.from_config(model_class.load_config(path / name))
            else:
                config = transformers.AutoConfig.from_pretrained(path / name)
                modules[name] = getattr(transformers, class_name)._from_config(config)
    return modules


def _local_tokenizers(model_name_or_path: str) -> dict:
    """A local pipeline's tokenizers (small files), whose lengths the pipeline and policy read; none for a hub id."""
    import transformers

    from .registry import resolve_pipeline

    path = Path(resolve_pipeline(model_name_or_path))
    if not (path / "model_index.json").is_file():
        return {}
    index = json.loads((path / "model_index.json").read_text())
    return {name: getattr(transformers, entry[1]).from_pretrained(path / name) for name, entry in index.items()
            if name.startswith("tokenizer") and isinstance(entry, list) and entry[1] is not None}


def _powers_of_two(start: int, stop: int):
    gpus = max(1, start)
    while gpus <= stop:
        yield gpus
        gpus *= 2


def main(argv: list[str]) -> int:
    """``tempflow plan RECIPE --gpus N --gpu-memory GiB [--field value ...]``: 0 when a layout fits, 1 when none
    does (the smallest that would is named), 2 on bad input."""
    import argparse
    import sys

    from .config import parse_config

    parser = argparse.ArgumentParser(
        prog="tempflow plan",
        description="Memory per GPU of a recipe under DDP, DeepSpeed ZeRO-2/3 and FSDP2, from the model's configs on "
                    "the meta device (nothing is downloaded); recipe fields can be overridden as --field value.",
        epilog="example: tempflow plan recipes/flux_pickscore.yaml --gpus 8 --gpu-memory 80")
    parser.add_argument("recipe", help="YAML recipe")
    parser.add_argument("--gpus", type=int, default=1, help="processes (GPUs), default 1")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80: an H100)")
    args, overrides = parser.parse_known_args(argv)
    if args.gpus < 1 or args.gpu_memory <= 0:
        print("tempflow plan: error: --gpus and --gpu-memory must be positive", file=sys.stderr)
        return 2
    try:
        result = plan(parse_config(args.recipe, overrides), args.gpus, args.gpu_memory)
    except (ValueError, FileNotFoundError) as err:
        print(f"tempflow plan: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(result.lines()))
    return 0 if result.fitting() else 1
