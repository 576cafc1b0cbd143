"""The first layer of the chapter's CNN (convolution of one-channel images, bias, 2x2 max pooling, ReLU)
fused into one C++ kernel for training on the CPU.

`conv_pool_relu(x, weight, bias)` computes `F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2, 2,
ceil_mode=True))` for images x of shape (N, 1, H, W) and filters of shape (C, 1, k, k). With one input
channel oneDNN's convolution is slow: for a (64, 1, 28, 28) bfloat16 batch and 32 filters of 5x5 on a
2-core AVX-512 EPYC, about 310 us forward and 370 us for the weight gradient, then 110 and 85 us for
the pooling and ReLU (cnnkit.pooling). The C++ kernel (csrc/conv_pool.cpp) convolves, adds the bias,
pools and applies ReLU in one pass, keeping one byte per output: the window position that won, or 255
where ReLU cut it off; it takes about 190 us. The backward pass computes only the gradients of the
weight and the bias (the images need none): sums over the winning positions alone, a quarter of a
dense weight gradient, without ever writing the gradient of the convolution's output; about 90 us.
Through this function, autograd included: about 210 us forward and 150 us backward.

The output is channels_last. The arithmetic is fixed, so that the results do not depend on the number
of threads nor on the CPU: each convolution output is accumulated in float32, tap by tap in row-major
order (`acc = acc + x * w`, a multiply then an add), then `acc + bias` is rounded to the output's dtype
(bfloat16: to nearest even), then pooled with max_pool2d's rules (the first of equal maxima wins, a NaN
wins) and passed through ReLU (which keeps -0.0 and NaN). That order is not oneDNN's, so the outputs
differ from PyTorch's composition in the last bits, and so, at near-ties, may the winners. The
gradients are sums in float32 over fixed chunks of 8 images, added in chunk order and rounded to the
weight's dtype at the end: deterministic.

Under CPU autocast the inputs are cast as autocast casts them for conv2d (float32 to the autocast dtype;
autograd brings the gradients back to float32 through the casts). Float32 and bfloat16 CPU tensors take
the C++ path; everything else is computed by PyTorch's convolution (cnnkit.kernels.winograd's for float32
5x5 filters on 16, 32, ... channels: the chapter's second layer) and cnnkit.pooling's pooling, which
gives the composition's bits: the kernels not built (see
cnnkit.extension) or built for their portable code (slower than oneDNN: FASTER_THAN_ONEDNN), images that
require a gradient, more than one input channel, a non-square filter, no bias, dtypes that differ,
other dtypes and devices, tracing, torch.compile, functorch transforms, forward-mode AD and tensor
subclasses. Double backward is not supported.
"""

import torch

from cnnkit.kernels import extension
from cnnkit.kernels.pooling import ConvSharingParameters, _fusable, _plain_vector, max_pool_relu
from cnnkit.kernels.winograd import winograd_conv2d

__all__ = ["Conv2dReLUPool", "conv_pool_relu", "fuses"]

_DTYPES = (torch.float32, torch.bfloat16)


def conv_pool_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2, 2, ceil_mode=True))` for x of shape (N, 1, H, W),
    in one pass (see the module's docstring for the arithmetic).

    The output has shape (N, C, ceil((H - k + 1) / 2), ceil((W - k + 1) / 2)), in channels_last memory
    format where the C++ kernel computes it.
    """
    kernels = _kernels() if fuses(x, weight, bias) else None
    if kernels is None:
        return _composition(x, weight, bias)
    x, weight, bias = _autocast(x, weight, bias)
    if not x.dtype == weight.dtype == bias.dtype or x.dtype not in _DTYPES:
        return _composition(x, weight, bias)
    if torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad):
        return _ConvPoolReLU.apply(x, weight, bias, kernels)
    return kernels.forward(x, weight, bias, False)[0]


class Conv2dReLUPool(ConvSharingParameters):
    """An nn.Conv2d (stride 1, no padding, a bias) followed by ReLU and a 2x2 max-pool (ceil mode), as one
    layer: `conv_pool_relu` where it fuses the call, else the convolution module and the fused pooling.
    `from_conv` makes one that shares a convolution's parameters (cnnkit.kernels.fuse)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fuses(x, self.weight, self.bias):
            return conv_pool_relu(x, self.weight, self.bias)
        return max_pool_relu(super().forward(x))  # the module's own convolution: tracers and export see it


class _ConvPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, kernels):
        output, winners = kernels.forward(x, weight, bias, True)
        ctx.save_for_backward(x, weight, winners)
        ctx.kernels = kernels
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, weight, winners = ctx.saved_tensors
        grad_weight, grad_bias = ctx.kernels.backward(grad_output, winners, x, weight)
        _, weight_needed, bias_needed, _ = ctx.needs_input_grad
        return None, grad_weight if weight_needed else None, grad_bias if bias_needed else None, None


def _composition(x, weight, bias):
    """The convolution (PyTorch's, or for float32 5x5 filters on many channels cnnkit.kernels.winograd's),
    then cnnkit.pooling's fused pooling and ReLU (the bits of PyTorch's own)."""
    return max_pool_relu(winograd_conv2d(x, weight, bias))


def fuses(x, weight, bias) -> bool:
    """Whether `conv_pool_relu` computes this call in one pass where the C++ kernels are built: false
    under tracing, torch.compile and FX's symbolic tracing among others (see the module's docstring);
    the dtypes are checked later, after autocast's casts."""
    if not (_fusable(x) and _fusable(weight) and _plain_vector(bias)):
        return False
    channels, in_channels, k, k_width = weight.shape
    return (
        x.shape[1] == 1
        and channels > 0
        and in_channels == 1
        and k == k_width
        and bias.shape[0] == channels
        and min(x.shape[2:]) >= k
        and not (torch.is_grad_enabled() and x.requires_grad)  # no gradient for the images
    )


def _autocast(*tensors):
    """What CPU autocast does to conv2d's arguments: floating-point tensors other than float64 in the
    autocast dtype (an autograd.Function is invisible to autocast)."""
    if not torch.is_autocast_enabled("cpu"):
        return tensors
    dtype = torch.get_autocast_dtype("cpu")
    return tuple(t if t.dtype in (dtype, torch.float64) else t.to(dtype) for t in tensors)


# The instruction-set levels at which the kernels beat oneDNN's convolution. Measured (benchmarks/
# bench_conv_pool.py) for the chapter's first layer, 64 images, fp32, forward and backward, 2 cores of a
# Sapphire Rapids Xeon: 658 us with AVX-512 against 4,367 us for oneDNN; at the avx2 level 4,374 us
# against 6,894 us for oneDNN capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, emulating an AVX2 CPU); the
# portable code (no vector extension chosen) is not faster than oneDNN on any CPU we have.
FASTER_THAN_ONEDNN = ("avx512_bf16", "avx512", "avx2")


def _kernels():
    """The C++ kernels (a module with `forward` and `backward`), or None where they cannot be built or
    were built for a level where they are slower than PyTorch's ops (see FASTER_THAN_ONEDNN)."""
    compiled = extension.load()
    return compiled.conv_pool if compiled is not None and compiled.isa in FASTER_THAN_ONEDNN else None
