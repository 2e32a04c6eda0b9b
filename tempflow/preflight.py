"""Cheap checks of what a command names (rewards, prompt sources, the model, a LoRA, where it writes), made
before torch, diffusers and the reward models load: a typo then answers in one line within a second, not after
12-32 s of imports. Each check raises the ``ValueError`` or ``FileNotFoundError`` that the command line prints
as one line; what passes here is read again, fully, where it is used.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import struct
from collections.abc import Iterable
from pathlib import Path

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The file an exported LoRA directory holds (diffusers' ``LORA_WEIGHT_NAME_SAFE``)."""


def check_training_inputs(config) -> None:
    """What a training run (:class:`~tempflow.config.TempFlowGRPOConfig`) names: its output directory (and the
    checkpoint it resumes, when it names one), prompt sets, rewards and model, in the order the trainer uses them."""
    from .run_directory import check_output_dir, checkpoint_to_resume

    resuming = bool(config.resume_from_checkpoint)
    check_output_dir(config.output_dir, config.overwrite_output_dir, resuming=resuming)
    if resuming and config.resume_from_checkpoint != "latest":  # `latest` may set damaged ones aside: the trainer's
        checkpoint_to_resume(config.output_dir, config.resume_from_checkpoint)
    check_prompt_source(config.train_prompts)
    if config.eval_prompts not in (None, "", "none"):
        check_prompt_source(config.eval_prompts)
    check_reward_names([*config.reward_funcs, *config.eval_reward_funcs, *config.gold_reward_funcs])
    check_model(config.model_name_or_path)


# --- rewards ------------------------------------------------------------------------------------------------
def check_reward_names(names: Iterable[str]) -> None:
    """Each name is a built-in reward, or a ``package.module:function`` path to a module that exists (found,
    not imported: importing it may load a model)."""
    registered = registered_reward_names()
    for name in names:
        if ":" in name:
            _check_reward_module(name)
        elif registered is not None and name not in registered:
            raise ValueError(f"unknown reward {name!r}; available: {', '.join(registered)}")


def _check_reward_module(path: str) -> None:
    module = path.partition(":")[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception as err:  # a parent package that is missing, or raises while it is imported
        raise ValueError(f"reward {path!r}: cannot import module {module!r} ({type(err).__name__}: "
                         f"{err})") from None
    if not found:
        raise ValueError(f"reward {path!r}: cannot import module {module!r} (ModuleNotFoundError: No module "
                         f"named {module!r})")


@functools.cache
def registered_reward_names() -> tuple[str, ...] | None:
    """The names that the built-in reward modules register (``@register_reward("name")``), read from their
    source without importing them (they import torch and the reward models' libraries); None where a source
    cannot be read, so that nothing is refused on a guess."""
    try:
        registry = ast.parse(_source_of("tempflow.rewards").read_text(encoding="utf-8"))
        modules = next(ast.literal_eval(node.value) for node in registry.body if isinstance(node, ast.Assign)
                       and getattr(node.targets[0], "id", None) == "_BUILTIN_MODULES")
        names = set()
        for module in modules:
            package, _, leaf = module.rpartition(".")
            source = _source_of(package).parent / f"{leaf}.py"
            names.update(_registered_in(ast.parse(source.read_text(encoding="utf-8"))))
    except (OSError, SyntaxError, ValueError, StopIteration):
        return None
    return tuple(sorted(names))


def _source_of(package: str) -> Path:
    """The ``__init__.py`` of ``package``, found without running it (only its parents are imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise OSError(f"no source of {package}")
    return Path(spec.origin)


def _registered_in(tree: ast.Module) -> set[str]:
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_reward"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)}


# --- prompts ------------------------------------------------------------------------------------------------
def check_prompt_source(source: str) -> None:
    """A prompt file that exists and holds UTF-8 text with a prompt in it, or a registered prompt set that can
    be read: an official one from the cache (fetched when online), ShapesWorld's from the package."""
    from .registry import prompt_set_loader

    path = Path(source)
    if path.is_file():
        _check_prompt_file(path, source)
        return
    loader = prompt_set_loader(source)
    if loader is None:
        if path.is_dir():
            raise ValueError(f"prompt file {source!r} is a folder; name a .txt or .jsonl file in it")
        raise FileNotFoundError(f"prompt file {source!r} does not exist")
    from .prompt_sets import OFFICIAL_PROMPT_SETS, fetch, official_prompt_set

    if source.partition(":")[0] in {name.partition(":")[0] for name in OFFICIAL_PROMPT_SETS}:
        _check_prompt_file(fetch(official_prompt_set(source)), source)  # its loader would import torch
    else:
        loader()


def _check_prompt_file(path: Path, source: str) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {source!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at "
                         f"position {err.start})") from None
    if not text.strip():
        raise ValueError(f"prompt file {source!r} holds no prompts")


# --- models and LoRA ----------------------------------------------------------------------------------------
def looks_like_hub_id(name: str) -> bool:
    """``owner/name``, as ``from_pretrained`` tells a hub id from a path (which starts with ``/``, ``.`` or
    ``~``, or has another number of slashes)."""
    return not name.startswith(("/", ".", "~")) and name.count("/") == 1


def check_model(model_name_or_path: str) -> None:
    """A registered pipeline name, a hub id, or a local pipeline folder: one whose ``model_index.json`` is
    JSON."""
    from .registry import resolve_pipeline

    name = str(model_name_or_path)
    path = Path(resolve_pipeline(name)).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"model path {name!r} holds no model_index.json (a diffusers pipeline "
                                    "folder has one)")
        try:
            json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"model path {name!r}: model_index.json is not valid JSON ({err})") from None
    elif path.exists() or not looks_like_hub_id(name):
        raise FileNotFoundError(f"model path {name!r} does not exist or is not a directory")


def check_lora(directory: str) -> None:
    """A LoRA folder whose weights file is whole: its safetensors header parses and its tensors fill the
    file."""
    weights = Path(directory) / LORA_WEIGHTS
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"LoRA directory {directory!r} does not exist")
    if not weights.is_file():
        raise FileNotFoundError(f"no {LORA_WEIGHTS} in LoRA directory {directory!r}")
    problem = safetensors_problem(weights)
    if problem:
        raise ValueError(f"LoRA weights {str(weights)!r} {problem}")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's layout (an 8-byte header size, a JSON header, then tensor bytes
    that end where the file ends), or None. Reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            return f"are cut short: {size} bytes, too few for a safetensors header"
        header_size = struct.unpack("<Q", prefix)[0]
        if header_size > size - 8:
            return f"are cut short: the header alone needs {header_size} bytes, {size - 8} follow its size"
        try:
            header = json.loads(file.read(header_size))
            tensors = [entry for key, entry in header.items() if key != "__metadata__"]
            described = max((int(entry["data_offsets"][1]) for entry in tensors), default=0)
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
            return "are damaged: the safetensors header is not a table of tensors"
    stored = size - 8 - header_size
    if stored < described:
        return f"are cut short: the header describes {described} bytes of tensors, the file holds {stored}"
    if stored > described:
        return f"are damaged: {stored - described} bytes follow the {described} bytes of tensors it describes"
    return None


def check_output_folder(output: str, flag: str) -> None:
    """A folder that a command can create or write into (``flag`` names the option in the message)."""
    from .run_directory import check_output_dir

    try:
        check_output_dir(output, overwrite=True, resuming=False)  # a file in the way, or no permission
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from None
