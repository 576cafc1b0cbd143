"""Every path of cnnkit's C++ kernels that this machine can run, forced with CNNKIT_MAX_ISA.

The other kernel tests (test_conv_pool, test_pooling, test_master_weights) run the kernels built for
this CPU, or for the level CNNKIT_MAX_ISA caps them to (CI runs the quick suite once more capped to
`portable`). Here each level below this CPU's best is built (a build of about 20 s each, so these tests are
slow) and checked against the same references: the compiler was held to the level, the fused first
layer and the fused pooling give the reference's bits, the C++ Adam gives torch's fused Adam's, and the
Winograd transforms give the bits of this CPU's own build.
"""

import pytest
import torch
from test_conv_pool import (
    assert_same_bits,
    float64_gradients,
    make_inputs,
    random_grad_output,
)
from test_conv_pool import reference as conv_reference
from test_master_weights import _moments
from test_pooling import assert_same_bits as assert_same_pool_bits
from test_pooling import forward_backward, make_input
from test_pooling import reference as pool_reference

from cnnkit.kernels import extension, pooling

BELOW_THIS_CPU = [
    level
    for level in extension.ISA_LEVELS[extension.ISA_LEVELS.index(extension.machine_isa()) + 1 :]
    if level != "pytorch"
]
CONV_SHAPES = [(64, 28, 28, 32, 5), (3, 11, 9, 5, 3), (2, 15, 14, 33, 4), (2, 9, 11, 16, 1)]
POOL_SHAPES = [(64, 32, 24, 24), (3, 5, 7, 9), (2, 20, 37, 35), (1, 16, 6, 64)]


@pytest.fixture(scope="module", params=BELOW_THIS_CPU or [pytest.param(None, marks=pytest.mark.skip)])
def capped(request):
    """The kernels built for one level below this CPU's best (none on a CPU of the lowest level)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CNNKIT_MAX_ISA", request.param)
        assert extension.isa() == request.param
        module = extension._load_extension()
    module.level = request.param
    return module


pytestmark = pytest.mark.slow


def test_the_compiler_was_held_to_the_level(capped):
    assert capped.isa == capped.level  # what the compiler's predefined macros said
    assert capped.conv_pool.vectorised == (capped.level == "avx512")
    # torch's build appends to the flag lists it is given: cnnkit's own, hashed into every build's
    # name, stay as they were, so another process finds this build under the same name
    assert extension.CFLAGS == ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    assert extension.LDFLAGS == ["-fopenmp"]


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_fused_first_layer_gives_the_references_bits(capped, dtype, kind):
    """Called directly: below AVX-512 cnnkit.conv_pool does not use these kernels (slower than oneDNN),
    but they must still be right."""
    for shape in CONV_SHAPES:
        x, weight, bias = make_inputs(shape, dtype, kind)
        output, winners = capped.conv_pool.forward(x, weight, bias, True)
        assert_same_bits(output, conv_reference(x, weight, bias))
        grad_output = random_grad_output(output.shape, dtype)
        grad_weight, grad_bias = capped.conv_pool.backward(grad_output, winners, x, weight)
        expected_weight, expected_bias, weight_terms, bias_terms = float64_gradients(
            x, weight, bias, grad_output
        )
        for actual, expected, magnitudes in (
            (grad_weight, expected_weight, weight_terms),
            (grad_bias, expected_bias, bias_terms),
        ):
            error = (actual.double() - expected).abs()
            if dtype == torch.float32:
                assert (error <= 1e-5 * magnitudes).all(), (shape, error.max())
            else:
                ulp = torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(2.0**-126))) - 7)
                assert (error <= ulp).all(), (shape, (error / ulp).max())


@pytest.mark.parametrize("kind", ["normal", "ties", "negative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"]
)
def test_the_fused_pooling_gives_pytorchs_bits(capped, monkeypatch, memory_format, dtype, kind):
    monkeypatch.setattr(pooling, "_resolved", capped.pool_relu)
    for shape in POOL_SHAPES:
        x = make_input(kind, shape, dtype, memory_format)
        output, grad = forward_backward(pooling.max_pool_relu, x)
        expected_output, expected_grad = forward_backward(pool_reference, x)
        assert_same_pool_bits(output, expected_output)
        assert_same_pool_bits(grad, expected_grad)


@pytest.mark.parametrize("shape", [(1024, 1024), (33,), (64, 32, 5, 5)])
def test_the_cpp_adam_is_torchs_fused_adam_bit_for_bit(capped, shape):
    generator = torch.Generator().manual_seed(len(shape))
    ours = _moments(shape, generator)
    torchs = [t.clone() for t in ours]
    copy = torch.empty_like(ours[0], dtype=torch.bfloat16)
    reference = torch.optim.Adam([torchs[0]], lr=1e-3, fused=True)
    reference.state[torchs[0]] = {"step": torch.tensor(0.0), "exp_avg": torchs[1], "exp_avg_sq": torchs[2]}
    our_step = torch.tensor(0.0)
    for step in range(6):
        grad = (torch.randn(shape, generator=generator) * 10.0 ** -(step % 6)).to(torch.bfloat16)
        our_step += 1
        capped.adam.step([ours[0]], [grad], [ours[1]], [ours[2]], [copy], [our_step], 1e-3, 0.9, 0.999, 1e-8)
        torchs[0].grad = grad.float()
        reference.step()
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), ours, torchs, strict=True):
            assert torch.equal(a, b), (name, step)
        assert torch.equal(copy, ours[0].to(torch.bfloat16))


def test_the_winograd_transforms_give_this_cpus_bits(capped, cpp_extension):
    """Each transform is products and sums in a fixed order, compiled without fused multiply-adds: every
    level computes the bits of the best one."""
    best, ours = cpp_extension.winograd, capped.winograd
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 32, 13, 10, generator=generator).contiguous(memory_format=torch.channels_last)
    th, tw = 3, 2  # outputs 9 x 6 in 4x4 blocks
    products = torch.randn(64, 3 * th * tw, 16, generator=generator)
    bias = torch.randn(16, generator=generator)
    grad = torch.randn(3, 16, 9, 6, generator=generator).contiguous(memory_format=torch.channels_last)
    v = torch.randn(64, 3 * th * tw, 32, generator=generator)
    assert torch.equal(ours.input_transform(x, th, tw), best.input_transform(x, th, tw))
    assert torch.equal(
        ours.output_transform(products, bias, 3, th, tw, 9, 6),
        best.output_transform(products, bias, 3, th, tw, 9, 6),
    )
    assert torch.equal(
        ours.output_transform_backward(grad, th, tw), best.output_transform_backward(grad, th, tw)
    )
    assert torch.equal(
        ours.input_transform_backward(v, 3, 13, 10, th, tw),
        best.input_transform_backward(v, 3, 13, 10, th, tw),
    )
