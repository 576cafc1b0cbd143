"""2x2 max pooling (stride 2, TensorFlow's SAME padding) fused with the ReLU after it, for training on the CPU.

`max_pool_relu(x)` equals `F.relu(F.max_pool2d(x, 2, 2, ceil_mode=True))` bit for bit, output and gradient,
ties and NaNs included (see below). PyTorch's CPU max_pool2d with indices, which training needs, is slow
(about 620 us forward and backward for a (64, 32, 24, 24) bfloat16 channels_last batch on 2 cores, 3.8 ms
for float32 NCHW); a C++ kernel (csrc/pool_relu.cpp) pools and applies ReLU in one pass, keeping one byte
per output: the window position that gets the gradient, or 255 where ReLU cuts it off. The backward
pass only scatters the gradient to those positions.

The kernel is compiled at first use (see cnnkit.kernels.extension). Where it cannot be built (one warning on
the "cnnkit" logger) or with CNNKIT_PURE_PYTORCH=1, `max_pool_relu` is PyTorch's own op: an
exact pure-PyTorch rewrite (four strided views of the windows, a chain of comparisons and `torch.where`)
was 2 to 12 times slower than it, as those run element by element on the CPU. `kernel_name()` says which
is in use.

Float32 and bfloat16 CPU tensors of shape (N, C, H, W) take the C++ path; anything else (other dtypes
and devices, unbatched input, tracing, torch.compile, functorch transforms, forward-mode AD) is computed
by `F.relu(F.max_pool2d(...))` itself.

Semantics copied from PyTorch's CPU kernels: in each window (top-left, top-right, bottom-left,
bottom-right) a larger value or a NaN replaces the running maximum, so the first of equal maxima gets
the gradient, and of several NaNs the last one; ReLU keeps -0.0 and NaN; the gradient reaches the input
only where the output is > 0 or NaN, as 0 + grad (-0.0 becomes +0.0). One difference: the bits of a
bfloat16 NaN output (its sign and payload) are the input's, whereas PyTorch's vectorised bfloat16 paths
turn some NaNs into 0xffff depending on the tensor's length and layout. Double backward is not supported.
"""

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.kernels import extension

__all__ = ["MaxPoolReLU", "kernel_name", "max_pool_relu"]

PURE_PYTORCH = "pure PyTorch"  # the kernels in use when the C++ ones are not


def max_pool_relu(x: torch.Tensor) -> torch.Tensor:
    """`F.relu(F.max_pool2d(x, 2, 2, ceil_mode=True))`, bit for bit, computed faster.

    The output has shape (N, C, ceil(H / 2), ceil(W / 2)) and the memory format PyTorch's op would give
    it (channels_last in, channels_last out), and so has the gradient with respect to x.
    """
    kernels = _kernels() if _fusable(x) else PURE_PYTORCH
    if kernels is PURE_PYTORCH:
        return F.relu(F.max_pool2d(x, 2, 2, ceil_mode=True))
    channels_last = _suggests_channels_last(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _MaxPoolReLU.apply(x, kernels, channels_last)
    return kernels.forward(_dense(x, channels_last), channels_last, False)[0]


class MaxPoolReLU(nn.Module):
    """`max_pool_relu` as a layer: replaces `nn.ReLU(), nn.MaxPool2d(2, 2, ceil_mode=True)` (ReLU and max
    commute, so either order gives these values and gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_relu(x)


def kernel_name() -> str:
    """What `max_pool_relu` computes with, "C++" or "pure PyTorch" (building the C++ kernels if need be)."""
    return PURE_PYTORCH if _kernels() is PURE_PYTORCH else "C++"


class _MaxPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernels, channels_last):
        output, winners = kernels.forward(_dense(x, channels_last), channels_last, True)
        ctx.save_for_backward(winners)
        ctx.kernels, ctx.channels_last, ctx.input_size = kernels, channels_last, x.shape[2:]
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (winners,) = ctx.saved_tensors
        height, width = ctx.input_size
        return ctx.kernels.backward(grad_output, winners, height, width, ctx.channels_last), None, None


def _fusable(x: torch.Tensor) -> bool:
    return (
        not torch.jit.is_tracing()  # first: under tracing, the shape checks below would warn
        and not torch.compiler.is_compiling()
        # a Parameter is a plain tensor here; other subclasses (FakeTensor, ...) go through torch's ops
        and type(x) in (torch.Tensor, nn.Parameter)
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.device.type == "cpu"
        and x.layout == torch.strided
        and min(x.shape[1:]) > 0  # empty channels or images: let torch raise or return as it does
        and not _transform_active()
    )


def _plain_vector(bias) -> bool:
    return (
        type(bias) in (torch.Tensor, torch.nn.Parameter)
        and bias.dim() == 1
        and bias.dtype in (torch.float32, torch.bfloat16)
        and bias.device.type == "cpu"
        and bias.layout == torch.strided
    )


class ConvSharingParameters(nn.Conv2d):
    """The base of the layers that replace an nn.Conv2d (cnnkit.kernels.fuse): `from_conv` makes one
    holding that convolution's own parameters, so the state_dict and the optimizer see no change."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d):
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, device="meta")
        fused.weight, fused.bias = conv.weight, conv.bias
        return fused


def _transform_active() -> bool:
    """Whether a functorch transform (torch.func.grad, vmap) or forward-mode AD is running: then PyTorch's
    own ops compute, since an autograd.Function of C++ kernels has no rules for them. PyTorch has no
    public query for either; its private ones are guarded: where another torch lacks them, this says
    True and PyTorch's ops (the same values, slower) always run."""
    try:
        return (
            bool(torch._C._are_functorch_transforms_active()) or torch.autograd.forward_ad._current_level >= 0
        )
    except AttributeError:
        return True


def _suggests_channels_last(x: torch.Tensor) -> bool:
    """Whether c10's `suggest_memory_format` says channels_last for this 4-d tensor: max_pool2d gives its
    output, and its backward the gradient, that memory format (c10's is_channels_last_strides_2d_s4)."""
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for dim in (1, 3, 2, 0):
        if sizes[dim] == 0 or strides[dim] < smallest:
            return False
        if dim == 0 and smallest == strides[1]:  # ambiguous (N, 1, 1, 1)-like strides count as NCHW
            return False
        smallest = strides[dim] * max(sizes[dim], 1)
    return True


def _dense(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# --- the kernels in use ---


_resolved = None  # the kernels to use instead of cnnkit.extension's (tests and benchmarks set it)


def _kernels():
    """The C++ kernels (a module with `forward` and `backward`), or PURE_PYTORCH."""
    if _resolved is not None:
        return _resolved
    compiled = extension.load()
    return PURE_PYTORCH if compiled is None else compiled.pool_relu
