"""Moved to cnnkit.kernels.pooling; this name is kept for code that imports it."""

from cnnkit.kernels.pooling import MaxPoolReLU, kernel_name, max_pool_relu

__all__ = ["MaxPoolReLU", "kernel_name", "max_pool_relu"]
