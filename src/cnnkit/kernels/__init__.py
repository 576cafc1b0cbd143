"""cnnkit's fast CPU path, optional as a whole: C++ kernels built at first use (`extension`), the layers
made of them (`pooling.MaxPoolReLU`, `conv_pool.Conv2dReLUPool`, `winograd.WinogradConv2d`: the second
convolution in float32), and bf16 training with float32 master weights (`master_weights`).

`fuse(model)` is the one switch: it swaps the fused layers into a network built of PyTorch's modules,
sharing its parameters, so that printing the model shows what runs and its state_dict does not change.
The one fallback: where the C++ kernels cannot be built, or CNNKIT_MAX_ISA=pytorch asks for none, every
fused layer computes with PyTorch's own ops (the same values; see each module).
"""

from torch import nn

from cnnkit.kernels import winograd
from cnnkit.kernels.conv_pool import Conv2dReLUPool
from cnnkit.kernels.pooling import MaxPoolReLU
from cnnkit.kernels.winograd import WinogradConv2d

__all__ = ["Conv2dReLUPool", "MaxPoolReLU", "WinogradConv2d", "fuse"]


def fuse(model: nn.Module) -> nn.Module:
    """Replace, in place, in every nn.Sequential of `model`, each (Conv2d, ReLU, 2x2 max-pool) run whose
    convolution the fused layer can compute (one input channel, stride 1, no padding, a bias, a square
    kernel) with one Conv2dReLUPool, and each remaining (ReLU, 2x2
    max-pool) pair with MaxPoolReLU, and each other convolution Winograd's can compute (5x5, stride 1, no
    padding, a bias, channels and filters in multiples of 16) with WinogradConv2d, which runs only in
    float32 outside autocast; the replaced positions become nn.Identity, so the parameters and
    their names stay as they were. Returns `model`."""
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            _fuse_sequence(module)
    return model


def _fuse_sequence(sequential: nn.Sequential):
    modules = list(sequential)
    i = 0
    while i < len(modules):
        if _is_relu(modules, i) and _is_pool(modules, i + 1):
            sequential[i], sequential[i + 1] = MaxPoolReLU(), nn.Identity()
            i += 2
        elif _is_plain_conv(modules[i]) and _is_relu(modules, i + 1) and _is_pool(modules, i + 2):
            sequential[i] = Conv2dReLUPool.from_conv(modules[i])
            sequential[i + 1], sequential[i + 2] = nn.Identity(), nn.Identity()
            i += 3
        elif type(modules[i]) is nn.Conv2d and winograd.computes(modules[i]):
            sequential[i] = WinogradConv2d.from_conv(modules[i])
            i += 1
        else:
            i += 1


def _is_relu(modules, i) -> bool:
    return i < len(modules) and type(modules[i]) is nn.ReLU


def _is_pool(modules, i) -> bool:
    pool = modules[i] if i < len(modules) else None
    return (
        type(pool) is nn.MaxPool2d
        and pool.kernel_size in (2, (2, 2))
        and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0))
        and pool.dilation in (1, (1, 1))
        and pool.ceil_mode
        and not pool.return_indices
    )


def _is_plain_conv(conv) -> bool:
    return (  # the fused layer's kernels take images of one channel (see conv_pool.fuses)
        type(conv) is nn.Conv2d
        and conv.in_channels == 1
        and conv.bias is not None
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.kernel_size[0] == conv.kernel_size[1]
    )
