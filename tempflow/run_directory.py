"""What a run keeps in its ``output_dir``: one run per directory, and checkpoints that are verified before they are
resumed.

A checkpoint ``checkpoint-N/`` is written to a temporary directory and renamed (so a crash mid-write leaves no
half checkpoint), and carries ``manifest.json``: the size and SHA-256 of every file in it. Nothing is resumed
unverified: a checkpoint is usable when it holds its trainer state, its manifest lists exactly its files and every
file matches, and accelerate's torch files and every safetensors file load. Resuming ``latest`` names each damaged
newer checkpoint in one line, moves it aside as ``damaged-checkpoint-N`` and resumes from the newest usable one.

A fresh run refuses an ``output_dir`` that holds another run (its checkpoints would be resumed later, its
metrics mixed with the new ones) unless told to overwrite it, as transformers' trainers do. ``metrics.jsonl`` gets one
JSON record a line; a line that a crash cut short is dropped before the resumed run appends to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
DAMAGED_PREFIX = "damaged-"
TEMPORARY_PREFIX = ".tmp-"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
TRACKER_PROJECT = "tempflow"  # accelerate's trackers log under output_dir/TRACKER_PROJECT
RUN_OUTPUTS = (
    "metrics.json", "metrics.jsonl", "reward_curve.png", "samples", "pytorch_lora_weights.safetensors",
    "block_sparse_gates.safetensors", "transformer", TRACKER_PROJECT,
)
"""What a run writes into output_dir besides its checkpoints."""


# --- one run per directory ------------------------------------------------------------------------------------
def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, resuming: bool) -> None:
    """Raise ``ValueError`` naming the problem if a run cannot write to ``output_dir`` (a file, not writable), or
    if it holds another run that a fresh run (neither ``overwrite`` nor ``resuming``) would mix with. Writes nothing."""
    path = Path(output_dir)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ValueError(f"output_dir {str(path)!r} {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir {str(path)!r} is not writable ({existing}: permission denied or read-only)")
    previous = previous_run_outputs(path)
    if previous and not overwrite and not resuming:
        shown = ", ".join(p.name for p in previous[:4]) + (", ..." if len(previous) > 4 else "")
        raise ValueError(
            f"output_dir {str(path)!r} already holds a run ({shown}); pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint latest to continue it, or choose another output_dir"
        )


def previous_run_outputs(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints and outputs of a run in ``output_dir`` (empty if it holds none)."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    checkpoints = [p for p in path.iterdir() if p.name.startswith((CHECKPOINT_PREFIX, DAMAGED_PREFIX, TEMPORARY_PREFIX))]
    return sorted(checkpoints) + [path / name for name in RUN_OUTPUTS if (path / name).exists()]


def remove_previous_run(output_dir: str | os.PathLike) -> None:
    """Delete what :func:`previous_run_outputs` lists; other files in ``output_dir`` stay."""
    for path in previous_run_outputs(output_dir):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


# --- checkpoints -------------------------------------------------------------------------------------------------
def checkpoint_number(path: Path) -> int | None:
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def numbered_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` directories in ``output_dir``, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_number(p) is not None]
    return sorted(found, key=checkpoint_number)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The numbered checkpoints that hold their trainer state, oldest first."""
    return [p for p in numbered_checkpoints(output_dir) if (p / TRAINER_STATE).is_file()]


def print_notice(message: str) -> None:
    """One line on stderr for something the user should know but that does not stop the run."""
    print(f"tempflow: warning: {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]


def write_manifest(checkpoint: str | os.PathLike) -> None:
    """Record the size and SHA-256 of every file under ``checkpoint`` in its ``manifest.json`` (written last)."""
    root = Path(checkpoint)
    files = {name: {"size": (root / name).stat().st_size, "sha256": _sha256(root / name)} for name in _files_under(root)}
    (root / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def _read_manifest(root: Path) -> dict[str, dict]:
    """The manifest's ``{file: {"size", "sha256"}}``; ``ValueError`` saying what is wrong with it."""
    try:
        files = json.loads((root / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{MANIFEST} is unreadable ({type(err).__name__})") from err
    entries_valid = isinstance(files, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        and not Path(name).is_absolute() and ".." not in Path(name).parts
        for name, entry in files.items())
    if not entries_valid:
        raise ValueError(f"{MANIFEST} is unreadable (an entry is not a file inside the checkpoint with its size "
                         "and sha256)")
    return files


def verify_checkpoint(checkpoint: str | os.PathLike) -> str | None:
    """``None`` if the files of ``checkpoint`` are exactly those its manifest lists, each with its recorded size
    and checksum; else what is wrong, naming the file. A checkpoint without a manifest cannot be verified."""
    root = Path(checkpoint)
    if not (root / MANIFEST).is_file():
        return f"{MANIFEST} is missing, so its files cannot be verified (written by a tempflow older than manifests?)"
    try:
        files = _read_manifest(root)
    except ValueError as err:
        return str(err)
    for name, expected in files.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} when written (truncated or overwritten)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum (its bytes changed since it was written)"
    unlisted = [name for name in _files_under(root) if name not in files]
    if unlisted:
        more = f"; {len(unlisted) - 1} more files are not listed either" if len(unlisted) > 1 else ""
        return f"{unlisted[0]} is not listed in {MANIFEST} (added after the checkpoint was written){more}"
    return None


def unloadable_file(checkpoint: str | os.PathLike) -> str | None:
    """``None`` if every safetensors file of ``checkpoint`` opens and accelerate's torch files (``*.bin`` at its top,
    unpickled with ``weights_only=True`` as accelerate loads them) load; else which file does not, and why."""
    from accelerate.utils import load as accelerate_load
    from safetensors import SafetensorError, safe_open

    root = Path(checkpoint)
    for path in sorted(root.rglob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            return f"{path.relative_to(root).as_posix()} cannot be read ({_first_line(err)})"
    for path in sorted(root.glob("*.bin")):
        if not zipfile.is_zipfile(path):
            return f"{path.name} is not a complete torch file (no zip directory: truncated or overwritten)"
        try:
            accelerate_load(str(path), map_location="cpu", mmap=True)  # mmap: checks the unpickling, reads no data
        except Exception as err:  # torch raises many kinds (pickle, zip, storage errors): any means unusable
            return f"{path.name} cannot be loaded ({type(err).__name__}: {_first_line(err)})"
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """``None`` if ``checkpoint`` can be resumed: it holds its trainer state, verifies against its manifest
    (:func:`verify_checkpoint`) and its files load (:func:`unloadable_file`); else what is wrong, naming the file.
    Without a manifest a file that does not load is named first, as the more precise fault."""
    root = Path(checkpoint)
    if not (root / TRAINER_STATE).is_file():
        return f"{TRAINER_STATE} is missing (the checkpoint is incomplete)"
    if not (root / MANIFEST).is_file():
        return unloadable_file(root) or verify_checkpoint(root)
    return verify_checkpoint(root) or unloadable_file(root)


def checkpoint_to_resume(output_dir: str | os.PathLike, target: str) -> Path | None:
    """The checkpoint that ``resume_from_checkpoint: target`` names, checked by :func:`checkpoint_problem`.

    ``latest``: the newest checkpoint in ``output_dir`` that can be resumed; damaged newer ones are moved aside
    (``damaged-checkpoint-N``, so that neither a later resume nor checkpoint pruning counts them), each named in one
    line on stderr with its bad file. ``None`` when there is no checkpoint at all. A damaged explicit checkpoint,
    or ``latest`` with no checkpoint that can be resumed, raises ``ValueError`` naming the files (and moves
    nothing)."""
    if target != "latest":
        path = Path(target)
        if not path.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint {str(path)!r} is not a directory")
        problem = checkpoint_problem(path)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}; nothing was resumed")
        return path
    checkpoints = numbered_checkpoints(output_dir)
    if not checkpoints:
        return None
    damaged = []
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in damaged:
                aside = _set_aside(bad)
                print_notice(f"checkpoint {bad} is damaged: {why}; moved it to {aside.name}, resuming from {path.name}")
            return path
        damaged.append((path, problem))
    listed = "; ".join(f"{path.name}: {why}" for path, why in damaged)
    raise ValueError(f"no checkpoint in {output_dir} can be resumed, all are damaged ({listed})")


def _set_aside(checkpoint: Path) -> Path:
    aside = checkpoint.with_name(DAMAGED_PREFIX + checkpoint.name)
    n = 1
    while aside.exists():
        aside = checkpoint.with_name(f"{DAMAGED_PREFIX}{checkpoint.name}.{n}")
        n += 1
    checkpoint.rename(aside)
    return aside


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (by iteration)."""
    for path in numbered_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path)


def append_jsonl_record(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` to the JSON-lines file ``path`` as one line. A last line without its newline is what a
    crash mid-write leaves: it is cut off first, so the resumed run's records do not follow half a line."""
    with open(path, "a+b") as file:
        size = file.seek(0, os.SEEK_END)
        if size:
            file.seek(size - 1)
            if file.read(1) != b"\n":
                file.seek(0)
                kept = file.read().rfind(b"\n") + 1
                file.truncate(kept)
        file.seek(0, os.SEEK_END)
        file.write((json.dumps(record) + "\n").encode())
