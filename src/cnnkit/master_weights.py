"""Moved to cnnkit.kernels.master_weights; this name is kept for code that imports it."""

from cnnkit.kernels.master_weights import bf16_weights

__all__ = ["bf16_weights"]
