"""What a training run says while it starts and, with its progress bars off, while it trains: one line per
stage on stdout, flushed at once, from the main process only. Torch-free, so that the first line comes before
the heavy imports (about 6 s of them on a CPU); and the libraries' loading bars, off with the run's own."""

from __future__ import annotations

import contextlib
import os
import time


def is_main_process() -> bool:
    """Rank 0 of a launch (``RANK``, as torchrun, accelerate and DeepSpeed set it), or a process started
    alone: known before accelerate starts."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """Print ``tempflow: {message}`` on the main process."""
    if is_main_process():
        print(f"tempflow: {message}", flush=True)


@contextlib.contextmanager
def stage(doing: str):
    """Say ``{doing} ...`` now, and ``{doing}: done in N s`` when the block ends without an error."""
    say(f"{doing} ...")
    start = time.perf_counter()
    yield
    say(f"{doing}: done in {time.perf_counter() - start:.1f} s")


def count(number: int) -> str:
    """``1234567`` → ``1.2 M``: parameter counts at a glance."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if number >= size:
            return f"{number / size:.1f} {unit}"
    return str(number)


@contextlib.contextmanager
def loading_bars(shown: bool):
    """diffusers', transformers' and the hub's loading bars (``Loading pipeline components``, ``Loading
    weights``, ``Fetching files``) on or off for the block: their own process-wide switches, restored
    after it."""
    if shown:
        yield
        return
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was_on = (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled(),
              not hub.are_progress_bars_disabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        enablers = (diffusers_logging.enable_progress_bar, transformers_logging.enable_progress_bar,
                    hub.enable_progress_bars)
        for on, enable in zip(was_on, enablers):
            if on:
                enable()
