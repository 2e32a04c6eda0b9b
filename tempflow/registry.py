"""Named prompt sets and pipelines, so that a world such as ShapesWorld plugs in the way a user's would.

``register_prompt_sets(prefix)`` makes ``"prefix:name"`` a prompt source (``load_prompts``, recipes'
``train_prompts``); ``register_pipeline(name)`` makes ``name`` a ``model_name_or_path`` that resolves to a local
pipeline directory. Built-in sources (the ShapesWorld world, the official prompt sets of
:mod:`tempflow.prompt_sets`) register themselves when their module is imported, which happens on the first lookup.
Free of heavy imports: config validation and the CLI read it before loading any model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

_BUILTIN_SOURCES = ("tempflow.shapes", "tempflow.prompt_sets")
_PROMPT_SETS: dict[str, Callable[[str], list[dict]]] = {}
_PIPELINES: dict[str, Callable[[], Path]] = {}


def register_prompt_sets(prefix: str):
    """Decorator: ``loader(name) -> [{"prompt": ..., **metadata}]`` serves the prompt sources ``prefix:name``."""

    def decorate(loader):
        _PROMPT_SETS[prefix] = loader
        return loader

    return decorate


def register_pipeline(name: str):
    """Decorator: ``locate() -> Path`` gives the pipeline directory that ``model_name_or_path: name`` loads."""

    def decorate(locate):
        _PIPELINES[name] = locate
        return locate

    return decorate


def _load_builtin_sources() -> None:
    for module in _BUILTIN_SOURCES:
        importlib.import_module(module)


def prompt_set_loader(source: str) -> Callable[[], list[dict]] | None:
    """A loader for ``source`` when it names a registered prompt set (``prefix:name``), else None."""
    prefix, colon, name = source.partition(":")
    if not colon:
        return None
    _load_builtin_sources()
    loader = _PROMPT_SETS.get(prefix)
    return None if loader is None else lambda: loader(name)


def resolve_pipeline(model_name_or_path: str) -> str:
    """The directory of a registered pipeline name; any other name or path passes through unchanged."""
    _load_builtin_sources()
    locate = _PIPELINES.get(model_name_or_path)
    return model_name_or_path if locate is None else str(locate())
