"""Prompt sets: plain text (one prompt a line) or JSONL (a `prompt` key plus metadata passed to rewards, or an edit:
a source `image` and an `instruction`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .editing import is_edit_record, resolve_edit_record
from .registry import prompt_set_loader


def load_prompts(source: str) -> list[dict]:
    """Records ``{"prompt": str, **metadata}`` from a .txt/.jsonl file or a registered prompt set (``prefix:name``,
    e.g. ShapesWorld's ``shapes:train``). JSONL edit records (``image`` relative to the file, ``instruction``) get
    the instruction as their prompt and an absolute, checked image path (:mod:`tempflow.editing`). Raises
    ``ValueError`` naming the file (and line) for empty or malformed input, or an image that cannot be read."""
    path = Path(source)
    registered = None if path.is_file() else prompt_set_loader(source)
    if registered is not None:
        return registered()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {source!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at position "
                         f"{err.start})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise ValueError(f"prompt file {source!r} holds no prompts")
    if path.suffix != ".jsonl":
        return [{"prompt": line} for _, line in lines]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"prompt file {source!r}, line {n}: not valid JSON ({err.msg})") from None
        if isinstance(record, dict) and is_edit_record(record):  # an edit: instruction + source image
            record = resolve_edit_record(record, path.parent, f"prompt file {source!r}, line {n}")
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"prompt file {source!r}, line {n}: expected an object with a string `prompt` (or an "
                             "edit: `image` and `instruction`)")
        records.append(record)
    return records


def spread_subset(records: list[dict], count: int | None) -> list[dict]:
    """``count`` records spread evenly over the list (all when ``count`` is None or too large), in order.

    Held-out files are often grouped by task (GenEval's metadata, ShapesWorld's eval set), so the first n
    prompts would cover only the first tasks; an even spread keeps every task's share.
    """
    if count is None or count >= len(records):
        return list(records)
    return [records[int(i)] for i in np.linspace(0, len(records) - 1, count).round()]


def metadata_columns(records: list[dict]) -> dict[str, list]:
    """Per-key lists of the records' metadata (every key but ``prompt``), the way rewards receive them."""
    keys = sorted({key for record in records for key in record if key != "prompt"})
    return {key: [record.get(key) for record in records] for key in keys}


def record_task(record: dict) -> str | None:
    """The task a prompt record belongs to, for per-task scores: a ``task`` key, GenEval's ``tag``, or the task of
    a ShapesWorld ``spec``; ``None`` when the record names none."""
    spec = record.get("spec")
    task = record.get("task") or record.get("tag") or (spec.get("task") if isinstance(spec, dict) else None)
    return None if task is None else str(task)


def task_labels(records: list[dict]) -> list[str] | None:
    """Each record's task (``"(none)"`` for a record without one), or ``None`` when no record names a task."""
    labels = [record_task(r) for r in records]
    return None if all(label is None for label in labels) else [label or "(none)" for label in labels]


def select_tasks(records: list[dict], tasks: list[str] | None, source: str) -> list[dict]:
    """The records of ``tasks`` (see :func:`record_task`), all of them when ``tasks`` is None. Raises
    ``ValueError`` naming ``source`` when a task has no prompt there."""
    if tasks is None:
        return records
    kept = [r for r in records if record_task(r) in tasks]
    missing = sorted(set(tasks) - {record_task(r) for r in kept})
    if missing:
        found = sorted({str(record_task(r)) for r in records})
        raise ValueError(f"prompt_tasks: {source!r} has no prompt of task(s) {', '.join(missing)}; "
                         f"its tasks: {', '.join(found)}")
    return kept
