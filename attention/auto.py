"""``attention_backend: auto`` for the approximate methods: a recipe's block-sparse attention or token pruning is used
only where a measurement on this GPU, at this shape, says the whole transformer step (selection included) is at least
:data:`MIN_SPEEDUP` times faster than the dense step; otherwise attention stays dense. Never slower than dense is the
point: at image sizes attention is 10–20 % of a step, so most sparse settings cannot pay there (BENCHMARKS.md).

A decision is measured once per GPU name × model family × batch × tokens × dtype × method and kept in a JSON file
(``attention_auto.json`` in tempflow's cache, :mod:`tempflow.cache`), so later runs read it. On the CPU there is
nothing to measure that would predict a GPU: ``auto`` is dense there.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MIN_SPEEDUP = 1.15
"""The whole-step speed-up an approximate method must show to be used under ``auto``."""
CACHE_FILE = "attention_auto.json"


@dataclass(frozen=True)
class AutoDecision:
    """Whether ``method`` runs, and the measurement that said so."""

    method: str
    """What was asked for, e.g. ``block-sparse 0.125 (8x8 tiles)``."""
    use: bool
    reason: str
    ratio: float | None = None
    """Dense step time over the method's step time (None: not measured)."""
    dense_ms: float | None = None
    method_ms: float | None = None
    key: str = ""
    cached: bool = False

    def line(self) -> str:
        """The one line a run logs about it."""
        verdict = "on" if self.use else "off (dense attention)"
        return f"attention_backend auto: {self.method} -> {verdict}: {self.reason}"


def cache_path() -> Path:
    from ..cache import cache_root

    return cache_root() / CACHE_FILE


def decide(key: str, method: str, measure: Callable[[], tuple[float, float]], path: Path | None = None) -> AutoDecision:
    """Use ``method`` iff dense / method ≥ :data:`MIN_SPEEDUP`, from the cache entry ``key`` or, without one, from
    ``measure()`` — (dense seconds, method seconds) of one whole transformer step — whose result is then cached."""
    path = path or cache_path()
    cache = _read(path)
    entry = cache.get(key)
    cached = isinstance(entry, dict) and all(isinstance(entry.get(f), (int, float)) and entry[f] > 0
                                             for f in ("dense_ms", "method_ms"))
    if cached:
        dense_s, method_s = entry["dense_ms"] / 1000, entry["method_ms"] / 1000
    else:
        dense_s, method_s = measure()
        cache[key] = {"dense_ms": 1000 * dense_s, "method_ms": 1000 * method_s, "ratio": dense_s / method_s,
                      "measured": time.strftime("%Y-%m-%d")}
        _write(path, cache)
    ratio = dense_s / method_s
    source = f"cached in {path}" if cached else f"measured, cached in {path}"
    reason = (f"{ratio:.2f}x the dense step ({1000 * dense_s:.1f} vs {1000 * method_s:.1f} ms; "
              f"{'at least' if ratio >= MIN_SPEEDUP else 'below'} the {MIN_SPEEDUP}x it must show; {source})")
    return AutoDecision(method, ratio >= MIN_SPEEDUP, reason, ratio, 1000 * dense_s, 1000 * method_s, key, cached)


def on_the_cpu(method: str) -> AutoDecision:
    return AutoDecision(method, False, "on the CPU auto is dense (a CPU measurement predicts no GPU); choose a dense "
                                       "kernel explicitly, e.g. attention_backend: sdpa, to run it anyway")


def decision_key(device: torch.device, family: str, batch: int, tokens: int, dtype: torch.dtype, method: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name} | {family} | batch {batch} | {tokens} tokens | {str(dtype).removeprefix('torch.')} | {method}"


def step_seconds(step: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of ``step()`` (synchronised on CUDA), after ``warmup`` calls that absorb kernel choices
    and compilation."""
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only home: decide again next time
