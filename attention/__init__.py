"""Attention backends and efficient-attention kernels for rollouts (imported as ``tempflow.attention``).

``backends``: the dense kernel used by every transformer call (one setting for SD3 and FLUX).
"""

ATTENTION_BACKENDS = (
    "auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "sage", "flash_attn",
)
"""Names accepted by ``attention_backend`` (kept here, free of torch imports, for config validation)."""
