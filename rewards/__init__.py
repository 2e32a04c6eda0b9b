"""Reward functions and their registry (imported as ``tempflow.rewards``).

A reward is any callable ``reward(images, prompts, **metadata) -> list[float]``:

- ``images``: a float tensor ``[B, 3, H, W]`` with values in ``[0, 1]`` (decoded once by the trainer; use
  :func:`to_pil` or :func:`to_uint8` if a model wants another form). For video models an image reward gets the
  videos' frames as images and its scores are averaged per video; a reward marked ``video_reward = True`` gets the
  videos ``[B, F, 3, H, W]`` themselves (:mod:`tempflow.rewards.video`);
- ``prompts``: the ``B`` prompt strings;
- ``metadata``: one list of ``B`` values per extra key of the prompt file (e.g. a ShapesWorld scene spec).

It returns one float per image, or ``None`` for an image it cannot score. Register one with
:func:`register_reward`, or name it in a recipe as ``"package.module:function"``. A registered *class* is
instantiated (with keyword arguments from the recipe) before use, so model-based rewards load once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np
import torch

RewardFunc = Callable[..., list]

_REGISTRY: dict[str, Callable] = {}
_BUILTIN_MODULES = (
    "tempflow.rewards.simple",
    "tempflow.rewards.video",
    "tempflow.shapes.reward",
    "tempflow.rewards.pickscore",
    "tempflow.rewards.clip_similarity",
    "tempflow.rewards.edit_clip",
    "tempflow.rewards.aesthetic",
    "tempflow.rewards.ocr",
    "tempflow.rewards.geneval",
    "tempflow.rewards.remote",
)


def register_reward(name: str):
    """Decorator: make a reward function (or a reward class) available under ``name``."""

    def decorate(obj):
        if name in _REGISTRY and _REGISTRY[name] is not obj:
            raise ValueError(f"a reward named {name!r} is already registered")
        _REGISTRY[name] = obj
        return obj

    return decorate


_BROKEN_BUILTINS: dict[str, str] = {}
"""Built-in reward modules that failed to import, with the error: one broken module (a missing optional
dependency, say) must not take the other rewards down with it."""


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        if module in _BROKEN_BUILTINS:
            continue
        try:
            importlib.import_module(module)
        except Exception as err:
            _BROKEN_BUILTINS[module] = f"{type(err).__name__}: {err}"


def available() -> list[str]:
    """Names of all registered rewards."""
    _load_builtins()
    return sorted(_REGISTRY)


def _import_path(path: str):
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a missing module, or one that raises while it is imported
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({type(err).__name__}: {err})") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}") from None


def get_reward(name: str, **kwargs) -> RewardFunc:
    """Resolve a registered name or a ``"package.module:function"`` path to a ready reward callable."""
    if ":" in name:
        obj = _import_path(name)
    else:
        _load_builtins()
        if name not in _REGISTRY:
            broken = "".join(f"; {module} failed to import ({error})" for module, error in _BROKEN_BUILTINS.items())
            raise ValueError(f"unknown reward {name!r}; available: {', '.join(available())}{broken}")
        obj = _REGISTRY[name]
    if isinstance(obj, type):
        return obj(**kwargs)
    if kwargs:
        raise ValueError(f"reward {name!r} is a function and takes no construction arguments")
    if not callable(obj):
        raise ValueError(f"reward {name!r} is not callable")
    return obj


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` floats in [0, 1] → ``[B, H, W, 3]`` uint8 array."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list:
    """``[B, 3, H, W]`` floats in [0, 1] → list of PIL images."""
    from PIL import Image

    return [Image.fromarray(array) for array in to_uint8(images)]


__all__ = ["RewardFunc", "available", "get_reward", "register_reward", "to_pil", "to_uint8"]
