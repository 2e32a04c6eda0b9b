"""Attention backends and efficient-attention kernels for rollouts (imported as ``tempflow.attention``).

``backends``: the dense kernel used by every transformer call (one setting for every family).
``auto``: whether block-sparse attention or token pruning pays at a shape (``attention_backend: auto``), measured once
and cached.
``selection``: what they selected per sample, recorded in rollouts and replayed in log-prob recomputation.
``mmdit``: the MMDiT block layout and the SD3 / FLUX attention projections that the processors share.
``pruning``: Representation-Shift token pruning for MMDiT blocks.
``block_sparse``: VSA-style block-sparse attention (tile selection, gate, delta correction) and its processors;
``block_sparse_kernels``: its fine stage (FlexAttention, Triton forward/backward, PyTorch reference).
``softpag``: perturbed-attention guidance with a soft perturbation at chosen heads (sampling and evaluation).
"""

ATTENTION_BACKENDS = (
    "auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "sage", "flash_attn",
)
"""Names accepted by ``attention_backend`` (kept here, free of torch imports, for config validation)."""
BLOCK_SPARSE_KERNELS = ("auto", "triton", "flex", "torch")
"""Fine-stage kernels of block-sparse attention (``block_sparse_kernel``)."""

TOKEN_PRUNING, BLOCK_SPARSE = "token pruning", "block-sparse attention"


def check_token_grid_users(users: set[str]) -> None:
    """The one rule between token pruning and block-sparse attention: not both, since pruning changes the token
    set that block-sparse tiles. Config validation and both installers ask here."""
    if {TOKEN_PRUNING, BLOCK_SPARSE} <= users:
        raise ValueError("block-sparse attention and token pruning cannot be combined (pruning changes the token "
                         "grid that block-sparse attention tiles)")
