"""Dense attention backend selection: one setting for every family, applied to every transformer call.

SD3's attention processor calls ``F.scaled_dot_product_attention`` directly, so the torch SDPA kernels are
chosen with ``torch.nn.attention.sdpa_kernel`` around the call; FLUX, Qwen-Image and Wan go through diffusers'
attention dispatcher, whose native backend calls the same function, so the same context selects its kernel too.
Backends outside torch SDPA (FlexAttention, SageAttention, flash-attn, lazily imported by diffusers: none is
required) are set on the model through the dispatcher (``set_attention_backend``); SD3's joint attention, which
calls SDPA itself, is routed through the dispatcher for them (:class:`DispatchedJointAttnProcessor`).

The policy applies the chosen backend in ``velocity()``, the one path of both rollouts and log-prob
recomputation, so both passes always use the same kernel (an approximate kernel in one pass only would make
the first inner step off-policy).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import ATTENTION_BACKENDS

SDPA_KERNELS = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
DISPATCHER_BACKENDS = {"flex": "flex", "sage": "sage", "flash_attn": "flash"}
DISPATCHER_FAMILIES = ("flux", "flux_kontext", "qwen_image", "qwen_image_edit", "qwen_image_edit_plus", "wan")
"""Families whose attention processors call diffusers' dispatcher; SD3's get :class:`DispatchedJointAttnProcessor`
for these backends."""


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """``auto`` → cuDNN SDPA on Hopper-class GPUs (the fastest dense kernel measured there, DESIGN §6), else
    torch's own SDPA choice. Other names pass through after validation."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {list(ATTENTION_BACKENDS)}")
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return "sdpa_cudnn"
    return "sdpa"


def apply_attention_backend(transformer: torch.nn.Module, family: str, name: str) -> None:
    """Configure the model for backends that live in diffusers' dispatcher (FlexAttention, SageAttention,
    flash-attn: a missing package is named in diffusers' error); SD3's joint attention is routed through the
    dispatcher for them, and back to ``JointAttnProcessor2_0`` for the torch SDPA kernels."""
    backend = DISPATCHER_BACKENDS.get(name)
    if backend is None and _uses_dispatcher_backend(transformer):
        backend = "native"  # back from flex/sage/flash: diffusers' own SDPA, for this model and its global default
    if family == "sd3":
        _route_sd3_attention(transformer, dispatched=name in DISPATCHER_BACKENDS)
    elif backend is not None and family not in DISPATCHER_FAMILIES:
        raise ValueError(f"attention backend {name!r} is not wired for the {family!r} family")
    if backend is not None:
        transformer.set_attention_backend(backend)


def _uses_dispatcher_backend(transformer: torch.nn.Module) -> bool:
    """Whether an earlier setting left the model on one of the dispatcher's own backends."""
    for module in transformer.modules():
        chosen = getattr(getattr(module, "processor", None), "_attention_backend", None)
        if chosen is not None and str(getattr(chosen, "value", chosen)) in DISPATCHER_BACKENDS.values():
            return True
    return False


class DispatchedJointAttnProcessor:
    """SD3's ``JointAttnProcessor2_0`` with its attention call through diffusers' dispatcher, so that SD3 takes the
    dispatcher's backends too; the backend is the model's (``set_attention_backend`` sets ``_attention_backend``)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        from .mmdit import sd3_attention_output, sd3_joint_qkv

        image_qkv, text_qkv = sd3_joint_qkv(attn, hidden_states, encoder_hidden_states)
        joint = image_qkv if text_qkv is None else [torch.cat(pair, dim=2) for pair in zip(image_qkv, text_qkv)]
        out = dispatch_attention_fn(*(x.transpose(1, 2) for x in joint), backend=self._attention_backend,
                                    parallel_config=self._parallel_config).transpose(1, 2)  # [B, H, L, D]
        image_len = hidden_states.shape[1]
        text_out = None if text_qkv is None else out[:, :, image_len:]
        return sd3_attention_output(attn, out[:, :, :image_len], text_out, hidden_states.dtype)


def _route_sd3_attention(transformer: torch.nn.Module, dispatched: bool) -> None:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if dispatched and type(processor) is JointAttnProcessor2_0:
            module.set_processor(DispatchedJointAttnProcessor())
        elif not dispatched and isinstance(processor, DispatchedJointAttnProcessor):
            module.set_processor(JointAttnProcessor2_0())


def attention_context(name: str):
    """Context manager that makes ``F.scaled_dot_product_attention`` use the named kernel (no-op otherwise)."""
    if name in SDPA_KERNELS:
        return sdpa_kernel([SDPA_KERNELS[name]])
    return contextlib.nullcontext()
