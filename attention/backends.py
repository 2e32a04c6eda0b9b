"""Dense attention backend selection: one setting for every family, applied to every transformer call.

SD3's attention processor calls ``F.scaled_dot_product_attention`` directly, so the torch SDPA kernels are
chosen with ``torch.nn.attention.sdpa_kernel`` around the call; FLUX, Qwen-Image and Wan go through diffusers'
attention dispatcher, whose native backend calls the same function, so the same context selects its kernel too.
Backends outside torch SDPA (FlexAttention, SageAttention, flash-attn) are set on the model through the
dispatcher (``set_attention_backend``), which SD3's processor does not consult.

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
DISPATCHER_FAMILIES = ("flux", "qwen_image", "wan")
"""Families whose attention processors call diffusers' dispatcher."""


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
    """Configure the model for backends that live in diffusers' dispatcher (not SD3)."""
    if name not in DISPATCHER_BACKENDS:
        return
    if family not in DISPATCHER_FAMILIES:
        raise ValueError(
            f"attention backend {name!r} goes through diffusers' attention dispatcher, which SD3's processor "
            f"does not use; for SD3 choose one of {['sdpa', *SDPA_KERNELS]}"
        )
    transformer.set_attention_backend(DISPATCHER_BACKENDS[name])


def attention_context(name: str):
    """Context manager that makes ``F.scaled_dot_product_attention`` use the named kernel (no-op otherwise)."""
    if name in SDPA_KERNELS:
        return sdpa_kernel([SDPA_KERNELS[name]])
    return contextlib.nullcontext()
