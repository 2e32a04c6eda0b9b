"""The policy interface: one model family (SD3, FLUX, ...) behind the few operations RL fine-tuning needs.

A policy wraps a diffusers pipeline and offers: prompt encoding with an embedding cache, the velocity at a
batch of latents whose samples may sit at different σ (with CFG or guidance embedding as the family uses),
the σ schedule from the pipeline's scheduler, initial noise, decoding to images (``[B, 3, H, W]``) or videos
(``[B, F, 3, H, W]``), and LoRA (add, save in the diffusers format, disable for the KL reference). The rollout
engine and the trainer see only this interface; a family supplies its transformer's keyword inputs
(``_transformer_inputs``) and the velocity, CFG included, is computed here once for all families.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..sharding import whole

GATES_FILE = "block_sparse_gates.safetensors"


PROMPT_MASK = "prompt_embeds_mask"
"""The name of a family's text attention mask in :class:`PromptEmbeds` (1: token, 0: padding), where it has one."""
TEXT_OF_MASK = {PROMPT_MASK: "prompt_embeds", "negative_prompt_embeds_mask": "negative_prompt_embeds"}
"""Each text mask and the embeddings it masks (an edit family carries a per-image negative prompt too)."""


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch of prompts: named tensors that all share the batch dimension.

    Families whose pipelines pad prompts only to the longest of a batch (Qwen-Image) carry a
    :data:`PROMPT_MASK`; their embeddings are cached without padding (:meth:`trimmed`) and padded with zeros, the
    pipelines' own padding, when prompts of different lengths meet in one batch (:meth:`cat`)."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index) -> PromptEmbeds:
        return PromptEmbeds({name: value[index] for name, value in self.tensors.items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device) -> PromptEmbeds:
        return PromptEmbeds({name: value.to(device) for name, value in self.tensors.items()})

    def expand(self, batch_size: int) -> PromptEmbeds:
        """A one-prompt batch broadcast to ``batch_size`` rows (views)."""
        return PromptEmbeds({name: expand_batch(value, batch_size) for name, value in self.tensors.items()})

    def trimmed(self) -> PromptEmbeds:
        """Without the trailing positions that a text mask marks as padding in every row, in that mask and the
        embeddings it masks (unchanged without a mask)."""
        tensors = dict(self.tensors)
        for mask_name, text_name in TEXT_OF_MASK.items():
            mask = tensors.get(mask_name)
            if mask is not None:
                length = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
                tensors[mask_name], tensors[text_name] = mask[:, :length], tensors[text_name][:, :length]
        return PromptEmbeds(tensors)

    @staticmethod
    def cat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        """The parts' rows in order; sequences of different lengths are padded with zeros to the longest."""
        return PromptEmbeds({name: _cat_padded([p.tensors[name] for p in parts]) for name in parts[0].tensors})


def _cat_padded(values: list[torch.Tensor]) -> torch.Tensor:
    if values[0].ndim < 2 or len({v.shape[1] for v in values}) == 1:
        return torch.cat(values)
    length = max(v.shape[1] for v in values)
    return torch.cat([torch.nn.functional.pad(v, (0, 0) * (v.ndim - 2) + (0, length - v.shape[1])) for v in values])


class FlowPolicy:
    """Base class of model-family adapters. Subclasses set the class attributes and the ``_``-methods."""

    family: str = ""
    pipeline_class: type = None
    default_lora_target_modules: tuple[str, ...] = ()
    default_max_sequence_length: int = 256
    t5_tokenizer_attribute: str = ""
    unbatched_inputs: tuple[str, ...] = ()
    """Transformer inputs without a batch dimension (shared by all samples of a call)."""
    true_cfg: bool = True
    """Whether ``guidance_scale > 1`` means classifier-free guidance with a negative prompt (FLUX: an embedding)."""
    default_negative_prompt: str = ""
    rectangular: bool = False
    """Whether the family samples ``width`` ≠ ``resolution`` (the height); square families refuse it."""
    video: bool = False
    """Whether samples are videos (``num_frames``; decoded to ``[B, F, 3, H, W]``)."""
    default_decode_batch_size: int = 8
    edits: bool = False
    """Whether the family edits a source image: each prompt comes with one (an edit record's ``image``)."""

    def __init__(
        self,
        pipeline,
        resolution: int = 512,
        guidance_scale: float = 1.0,
        max_sequence_length: int | None = None,
        decode_batch_size: int | None = None,
        attention_backend: str = "sdpa",
        negative_prompt: str | None = None,
        width: int | None = None,
        num_frames: int | None = None,
    ):
        if width is not None and width != resolution and not self.rectangular:
            raise ValueError(f"{self.family} samples square images: width ({width}) must equal resolution "
                             f"({resolution}) or be left unset")
        if num_frames is not None and not self.video:
            raise ValueError(f"num_frames is for video families (wan); {self.family} samples images")
        self.pipeline = pipeline
        self.resolution = resolution
        self.width = width or resolution
        self.num_frames = num_frames
        self.guidance_scale = guidance_scale
        self.negative_prompt = self.default_negative_prompt if negative_prompt is None else negative_prompt
        self.max_sequence_length = max_sequence_length or self._pipeline_max_sequence_length()
        self.decode_batch_size = decode_batch_size or self.default_decode_batch_size
        self._embed_cache: dict[str, PromptEmbeds] = {}
        self._frozen_reference: torch.nn.Module | None = None
        self.softpag = None
        self.cfg_uncond_gradient = True
        """Whether gradients flow through CFG's unconditional prediction (see ``classifier_free_guidance``)."""
        self.compiled = False
        self.compile_batch_buckets: tuple[int, ...] = ()
        self.last_selection: torch.Tensor | None = None
        """What block-sparse attention / token pruning selected in the last ``velocity`` call (see there)."""
        self.selection_layout = None
        self.attention_backend = "sdpa"
        self.set_attention_backend(attention_backend)

    def set_token_pruning(self, pruning) -> None:
        """Prune image tokens inside the transformer (a :class:`~tempflow.attention.pruning.TokenPruning`, or
        ``None`` for dense); like the attention backend, it holds for rollouts and recomputation alike."""
        from ..attention.pruning import apply_token_pruning

        apply_token_pruning(self.transformer, self.family, pruning)

    def set_block_sparse(self, sparse) -> None:
        """Make attention block-sparse (a :class:`~tempflow.attention.block_sparse.BlockSparse`, or ``None`` for
        dense) on the policy's token grid; it holds for rollouts and recomputation alike."""
        from ..attention.block_sparse import apply_block_sparse

        apply_block_sparse(self.transformer, self.family, sparse, self.token_grid)

    @property
    def token_grid(self) -> tuple[int, int]:
        """Image tokens per side (height, width) that the transformer sees at the policy's resolution."""
        raise NotImplementedError

    def set_softpag(self, softpag) -> None:
        """Perturbed-attention guidance for sampling and evaluation (a
        :class:`~tempflow.attention.softpag.SoftPAG`; ``None`` or scale 0: off): ``velocity()`` adds
        ``s·(v_cond − v_perturbed)`` at the cost of one more conditional transformer call. Training rollouts refuse
        it (:class:`~tempflow.rollout.RolloutEngine`): their log-prob recomputation must see the same velocity."""
        from ..attention.softpag import check_softpag

        if softpag is None or not softpag.active:
            self.softpag = None
            return
        check_softpag(self.transformer, self.family, softpag)
        self.softpag = softpag

    def compile_transformer(self, backend: str = "inductor", mode: str = "default", batch_buckets=()) -> None:
        """``torch.compile`` the transformer in place (see :mod:`tempflow.compilation`): rollouts, recomputation
        and evaluation then run the compiled module. Call after LoRA, gradient checkpointing and token pruning
        are set, before the first transformer call. ``batch_buckets``: static graphs for these batch sizes
        (calls padded up to them); empty: one graph with a dynamic batch dimension."""
        from ..compilation import compile_transformer

        compile_transformer(self.transformer, backend, mode, batch_buckets)
        self.compiled = True
        self.compile_batch_buckets = tuple(sorted(batch_buckets))

    def _pipeline_max_sequence_length(self) -> int:
        """The family's default T5 length, or the pipeline's T5 tokenizer ``model_max_length`` when shorter (a
        pipeline trained on short prompts, like ShapesWorld's, records its length there)."""
        tokenizer = getattr(self.pipeline, self.t5_tokenizer_attribute, None) if self.t5_tokenizer_attribute else None
        limit = getattr(tokenizer, "model_max_length", None) or self.default_max_sequence_length
        return min(self.default_max_sequence_length, limit)

    def set_attention_backend(self, name: str) -> None:
        """Choose the dense attention kernel (see :mod:`tempflow.attention.backends`); ``auto`` picks by device."""
        from ..attention.backends import apply_attention_backend, resolve_attention_backend

        resolved = resolve_attention_backend(name, self.device)
        apply_attention_backend(self.transformer, self.family, resolved)
        self.attention_backend = resolved

    def _forward(self, model: torch.nn.Module, **inputs) -> torch.Tensor:
        """One transformer call under the policy's attention kernel; the prediction in float32."""
        from ..attention.backends import attention_context

        with attention_context(self.attention_backend):
            if self.compiled:
                from ..compilation import compiled_call

                return compiled_call(model, inputs, self.compile_batch_buckets, self.unbatched_inputs).float()
            return model(**inputs, return_dict=False)[0].float()

    def _softpag_guidance(self, model, guided: torch.Tensor, cond: torch.Tensor, cond_inputs: dict) -> torch.Tensor:
        """``guided`` plus SoftPAG's term, from one more call on the conditional ``cond_inputs`` with perturbed
        attention; ``guided`` itself while SoftPAG is off."""
        if self.softpag is None:
            return guided
        from ..attention.softpag import softpag_attention

        with softpag_attention(model, self.family, self.softpag):
            perturbed = self._forward(model, **cond_inputs)
        return perturbed_attention_guidance(guided, cond, perturbed, self.softpag.scale)

    # --- loading -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_name_or_path: str, torch_dtype: torch.dtype = torch.float32, **kwargs):
        """Load the family's pipeline with ``from_pretrained`` (a hub id or a local directory)."""
        check_model_location(model_name_or_path)
        try:
            pipeline = cls.pipeline_class.from_pretrained(
                model_name_or_path, **_dtype_argument(torch_dtype), **cls._absent_components(model_name_or_path)
            )
        except OSError as err:
            raise FileNotFoundError(f"cannot load model {model_name_or_path!r}: {err}") from err
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, **kwargs)

    @classmethod
    def _absent_components(cls, model_name_or_path: str) -> dict:
        """Components a local pipeline saved as null (e.g. SD3 without T5): diffusers needs them passed as None."""
        index = Path(model_name_or_path) / "model_index.json"
        if not index.is_file():
            return {}
        entries = json.loads(index.read_text())
        return {name: None for name, value in entries.items() if value == [None, None]}

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to(self, device) -> FlowPolicy:
        self.pipeline.to(device)
        return self

    # --- prompts ---------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], images: list[str] | None = None) -> PromptEmbeds:
        """Embeddings of ``prompts`` on the policy's device; each distinct prompt is encoded once and cached
        on the CPU, so the text encoders can leave the accelerator once a prompt set is encoded. Edit families
        take each prompt's source image (a path) too, and encode each distinct (prompt, image) pair once."""
        if self.edits:
            if images is None or len(images) != len(prompts) or not all(images):
                raise ValueError(f"{self.family} edits images: every prompt needs its source image (an edit record's "
                                 "`image`; see README, Image editing)")
            keys = [(p, tuple(i) if isinstance(i, list) else i) for p, i in zip(prompts, images)]
        else:
            keys = list(prompts)
        missing = sorted(set(keys) - self._embed_cache.keys(), key=str)
        if missing:
            with torch.no_grad(), self._truncation_by_design():
                encoded = self._encode_edits(*zip(*missing)) if self.edits else self._encode(missing)
            for i, key in enumerate(missing):
                self._embed_cache[key] = encoded[i : i + 1].trimmed().to("cpu")
        return PromptEmbeds.cat([self._embed_cache[k] for k in keys]).to(self.device)

    def encode_records(self, records: list[dict]) -> PromptEmbeds:
        """:meth:`encode_prompts` of prompt records (with their source images for an edit family)."""
        images = [r.get("image") for r in records] if self.edits else None
        return self.encode_prompts([r["prompt"] for r in records], images)

    def _encode_edits(self, prompts: tuple[str, ...], images: tuple[str, ...]) -> PromptEmbeds:
        raise NotImplementedError

    def _unconditional_embeds(self, embeds: PromptEmbeds) -> PromptEmbeds:
        """CFG's unconditional branch for each row of ``embeds``: the negative prompt's (edit families: encoded
        with each row's source image)."""
        return self._negative_embeds().expand(len(embeds))

    def _negative_embeds(self) -> PromptEmbeds:
        """The negative prompt's embeddings (CFG's unconditional branch), kept on the device after first use."""
        cached = getattr(self, "_negative", None)
        if cached is None or cached[0] != self.negative_prompt or cached[1].device != self.device:
            self._negative = cached = (self.negative_prompt, self.encode_prompts([self.negative_prompt]))
        return cached[1]

    @contextlib.contextmanager
    def _truncation_by_design(self):
        """Silence the pipeline's per-batch "input was truncated" warning when the pipeline itself records a T5
        length shorter than the family's (ShapesWorld: 8 tokens, CLIP sees the whole prompt); the truncation is
        how that pipeline was trained, not a user mistake. Other pipelines keep the warning."""
        if not self.max_sequence_length == self._pipeline_max_sequence_length() < self.default_max_sequence_length:
            yield
            return
        # the pipeline's warning, and the tokenizer's about the untruncated copy the pipeline makes to compare
        names = (type(self.pipeline).__module__, "transformers.tokenization_utils_base")
        loggers = [logging.getLogger(name) for name in names]
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        raise NotImplementedError

    # --- sampling -------------------------------------------------------------------------------------------
    def sigma_schedule(self, num_steps: int) -> torch.Tensor:
        """The ``num_steps + 1`` σ values (ending at 0) that the family's pipeline would use, float32 on CPU."""
        return flow_sigma_schedule(self.pipeline.scheduler, num_steps, self.base_sigmas(num_steps), self.image_seq_len)

    @classmethod
    def base_sigmas(cls, num_steps: int) -> list[float] | None:
        """The σ grid the family's pipeline hands its scheduler before shifting (None: the scheduler's own)."""
        return None

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor  # the pipeline's: from its VAE's blocks, its default without a VAE

    @property
    def image_seq_len(self) -> int:
        """Image (or video) tokens the transformer sees: the product of :attr:`token_grid`."""
        return math.prod(self.token_grid)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent shape as the transformer takes it (families that pack latents draw noise their way)."""
        raise NotImplementedError

    def initial_noise(self, generator: torch.Generator) -> torch.Tensor:
        """One sample's starting latent ``[1, ...]`` (float32 on CPU) drawn from ``generator``."""
        return torch.randn((1, *self.latent_shape), generator=generator, dtype=torch.float32)

    @property
    def do_cfg(self) -> bool:
        return self.true_cfg and self.guidance_scale > 1.0

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        embeds: PromptEmbeds,
        model: torch.nn.Module | None = None,
        selection: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity ``v ≈ ε − x₀`` at ``latents`` (``[B, ...]``), per-sample ``sigmas`` (``[B]``), float32.

        ``model`` replaces the policy's transformer (e.g. the accelerate-wrapped one during training, or a
        frozen reference); guidance is applied here, so rollouts and log-prob recomputation match. CFG runs the
        negative prompt and the prompts as one doubled batch.

        Block-sparse attention and token pruning select per call (:mod:`~tempflow.attention.selection`): this
        call's selections are left in :attr:`last_selection` ``[B, c, total]`` (``c`` = 2 with CFG: the
        unconditional pass, then the conditional one; None when nothing selects), and ``selection``, rows of an
        earlier call's, makes this call use those instead.
        """
        model = model or self.transformer
        self._set_replay(model, selection)
        if not self.do_cfg:
            conditional = self._transformer_inputs(latents, sigmas, embeds)
            prediction = self._forward(model, **conditional)
            self._keep_selection(model, passes=1)
            return self._softpag_guidance(model, prediction, prediction, conditional)
        both = PromptEmbeds.cat([self._unconditional_embeds(embeds), embeds])
        doubled = self._transformer_inputs(torch.cat([latents, latents]), torch.cat([sigmas, sigmas]), both)
        uncond, cond = self._forward(model, **doubled).chunk(2)
        self._keep_selection(model, passes=2)
        guided = self._guide(uncond, cond)
        if self.softpag is None:
            return guided
        return self._softpag_guidance(model, guided, cond, self._transformer_inputs(latents, sigmas, embeds))

    def _set_replay(self, model: torch.nn.Module, selection: torch.Tensor | None) -> None:
        from ..attention import selection as selections

        if selection is None:
            selections.clear(model)
            return
        if self.selection_layout is None:
            raise ValueError("a selection to replay needs the layout of a recorded call (velocity() records one)")
        rows, passes, total = selection.shape  # to the call's batch order: every row's first pass, then its second
        selections.replay(model, selection.transpose(0, 1).reshape(rows * passes, total), self.selection_layout)

    def _keep_selection(self, model: torch.nn.Module, passes: int) -> None:
        from ..attention.selection import record

        recorded = None if self.compiled else record(model)
        if recorded is None:
            self.last_selection = None
            return
        packed, self.selection_layout = recorded
        self.last_selection = packed.unflatten(0, (passes, -1)).transpose(0, 1)

    def _guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The guided velocity from CFG's two predictions (a family may rescale it, as Qwen-Image does)."""
        return classifier_free_guidance(uncond, cond, self.guidance_scale, self.cfg_uncond_gradient)

    def _scheduler_timesteps(self, sigmas: torch.Tensor, device) -> torch.Tensor:
        """σ on the scheduler's training scale (σ·1000), the timestep that SD3's and Wan's transformers take."""
        return sigmas.to(device, torch.float32) * self.pipeline.scheduler.config.num_train_timesteps

    def _transformer_inputs(self, latents: torch.Tensor, sigmas: torch.Tensor, embeds: PromptEmbeds) -> dict:
        """The transformer's keyword inputs for ``latents`` at ``sigmas`` under ``embeds`` (one row each)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images ``[B, 3, H, W]`` (videos: ``[B, F, 3, H, W]``) in ``[0, 1]`` (float32), decoded in
        chunks of ``decode_batch_size`` samples."""
        vae = self.pipeline.vae
        images = []
        with torch.no_grad():
            for chunk in self._unpack(latents).split(self.decode_batch_size):
                chunk = chunk.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
                images.append((vae.decode(chunk, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    # --- LoRA and the KL reference ---------------------------------------------------------------------------
    def add_lora(self, r: int, alpha: int, init: str = "gaussian", target_modules=None,
                 dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
        """Freeze the transformer and add a trainable LoRA adapter (peft); returns the trainable parameters:
        the adapter and, when installed, the block-sparse gates, in ``dtype`` whatever the frozen weights'
        precision (their gradients and optimizer state follow it; ``lora_dtype``)."""
        from peft import LoraConfig

        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(
            LoraConfig(
                r=r,
                lora_alpha=alpha,
                init_lora_weights="gaussian" if init == "gaussian" else True,
                target_modules=list(target_modules or self.default_lora_target_modules),
            )
        )
        for gate in self.block_sparse_gates().values():  # trained beside the adapter, saved with it
            gate.requires_grad_(True)
        trainable = [p for p in self.transformer.parameters() if p.requires_grad]
        for param in trainable:
            param.data = param.data.to(dtype)
        return trainable

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    def lora_state_dict(self, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The adapter's weights, whole (under FSDP a collective: every process must call it)."""
        from peft.utils import get_peft_model_state_dict

        return {name: whole(w) for name, w in get_peft_model_state_dict(model or self.transformer).items()}

    def save_lora(self, directory: str | os.PathLike, model: torch.nn.Module | None = None, write: bool = True) -> None:
        """Write the adapter of ``model`` (default: the policy's transformer) as ``pytorch_lora_weights.safetensors``
        in the diffusers format, loadable with ``pipeline.load_lora_weights(directory)``; block-sparse gates, when
        on, go beside it. The adapter's config travels in the file's metadata: without it diffusers assumes
        ``lora_alpha = r`` and would load an adapter trained with another alpha at the wrong strength. A sharded
        (FSDP) model's weights are gathered, so every process calls this; only those with ``write`` write."""
        model = model or self.transformer
        lora = self.lora_state_dict(model)
        gates = {name: whole(g).detach().float().cpu() for name, g in self.block_sparse_gates(model).items()}
        if not write:
            return
        self.pipeline_class.save_lora_weights(
            str(directory),
            transformer_lora_layers=lora,
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
        if gates:
            from safetensors.torch import save_file

            save_file(gates, Path(directory) / GATES_FILE)

    def load_lora(self, directory: str | os.PathLike) -> None:
        """Load an exported adapter (and its block-sparse gates) the way a diffusers user would."""
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
        from safetensors import safe_open

        weights = Path(directory) / LORA_WEIGHT_NAME_SAFE
        if weights.is_file():
            with safe_open(str(weights), "pt") as f:
                if LORA_ADAPTER_METADATA_KEY not in (f.metadata() or {}):
                    warnings.warn(f"{weights} carries no adapter config (lora_alpha): diffusers loads it with "
                                  "lora_alpha = r, the trained strength only if it was trained with alpha = r",
                                  stacklevel=2)
        self.pipeline.load_lora_weights(str(directory))
        self.load_block_sparse_gates(directory)

    def block_sparse_gates(self, model: torch.nn.Module | None = None) -> dict[str, torch.nn.Parameter]:
        """The per-head gates of block-sparse attention (empty unless installed with ``gate`` on)."""
        model = model or self.transformer
        return {name: p for name, p in model.named_parameters() if name.endswith("processor.gate")}

    def load_block_sparse_gates(self, directory: str | os.PathLike, model: torch.nn.Module | None = None) -> None:
        """Load ``block_sparse_gates.safetensors`` from ``directory`` if it is there; the installed gates must
        match it name for name."""
        path = Path(directory) / GATES_FILE
        if not path.is_file():
            return
        from safetensors.torch import load_file

        saved, gates = load_file(path), self.block_sparse_gates(model)
        if saved.keys() != gates.keys():
            raise ValueError(
                f"{path} holds gates for {sorted(saved)}, but the model's block-sparse gates are {sorted(gates)}; "
                "install block-sparse attention with the same layers and gate=True first"
            )
        with torch.no_grad():
            for name, gate in gates.items():
                gate.copy_(saved[name])

    def keep_frozen_reference(self) -> None:
        """Full fine-tuning with KL: keep a frozen copy of the initial transformer as the reference."""
        self._frozen_reference = copy.deepcopy(self.transformer).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self):
        """Yield the reference model for the KL term: the transformer with its LoRA adapter disabled (no second
        copy of the weights), or the frozen copy kept for full fine-tuning."""
        if self._frozen_reference is not None:
            yield self._frozen_reference
            return
        if not self.has_lora:
            raise RuntimeError("a KL reference needs a LoRA adapter or keep_frozen_reference()")
        self.transformer.disable_adapters()
        try:
            yield self.transformer
        finally:
            self.transformer.enable_adapters()


def _dtype_argument(dtype: torch.dtype) -> dict:
    """diffusers 0.40 renamed ``from_pretrained``'s ``torch_dtype`` to ``dtype`` (the old name now warns)."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.40") else "torch_dtype": dtype}


def check_model_location(model_name_or_path: str) -> None:
    """Fail early, with the path in the message, for a local model path that does not exist. Hub ids
    (``owner/name``) pass through to ``from_pretrained``."""
    from ..preflight import looks_like_hub_id

    name = str(model_name_or_path)
    if not looks_like_hub_id(name) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"model path {name!r} does not exist or is not a directory")


def read_pipeline_class_name(model_name_or_path: str) -> str | None:
    """The ``_class_name`` in a local pipeline's ``model_index.json``, or None for hub ids / missing files."""
    index = Path(model_name_or_path) / "model_index.json"
    if not index.is_file():
        return None
    return json.loads(index.read_text())["_class_name"]


def flow_sigma_schedule(scheduler, num_steps: int, base_sigmas: list[float] | None, image_seq_len: int) -> torch.Tensor:
    """The ``num_steps + 1`` σ values (ending at 0) of a copy of ``scheduler`` set to ``num_steps`` steps on
    ``base_sigmas``, with the resolution-dependent shift ``mu`` of FLUX-style schedulers (``use_dynamic_shifting``)
    computed from ``image_seq_len`` as the pipelines do; float32 on CPU."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = scheduler.__class__.from_config(scheduler.config)
    kwargs = {}
    config = scheduler.config
    if config.get("use_dynamic_shifting", False):
        kwargs["mu"] = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.16))
    scheduler.set_timesteps(num_steps, device="cpu", sigmas=base_sigmas, **kwargs)
    return scheduler.sigmas.float().cpu()


def denormalize_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The per-channel latent normalisation of Wan-style VAEs undone (``[B, C, F, H, W]``), written as
    ``QwenImagePipeline`` and ``WanPipeline`` write it before decoding."""
    shape = (1, vae_config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae_config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae_config.latents_std).view(shape).to(latents.device, latents.dtype)
    return latents / inverse_std + mean


def expand_batch(values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Broadcast a ``[1, ...]`` tensor to ``[batch_size, ...]`` (a view)."""
    return values.expand(batch_size, *values.shape[1:])


def classifier_free_guidance(
    v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float, uncond_gradient: bool = True
) -> torch.Tensor:
    """``v_uncond + scale·(v_cond − v_uncond)``. With ``uncond_gradient`` off the unconditional prediction is a
    constant to autograd: the gradient reaches the model through the conditional branch alone (× ``scale``)."""
    if not uncond_gradient:
        v_uncond = v_uncond.detach()
    return v_uncond + scale * (v_cond - v_uncond)


def perturbed_attention_guidance(
    v_guided: torch.Tensor, v_cond: torch.Tensor, v_perturbed: torch.Tensor, scale: float
) -> torch.Tensor:
    """PAG on top of the usual guidance: ``v = v_guided + s·(v_cond − v_perturbed)``."""
    return v_guided + scale * (v_cond - v_perturbed)


__all__ = [
    "PROMPT_MASK",
    "FlowPolicy",
    "PromptEmbeds",
    "classifier_free_guidance",
    "denormalize_latents",
    "expand_batch",
    "perturbed_attention_guidance",
    "read_pipeline_class_name",
]
