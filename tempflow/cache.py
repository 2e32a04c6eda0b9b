"""Where tempflow keeps what it fetches or measures once per machine: the official prompt sets
(:mod:`tempflow.prompt_sets`) and the attention backend timings of ``attention_backend: auto``.

``$TEMPFLOW_CACHE``, else a ``tempflow`` folder under the Hugging Face cache home (``$HF_HOME``, by default
``~/.cache/huggingface``), so clusters that already place and share the Hugging Face cache get tempflow's beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TEMPFLOW_CACHE"


def cache_root() -> Path:
    """``$TEMPFLOW_CACHE``, else ``tempflow`` under the Hugging Face cache home."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "tempflow"
