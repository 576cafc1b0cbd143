"""The chapter's second convolution (5x5 filters, stride 1, no padding) in float32 on the CPU as a Winograd
convolution F(4x4, 5x5): about a sixth of the multiplications of the direct convolution.

Each 8x8 tile of the input (tiles 4 apart, so they overlap by 4) is transformed, V = B^T d B; each filter
too, U = G g G^T (8x8); the transformed tiles and filters are multiplied position by position and summed
over the input channels, M = sum_c U * V (for each of the 64 positions, one matrix product over tiles x
channels x filters: torch.bmm); and each tile's 4x4 block of output comes back as A^T M A, plus the bias.
For the chapter's (64, 32, 12, 12) batch and 64 filters that is 34 million multiply-adds in the products
against 210 million for the direct convolution; the backward pass is the transpose of each step (two
more products, for the weights and the images). The transforms (csrc/winograd.cpp) move and combine the
numbers; the matrices are built here, exactly, from the interpolation points 0, 1, -1, 2, -2, 1/2,
-1/2 and infinity.

The arithmetic is fixed for a given number of threads, as oneDNN's is, but not the direct convolution's:
the transforms add and subtract multiples of the inputs before they are multiplied, so the rounding
errors are larger. Measured against float64 on random activations and filters of the chapter's scale:
outputs within 6e-6 of the largest output (oneDNN's convolution: 9e-7), gradients within 5e-6 for the
images and 1.1e-5 for the filters (oneDNN: 5e-7 and 1.1e-6), well below what bfloat16 training rounds
away (4e-3). The 20-epoch Fashion-MNIST accuracy is in docs/performance.md.

`winograd_conv2d(x, weight, bias)` computes `F.conv2d(x, weight, bias)` this way where `fuses` says it
can: float32 CPU tensors outside autocast (bf16 goes to oneDNN, whose bf16 kernels are faster), C++
kernels built at a level listed in FASTER_THAN_ONEDNN, 5x5 filters, a bias, channels and filters in
multiples of 16, one image's Winograd tensors within MAX_DOMAIN_BYTES; not under tracing,
torch.compile, export and the like (cnnkit.kernels.pooling._fusable). Elsewhere the module's own
convolution runs, so exports and int8 see a plain convolution.
"""

import functools
from fractions import Fraction

import torch
import torch.nn.functional as F

from cnnkit.kernels import extension
from cnnkit.kernels.pooling import ConvSharingParameters, _fusable, _plain_vector

__all__ = ["WinogradConv2d", "fuses", "winograd_conv2d"]

TILE, OUT, KERNEL = 8, 4, 5
LANES = 16  # channels and filters in multiples of 16 (the kernels work in whole vectors)
POINTS = (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))  # and infinity


def matrices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A^T 4x8, G 8x5, B^T 8x8) of F(4, 5), exact in rationals and rounded once to float32 (Toom-Cook:
    A^T and G from the points; B^T the one matrix for which A^T [(G g) * (B^T d)] is the correlation of
    d with g, found by solving that identity's linear equations)."""
    n = OUT + KERNEL - 1
    a_t = [[Fraction(p) ** i for p in POINTS] + [Fraction(int(i == OUT - 1))] for i in range(OUT)]
    g = []
    for j, p in enumerate(POINTS):
        norm = Fraction(1)
        for q in POINTS[:j] + POINTS[j + 1 :]:
            norm *= Fraction(p) - Fraction(q)
        g.append([Fraction(p) ** k / norm for k in range(KERNEL)])
    g.append([Fraction(int(k == KERNEL - 1)) for k in range(KERNEL)])
    # B^T column by column: for each column c, sum_j A^T[i][j] G[j][k] B^T[j][c] = [c == i + k] for all (i, k).
    equations = [[a_t[i][j] * g[j][k] for j in range(n)] for i in range(OUT) for k in range(KERNEL)]
    columns = [
        _solve(equations, [Fraction(int(c == i + k)) for i in range(OUT) for k in range(KERNEL)])
        for c in range(n)
    ]
    b_t = [[columns[c][j] for c in range(n)] for j in range(n)]
    return _float32(a_t), _float32(g), _float32(b_t)


def _float32(matrix) -> torch.Tensor:
    return torch.tensor([[float(v) for v in row] for row in matrix], dtype=torch.float32)


def _solve(equations, values):
    """The exact solution of a consistent linear system (more equations than unknowns), through its
    normal equations, by Gauss-Jordan elimination in rationals."""
    n = len(equations[0])
    a = [[sum(e[i] * e[j] for e in equations) for j in range(n)] for i in range(n)]
    b = [sum(e[i] * v for e, v in zip(equations, values, strict=True)) for i in range(n)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if a[r][col] != 0)
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for r in range(n):
            if r != col and a[r][col] != 0:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
                b[r] -= f * b[col]
    solution = [b[j] / a[j][j] for j in range(n)]
    assert all(
        sum(c * x for c, x in zip(e, solution, strict=True)) == v
        for e, v in zip(equations, values, strict=True)
    )
    return solution


@functools.cache
def _g_kron() -> torch.Tensor:
    """G kron G (64 x 25): vec(G g G^T) = (G kron G) vec(g). (A^T and B^T are compiled into
    csrc/winograd.cpp; a test compares them with `matrices()`.) Made at first use: 40 ms of rationals."""
    g = matrices()[1]
    return torch.kron(g, g)


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.conv2d(x, weight, bias)` (5x5 filters, stride 1, no padding) as a Winograd convolution where
    `fuses` holds and the kernels are built; otherwise F.conv2d itself. The output is channels_last."""
    kernels = _kernels() if fuses(x, weight, bias) else None
    if kernels is None:
        return F.conv2d(x, weight, bias)
    return _in_chunks(x, weight, bias, kernels)


class WinogradConv2d(ConvSharingParameters):
    """An nn.Conv2d (5x5, stride 1, no padding, a bias) that runs as `winograd_conv2d` where that applies.
    `from_conv` makes one sharing a convolution's parameters (cnnkit.kernels.fuse)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not computes(self):  # made with padding, a stride, ...: the convolution it was asked for
            return super().forward(x)
        return winograd_conv2d(x, self.weight, self.bias)


def computes(conv: torch.nn.Conv2d) -> bool:
    """Whether a convolution module is one `winograd_conv2d` computes: 5x5, stride 1, no padding, a bias,
    channels and filters in multiples of 16 (cnnkit.kernels.fuse swaps WinogradConv2d in for these)."""
    return (
        conv.kernel_size == (KERNEL, KERNEL)
        and conv.in_channels % LANES == 0
        and conv.out_channels % LANES == 0
        and conv.bias is not None
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


# The most memory the Winograd domain of one call may take: 64 positions x tiles x the larger of the
# channels and the filters, in float32 (for the chapter's batch of 64 images, 4 MB; its inference chunks
# of 256, 16 MB). It is about 6x the output's size.
MAX_DOMAIN_BYTES = 64 * 2**20


def _in_chunks(x, weight, bias, kernels):
    """The Winograd convolution of as many images at a time as MAX_DOMAIN_BYTES allows (each image's
    outputs do not depend on the others'); where gradients are wanted the batch goes whole, or to
    PyTorch's convolution when it does not fit (`fuses` has made sure one image fits)."""
    per_image = _domain_bytes(x[:1], weight)
    chunk = max(1, MAX_DOMAIN_BYTES // per_image)
    if len(x) <= chunk:
        return _Winograd.apply(x, weight, bias, kernels)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return F.conv2d(x, weight, bias)
    return torch.cat([_Winograd.apply(part, weight, bias, kernels) for part in x.split(chunk)]).contiguous(
        memory_format=torch.channels_last
    )


def _domain_bytes(x, weight) -> int:
    _, _, th, tw = _tiles(x)
    return TILE * TILE * len(x) * th * tw * max(x.shape[1], weight.shape[0]) * 4


def _tiles(x) -> tuple[int, int, int, int]:
    """The output's height and width, and its 4x4 blocks down and across."""
    oh, ow = x.shape[2] - KERNEL + 1, x.shape[3] - KERNEL + 1
    return oh, ow, -(-oh // OUT), -(-ow // OUT)


class _Winograd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, kernels):
        n, c, h, w = x.shape
        o = weight.shape[0]
        oh, ow, th, tw = _tiles(x)
        v = kernels.input_transform(x.contiguous(memory_format=torch.channels_last), th, tw)
        u = (_g_kron() @ weight.permute(2, 3, 1, 0).reshape(KERNEL * KERNEL, c * o)).view(TILE * TILE, c, o)
        m = torch.bmm(v, u)
        ctx.save_for_backward(v, u)
        ctx.shape, ctx.kernels = (n, c, h, w, o, th, tw), kernels
        return kernels.output_transform(m, bias.contiguous(), n, th, tw, oh, ow)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        v, u = ctx.saved_tensors
        n, c, h, w, o, th, tw = ctx.shape
        kernels = ctx.kernels
        grad_output = grad_output.contiguous(memory_format=torch.channels_last)
        dm = kernels.output_transform_backward(grad_output, th, tw)
        x_needed, weight_needed, bias_needed, _ = ctx.needs_input_grad
        grad_x = grad_weight = grad_bias = None
        if x_needed:
            grad_x = kernels.input_transform_backward(torch.bmm(dm, u.transpose(1, 2)), n, h, w, th, tw)
        if weight_needed:
            du = torch.bmm(v.transpose(1, 2), dm).view(TILE * TILE, c * o)
            grad_weight = (_g_kron().T @ du).view(KERNEL, KERNEL, c, o).permute(3, 2, 0, 1)
        if bias_needed:
            grad_bias = grad_output.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


def fuses(x, weight, bias) -> bool:
    """Whether `winograd_conv2d` computes this call (see the module's docstring)."""
    if not (_fusable(x) and _fusable(weight) and bias is not None and _plain_vector(bias)):
        return False
    return (
        x.dtype == weight.dtype == bias.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and x.dim() == 4
        and weight.shape[2:] == (KERNEL, KERNEL)
        and x.shape[1] == weight.shape[1]
        and x.shape[1] % LANES == 0
        and weight.shape[0] % LANES == 0
        and bias.shape == (weight.shape[0],)
        and min(x.shape[2:]) >= KERNEL
        and x.shape[0] > 0
        and _domain_bytes(x[:1], weight) <= MAX_DOMAIN_BYTES
    )


# The instruction-set levels at which this beats oneDNN's fp32 convolution. Measured on the Sapphire Rapids
# Xeon, (64, 32, 12, 12) images, 64 filters, 2 threads, forward and backward: 3.0 ms against 5.2 for
# oneDNN capped to AVX512_CORE_VNNI; at avx2, 3.8-4.0 ms against 8.5 for oneDNN capped to AVX2
# (ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2). The portable code is not measured against it.
FASTER_THAN_ONEDNN = ("avx512_bf16", "avx512", "avx2")


def _kernels():
    compiled = extension.load()
    return compiled.winograd if compiled is not None and compiled.isa in FASTER_THAN_ONEDNN else None
