"""What a run keeps in its ``output_dir``: one run per directory, and checkpoints that cannot be resumed damaged.

A checkpoint ``checkpoint-N/`` is written to a temporary directory and renamed (so a crash mid-write leaves no
half checkpoint), and carries ``manifest.json``: the size and SHA-256 of every file in it. Resuming verifies the
manifest; a damaged newest checkpoint (flipped bytes, a truncated file) is named, moved aside as
``damaged-checkpoint-N`` and the run resumes from the newest checkpoint that verifies.

A fresh run refuses an ``output_dir`` that holds another run (its checkpoints would be resumed later, its
metrics mixed with the new ones) unless told to overwrite it, as transformers' trainers do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(checkpoint: str | os.PathLike) -> None:
    """Record the size and SHA-256 of every file under ``checkpoint`` in its ``manifest.json`` (written last)."""
    root = Path(checkpoint)
    files = {
        path.relative_to(root).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST
    }
    (root / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def verify_checkpoint(checkpoint: str | os.PathLike) -> str | None:
    """``None`` if every file of ``checkpoint`` matches its manifest, else what is wrong, naming the file. A
    checkpoint written before manifests existed is accepted with a warning."""
    root = Path(checkpoint)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        warnings.warn(f"{root} has no {MANIFEST} (written by an older tempflow): resuming it unverified", stacklevel=2)
        return None
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, expected in files.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} when written (truncated or overwritten)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum (its bytes changed since it was written)"
    return None


def checkpoint_to_resume(output_dir: str | os.PathLike, target: str) -> Path | None:
    """The checkpoint that ``resume_from_checkpoint: target`` names, verified.

    ``latest``: the newest complete checkpoint in ``output_dir`` that verifies; damaged newer ones are moved aside
    (``damaged-checkpoint-N``, so that neither a later resume nor checkpoint pruning counts them) with a warning
    naming the bad file. ``None`` when there is no checkpoint at all. A damaged explicit checkpoint, or ``latest``
    with no checkpoint that verifies, raises ``ValueError`` naming the files (and moves nothing)."""
    if target != "latest":
        path = Path(target)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"{path} is not a complete tempflow checkpoint (no {TRAINER_STATE})")
        problem = verify_checkpoint(path)
        if problem:
            raise ValueError(f"checkpoint {path} is damaged: {problem}")
        return path
    checkpoints = complete_checkpoints(output_dir)
    if not checkpoints:
        return None
    damaged = []
    for path in reversed(checkpoints):
        problem = verify_checkpoint(path)
        if problem is None:
            for bad, why in damaged:
                aside = _set_aside(bad)
                warnings.warn(f"checkpoint {bad} is damaged ({why}); moved it to {aside.name} and resuming from "
                              f"{path.name}", stacklevel=2)
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
