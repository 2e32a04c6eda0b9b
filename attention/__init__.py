"""Attention backends and efficient-attention kernels for rollouts (imported as ``tempflow.attention``)."""
