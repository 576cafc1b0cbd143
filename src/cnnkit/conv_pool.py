"""Moved to cnnkit.kernels.conv_pool; this name is kept for code that imports it."""

from cnnkit.kernels.conv_pool import Conv2dReLUPool, conv_pool_relu, fuses

__all__ = ["Conv2dReLUPool", "conv_pool_relu", "fuses"]
