"""cnnkit.conv_pool: the fused first layer (convolution of one-channel images, bias, max pooling, ReLU).

The C++ forward pass is compared bit for bit with a pure-PyTorch computation in the kernel's fixed
order (`reference`), not with F.conv2d (oneDNN sums in another order). Its gradients are compared with
float64 sums over the same winning positions, between thread counts (bit for bit), and with PyTorch's
composition where the convolution is exact (integer values). Where the C++ path does not apply,
conv_pool_relu must be PyTorch's composition itself.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cnnkit.kernels import conv_pool, extension
from cnnkit.kernels.conv_pool import conv_pool_relu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
# (N, H, W, C, k): the chapter's layer, one image, odd and even sizes (ceil mode's edge windows), channel
# counts that are and are not multiples of 16, and every filter size the kernels treat apart.
SHAPES = [
    (64, 28, 28, 32, 5),
    (1, 28, 28, 32, 5),
    (3, 11, 9, 5, 3),
    (2, 12, 13, 20, 5),
    (9, 15, 14, 17, 7),
    (2, 15, 14, 33, 4),
    (1, 20, 21, 3, 9),
    (2, 10, 10, 16, 1),
    (2, 9, 11, 16, 1),
    (3, 12, 12, 17, 2),
    (2, 5, 5, 2, 5),
]


@pytest.fixture
def cpp_kernels(cpp_extension, monkeypatch):
    """The C++ kernels, which conv_pool_relu then uses even where cnnkit would not (built without
    AVX-512: on such a CPU, or under CNNKIT_MAX_ISA=avx2 or portable), so that every path's code is
    tested through it."""
    kernels = cpp_extension.conv_pool
    if not kernels.vectorised:
        monkeypatch.setattr(conv_pool, "_kernels", lambda: kernels)
    return kernels


@pytest.fixture
def pure_pytorch(monkeypatch):
    """conv_pool_relu as if the C++ kernels could not be built."""
    monkeypatch.setattr(conv_pool, "_kernels", lambda: None)


def composition(x, weight, bias):
    return F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2, 2, ceil_mode=True))


def reference_convolution(x, weight, bias):
    """The kernel's arithmetic in PyTorch: float32 sums tap by tap (a multiply, then an add), the bias
    last, rounded to the dtype of x."""
    n, _, height, width = x.shape
    channels, _, k, _ = weight.shape
    rows, columns = height - k + 1, width - k + 1
    images, taps = x.float(), weight.float().reshape(channels, k * k)
    acc = torch.zeros(n, channels, rows, columns)
    for i in range(k):
        for j in range(k):
            tap = taps[:, i * k + j].view(1, channels, 1, 1)
            acc = acc + images[:, :, i : i + rows, j : j + columns] * tap
    return (acc + bias.float().view(1, channels, 1, 1)).to(x.dtype)


def reference(x, weight, bias):
    return F.relu(F.max_pool2d(reference_convolution(x, weight, bias), 2, 2, ceil_mode=True))


def make_inputs(shape, dtype, kind="normal", seed=0):
    n, height, width, channels, k = shape
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.rand(n, 1, height, width, generator=generator)
        weight = torch.randn(channels, 1, k, k, generator=generator) * 0.3
        bias = torch.randn(channels, generator=generator) * 0.1
    elif kind == "ties":  # small integers: exact sums, many equal maxima and all-equal windows
        x = torch.randint(-2, 3, (n, 1, height, width), generator=generator).float()
        weight = torch.randint(-2, 3, (channels, 1, k, k), generator=generator).float()
        bias = torch.randint(-2, 3, (channels,), generator=generator).float()
    else:
        raise ValueError(kind)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def assert_same_bits(actual, expected, nan_bits=True):
    """Same dtype, shape and bits; nan_bits=False: NaNs only need to be NaN where expected has NaNs."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if not nan_bits:
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(actual), nan), "NaNs in different places"
        actual, expected = actual.masked_fill(nan, 0), expected.masked_fill(nan, 0)
    differ = actual.contiguous().view(BITS[actual.dtype]) != expected.contiguous().view(BITS[actual.dtype])
    assert not differ.any(), (
        f"{int(differ.sum())} of {actual.numel()} differ, first at {differ.nonzero()[0].tolist()}"
    )


def gradients(fn, x, weight, bias, grad_output):
    weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    output = fn(x, weight, bias)
    output.backward(grad_output)
    return output, weight.grad, bias.grad


def float64_gradients(x, weight, bias, grad_output):
    """The weight and bias gradients summed in float64 over the winning positions of the reference's
    convolution, and the sums of the terms' magnitudes (for tolerances)."""
    conv = reference_convolution(x, weight, bias)
    pooled, indices = F.max_pool2d(conv, 2, 2, ceil_mode=True, return_indices=True)
    n, channels = pooled.shape[:2]
    k, width, columns = weight.shape[-1], x.shape[-1], conv.shape[-1]
    keep = ~(pooled <= 0)  # ReLU passes no gradient where out <= 0 (NaN passes)
    g = torch.where(keep, grad_output.double(), 0)
    rows, cols = indices // columns, indices % columns
    images = x.double().reshape(n, 1, -1).expand(n, channels, -1)
    grad_weight = torch.empty(channels, 1, k, k, dtype=torch.float64)
    magnitudes = torch.empty_like(grad_weight)
    for i in range(k):
        for j in range(k):
            values = images.gather(2, ((rows + i) * width + cols + j).reshape(n, channels, -1))
            terms = torch.where(keep, g * values.reshape(g.shape), 0)
            grad_weight[:, 0, i, j] = terms.sum((0, 2, 3))
            magnitudes[:, 0, i, j] = terms.abs().sum((0, 2, 3))
    return grad_weight, g.sum((0, 2, 3)), magnitudes, g.abs().sum((0, 2, 3))


# --- forward, bit for bit ---


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_is_the_reference_bit_for_bit(cpp_kernels, shape, dtype, kind):
    x, weight, bias = make_inputs(shape, dtype, kind)
    output = conv_pool_relu(x, weight, bias)
    assert_same_bits(output, reference(x, weight, bias))
    assert output.is_contiguous(memory_format=torch.channels_last)
    n, height, width, channels, k = shape
    assert output.shape == (n, channels, (height - k + 2) // 2, (width - k + 2) // 2)


SPECIAL_VALUES = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    2.0,
    float("inf"),
    float("-inf"),
    float("nan"),
    1e-40,
    -3e-39,
    2.0**-70,
]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_special_values(cpp_kernels, dtype, seed):
    """Signed zeros, infinities, NaNs, subnormals and tiny values (whose products underflow), in some
    images of a batch, in the weights or in the bias: the same values (NaNs where the reference has
    them), and in bfloat16 NaN is 0x7fc0 (c10's NaN)."""
    generator = torch.Generator().manual_seed(seed)
    x, weight, bias = make_inputs((6, 12, 11, 20, 5), torch.float32, "normal", seed)
    values = torch.tensor(SPECIAL_VALUES)
    where = seed % 3
    if where == 0:  # a few values in some images
        mask = torch.rand(x.shape, generator=generator) < 0.05
        mask[::2] = False
        x = torch.where(mask, values[torch.randint(len(values), x.shape, generator=generator)], x)
    elif where == 1:  # in the weights, and tiny images
        mask = torch.rand(weight.shape, generator=generator) < 0.1
        weight = torch.where(
            mask, values[torch.randint(len(values), weight.shape, generator=generator)], weight
        )
        x[1] = x[1] * 2.0**-60
    else:  # in the bias, and huge images that overflow
        bias = values[torch.randint(len(values), bias.shape, generator=generator)]
        x[2] = x[2] * 2.0**120
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    output = conv_pool_relu(x, weight, bias)
    assert_same_bits(output, reference(x, weight, bias), nan_bits=False)
    if dtype == torch.bfloat16:
        nan = torch.isnan(output)
        assert (output[nan].view(torch.int16) == 0x7FC0).all()


def test_images_of_one_batch_are_independent(cpp_kernels):
    """An image's output does not depend on the others' values (some of which take another path)."""
    x, weight, bias = make_inputs((8, 28, 28, 32, 5), torch.bfloat16)
    odd = x.clone()
    odd[3, 0, 5, 7] = float("nan")
    odd[5] = odd[5] * 2.0**-100
    batch = conv_pool_relu(odd, weight, bias)
    for n in range(8):
        assert_same_bits(batch[n : n + 1], conv_pool_relu(odd[n : n + 1], weight, bias))
    assert_same_bits(batch[[0, 1, 2, 4, 6, 7]], conv_pool_relu(x, weight, bias)[[0, 1, 2, 4, 6, 7]])


# --- backward ---


def random_grad_output(shape, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradients_are_the_float64_sums_over_the_winners(cpp_kernels, shape, dtype):
    x, weight, bias = make_inputs(shape, dtype)
    n, height, width, channels, k = shape
    grad_output = random_grad_output((n, channels, (height - k + 2) // 2, (width - k + 2) // 2), dtype)
    output, grad_weight, grad_bias = gradients(conv_pool_relu, x, weight, bias, grad_output)
    assert output.grad_fn.name() == "_ConvPoolReLUBackward"  # the C++ kernels'
    assert grad_weight.dtype == dtype and grad_bias.dtype == dtype
    expected_weight, expected_bias, weight_terms, bias_terms = float64_gradients(x, weight, bias, grad_output)
    for actual, expected, magnitudes in (
        (grad_weight, expected_weight, weight_terms),
        (grad_bias, expected_bias, bias_terms),
    ):
        error = (actual.double() - expected).abs()
        if dtype == torch.float32:
            assert (error <= 1e-5 * magnitudes).all(), error.max()
        else:  # one bfloat16 ulp at the float64 value's magnitude
            ulp = torch.exp2(torch.floor(torch.log2(expected.abs().clamp_min(2.0**-126))) - 7)
            assert (error <= ulp).all(), (error / ulp).max()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gradients_skip_what_relu_cuts_off(cpp_kernels, dtype):
    """Where ReLU cuts the output off, the gradient there is not used, even infinite or NaN."""
    x, weight, bias = make_inputs((8, 14, 14, 16, 5), dtype)
    bias = bias - 1.0  # many windows cut off
    output = conv_pool_relu(x, weight, bias)
    grad_output = random_grad_output(output.shape, dtype)
    cut = output <= 0
    assert 0.2 < cut.float().mean() < 0.9
    poisoned = grad_output.masked_fill(cut, float("nan"))
    poisoned[cut & (torch.rand(cut.shape, generator=torch.Generator().manual_seed(2)) < 0.5)] = float("inf")
    _, weight_grad, bias_grad = gradients(conv_pool_relu, x, weight, bias, grad_output)
    _, poisoned_weight_grad, poisoned_bias_grad = gradients(conv_pool_relu, x, weight, bias, poisoned)
    assert_same_bits(poisoned_weight_grad, weight_grad)
    assert_same_bits(poisoned_bias_grad, bias_grad)


@pytest.mark.parametrize("kind", ["normal", "tiny"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gradients_do_not_depend_on_the_threads(cpp_kernels, dtype, kind):
    """Bit for bit with 1 and 2 threads, for a batch that is not a whole number of chunks (and, "tiny",
    gradients whose products underflow: in bfloat16, fused multiply-adds instead of VDPBF16PS for their
    chunk)."""
    x, weight, bias = make_inputs((61, 28, 28, 32, 5), dtype)
    grad_output = random_grad_output((61, 32, 12, 12), dtype)
    if kind == "tiny":
        grad_output[17] = grad_output[17] * 2.0**-120
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(gradients(conv_pool_relu, x, weight, bias, grad_output))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert_same_bits(one, two)


@pytest.mark.parametrize(
    "shape", [(16, 28, 28, 32, 5), (5, 13, 12, 20, 3)], ids=lambda s: "x".join(map(str, s))
)
def test_gradients_match_pytorchs_where_the_convolution_is_exact(cpp_kernels, shape):
    """Integer values: both convolutions are exact, so the winners are the same, and the gradients
    differ only in the order of their sums."""
    x, weight, bias = make_inputs(shape, torch.float32, "ties")
    grad_output = random_grad_output(reference(x, weight, bias).shape, torch.float32)
    output, grad_weight, grad_bias = gradients(conv_pool_relu, x, weight, bias, grad_output)
    expected_output, expected_weight, expected_bias = gradients(composition, x, weight, bias, grad_output)
    assert torch.equal(output, expected_output)
    torch.testing.assert_close(grad_weight, expected_weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_bias, expected_bias, rtol=1e-4, atol=1e-4)


def test_gradients_are_close_to_pytorchs_in_float32(cpp_kernels):
    """Random values: the convolutions round differently, so near-ties may pick other winners; with
    these, there are none, and the gradients agree closely."""
    x, weight, bias = make_inputs((8, 28, 28, 32, 5), torch.float32)
    grad_output = random_grad_output((8, 32, 12, 12), torch.float32)
    output, grad_weight, grad_bias = gradients(conv_pool_relu, x, weight, bias, grad_output)
    expected_output, expected_weight, expected_bias = gradients(composition, x, weight, bias, grad_output)
    torch.testing.assert_close(output, expected_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight, expected_weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad_bias, expected_bias, rtol=1e-4, atol=1e-4)


# --- memory formats, autocast, no gradients ---


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_memory_formats(cpp_kernels, dtype):
    """A channels_last weight gives the same bits as a contiguous one, and its gradient has its strides;
    the gradient with respect to the output may come in any layout."""
    x, weight, bias = make_inputs((4, 16, 15, 20, 5), dtype)
    grad_output = random_grad_output((4, 20, 6, 6), dtype)
    results = {}
    for name, w in [
        ("contiguous", weight.contiguous()),
        ("channels_last", torch.empty_strided(weight.shape, (25, 1, 5, 1), dtype=dtype).copy_(weight)),
    ]:
        for layout, g in [
            ("NCHW", grad_output.contiguous()),
            ("NHWC", grad_output.contiguous(memory_format=torch.channels_last)),
        ]:
            output, grad_weight, grad_bias = gradients(conv_pool_relu, x, w, bias, g)
            assert grad_weight.stride() == w.stride()
            assert output.is_contiguous(memory_format=torch.channels_last)
            results[name, layout] = (output, grad_weight, grad_bias)
    first = results["contiguous", "NCHW"]
    for result in results.values():
        for actual, expected in zip(result, first, strict=True):
            assert_same_bits(actual, expected)
    # x in channels_last strides (the same memory with one channel), a strided bias, and an expanded
    # gradient (that of .sum())
    assert_same_bits(conv_pool_relu(x.contiguous(memory_format=torch.channels_last), weight, bias), first[0])
    strided_bias = torch.stack([bias, -bias], 1)[:, 0]
    assert strided_bias.stride() == (2,)
    output, grad_weight, grad_bias = gradients(conv_pool_relu, x, weight, strided_bias, grad_output)
    for actual, expected in zip((output, grad_weight, grad_bias), first, strict=True):
        assert_same_bits(actual, expected)
    _, sum_weight, sum_bias = gradients(
        conv_pool_relu, x, weight, bias, torch.ones((), dtype=dtype).expand(4, 20, 6, 6)
    )
    _, ones_weight, ones_bias = gradients(
        conv_pool_relu, x, weight, bias, torch.ones(4, 20, 6, 6, dtype=dtype)
    )
    assert_same_bits(sum_weight, ones_weight)
    assert_same_bits(sum_bias, ones_bias)


def test_under_autocast_float32_inputs_are_cast_as_for_conv2d(cpp_kernels):
    x, weight, bias = make_inputs((4, 28, 28, 32, 5), torch.float32)
    weight, bias = weight.requires_grad_(), bias.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = conv_pool_relu(x, weight, bias)
        assert output.dtype == torch.bfloat16
        assert composition(x, weight, bias).dtype == torch.bfloat16  # what autocast does to conv2d
    grad_output = random_grad_output(output.shape, torch.bfloat16)
    output.backward(grad_output)
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    expected_output, expected_weight, expected_bias = gradients(
        conv_pool_relu, x.bfloat16(), weight.bfloat16(), bias.bfloat16(), grad_output
    )
    assert_same_bits(output, expected_output)
    assert_same_bits(weight.grad, expected_weight.float())
    assert_same_bits(bias.grad, expected_bias.float())


def test_without_gradients(cpp_kernels):
    x, weight, bias = make_inputs((3, 14, 13, 20, 5), torch.bfloat16)
    expected = conv_pool_relu(x, weight.requires_grad_(), bias)
    assert expected.requires_grad
    with torch.no_grad():
        output = conv_pool_relu(x, weight, bias)
    assert not output.requires_grad
    assert_same_bits(output, expected.detach())
    with torch.inference_mode():
        output = conv_pool_relu(x, weight, bias)
    assert output.is_inference()
    assert_same_bits(output, expected.detach())
    empty = conv_pool_relu(x[:0], weight, bias)
    assert empty.shape == (0, 20, 5, 5)


def test_only_the_gradients_asked_for(cpp_kernels):
    x, weight, bias = make_inputs((2, 12, 12, 16, 5), torch.float32)
    weight.requires_grad_()
    conv_pool_relu(x, weight, bias).sum().backward()
    assert weight.grad is not None and bias.grad is None


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_an_empty_batch_has_zero_gradients(cpp_kernels, dtype):
    x, weight, bias = make_inputs((0, 12, 12, 16, 5), dtype)
    output, grad_weight, grad_bias = gradients(
        conv_pool_relu, x, weight, bias, torch.ones(0, 16, 4, 4, dtype=dtype)
    )
    assert output.shape == (0, 16, 4, 4)
    assert not grad_weight.any() and not grad_bias.any()


# --- PyTorch's composition where the kernel does not apply ---


def assert_is_the_composition(x, weight, bias):
    leaves = [
        t.detach().requires_grad_() if t is not None and t.is_floating_point() else t
        for t in (x, weight, bias)
    ]
    expected_leaves = [
        t.detach().requires_grad_() if t is not None and t.is_floating_point() else t
        for t in (x, weight, bias)
    ]
    output = conv_pool_relu(*leaves)
    expected = composition(*expected_leaves)
    assert torch.equal(output, expected) and output.stride() == expected.stride()
    grad_output = torch.randn(output.shape).to(output.dtype)
    output.backward(grad_output)
    expected.backward(grad_output)
    for leaf, expected_leaf in zip(leaves, expected_leaves, strict=True):
        if leaf is not None and leaf.is_floating_point():
            assert torch.equal(leaf.grad, expected_leaf.grad)


@pytest.mark.parametrize(
    "case",
    [
        "x requires grad",
        "3 input channels",
        "float64",
        "float16",
        "no bias",
        "non-square filter",
        "no filters",
    ],
)
def test_other_inputs_take_pytorchs_path(cpp_kernels, case):
    x, weight, bias = make_inputs((2, 12, 11, 4, 3), torch.float32)
    if case == "x requires grad":  # the kernel computes no gradient for the images
        assert_is_the_composition(x, weight, bias)  # (every leaf requires grad there)
        return
    if case == "3 input channels":
        x, weight = x.expand(2, 3, 12, 11).contiguous(), weight.expand(4, 3, 3, 3).contiguous()
    elif case in ("float64", "float16"):
        dtype = torch.float64 if case == "float64" else torch.float16
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    elif case == "no bias":
        bias = None
    elif case == "non-square filter":
        weight = weight[:, :, :, :2].contiguous()
    elif case == "no filters":  # PyTorch raises
        weight, bias = weight[:0], bias[:0]
        with pytest.raises(RuntimeError) as expected:
            composition(x, weight, bias)
        with pytest.raises(RuntimeError) as raised:
            conv_pool_relu(x, weight, bias)
        assert str(raised.value) == str(expected.value)
        return
    output = conv_pool_relu(x, weight, bias)
    assert torch.equal(output, composition(x, weight, bias))


def test_without_the_cpp_kernels_it_is_pytorchs_composition(pure_pytorch):
    x, weight, bias = make_inputs((3, 14, 13, 20, 5), torch.bfloat16)
    weight.requires_grad_()
    output = conv_pool_relu(x, weight, bias)
    assert output.grad_fn.name() != "_ConvPoolReLUBackward"  # PyTorch's convolution, cnnkit.pooling's pooling
    ours = torch.autograd.grad(output, weight, torch.ones_like(output))
    expected = composition(x, weight, bias)
    assert torch.equal(output, expected)
    assert torch.equal(ours[0], torch.autograd.grad(expected, weight, torch.ones_like(expected))[0])


def test_kernels_built_for_their_portable_code_are_not_used(cpp_extension, monkeypatch):
    """Compiled without vector extensions, the C++ code is slower than PyTorch's ops: not used."""
    monkeypatch.setattr(
        extension,
        "load",
        lambda: SimpleNamespace(isa="portable", conv_pool=SimpleNamespace(vectorised=False)),
    )
    assert conv_pool._kernels() is None
    cpp_kernels = cpp_extension.conv_pool
    monkeypatch.setattr(extension, "load", lambda: cpp_extension)
    # The kernels built for this CPU (or the level CNNKIT_MAX_ISA caps them to): AVX-512 code at the
    # AVX-512 levels, and used from AVX2 up.
    assert cpp_kernels.vectorised == (extension.isa() in ("avx512_bf16", "avx512"))
    assert (conv_pool._kernels() is cpp_kernels) == (cpp_extension.isa in ("avx512_bf16", "avx512", "avx2"))


def test_dtypes_that_differ_raise_as_pytorch_does(cpp_kernels):
    x, weight, bias = make_inputs((2, 12, 11, 4, 3), torch.float32)
    with pytest.raises(RuntimeError) as expected:
        composition(x, weight.bfloat16(), bias)
    with pytest.raises(RuntimeError) as raised:
        conv_pool_relu(x, weight.bfloat16(), bias)
    assert str(raised.value) == str(expected.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, used by these transforms
def test_transforms_tracing_and_export_see_pytorchs_ops(cpp_kernels, recwarn):
    x, weight, bias = make_inputs((2, 12, 11, 4, 3), torch.float32)
    # functorch: a gradient with respect to the weight, by torch.func
    grad = torch.func.grad(lambda w: conv_pool_relu(x, w, bias).sum())(weight)
    expected = torch.func.grad(lambda w: composition(x, w, bias).sum())(weight)
    assert torch.equal(grad, expected)
    # forward-mode AD
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(weight, torch.ones_like(weight))
        tangent = torch.autograd.forward_ad.unpack_dual(conv_pool_relu(x, dual, bias)).tangent
    assert tangent is not None
    # tracing and export record conv2d, max_pool2d and relu
    traced = torch.jit.trace(lambda images: conv_pool_relu(images, weight, bias), (x,))
    graph = str(traced.inlined_graph)
    assert "aten::_convolution" in graph and "aten::max_pool2d" in graph
    assert not [w for w in recwarn if issubclass(w.category, torch.jit.TracerWarning)]

    class Layer(torch.nn.Module):
        def forward(self, images):
            return conv_pool_relu(images, weight, bias)

    program = torch.export.export(Layer(), (x,))
    assert "aten.conv2d.default" in {str(node.target) for node in program.graph.nodes}


@pytest.mark.parametrize("build", ["layers", "lowlevel"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_chapters_network_runs_its_first_layer_fused(cpp_kernels, monkeypatch, build, precision):
    """Through its nn.Parameters, in training (with the bf16 weight copies of cnnkit.master_weights) and
    in inference."""
    from cnnkit.kernels.master_weights import bf16_weights
    from cnnkit.model import Architecture, build_model
    from cnnkit.training import make_optimizer

    calls = []
    apply = conv_pool._ConvPoolReLU.apply
    monkeypatch.setattr(conv_pool._ConvPoolReLU, "apply", lambda *args: calls.append("train") or apply(*args))
    forward = cpp_kernels.forward
    monkeypatch.setattr(
        conv_pool,
        "_kernels",
        lambda: SimpleNamespace(
            forward=lambda *a: calls.append("kernel") or forward(*a),
            backward=cpp_kernels.backward,
            vectorised=True,
        ),
    )
    model = build_model(Architecture(conv_channels=(4, 8), hidden_units=16), build=build, seed=0)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(3, 1, 28, 28)
    with (
        bf16_weights(model, make_optimizer(model, 1e-3), precision),
        torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"),
    ):
        model(x).sum().backward()
    assert calls == ["train", "kernel"]
    model.eval()
    with torch.inference_mode():
        model(x)
    assert calls == ["train", "kernel", "kernel"]
