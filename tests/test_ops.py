"""cnnkit.ops against np.convolve, scipy.signal.convolve2d and torch, plus the chapter's own examples."""

import math

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cnnkit import ops
from cnnkit.ops import conv1d, conv2d, conv2d_multi, max_pool2d, mean_pool2d

FAST = settings(max_examples=60, deadline=None)

NOTEBOOK_X1 = [1, 3, 2, 4, 5, 6, 1, 3]
NOTEBOOK_W1 = [1, 0, 3, 1, 2]
NOTEBOOK_X2 = [[1, 2, 3, 4], [5, 6, 1, 3], [1, 6, 0, 3], [3, 4, 3, 2]]
NOTEBOOK_W2 = [[1, 0, 3], [1, 2, 1], [0, 1, 1]]
NOTEBOOK_OUT2 = [[10, 24, 33, 14], [23, 24, 37, 14], [17, 36, 30, 19], [11, 21, 18, 10]]


def random_array(seed, shape, integer):
    """Small integers (exact in every dtype) or standard normal float64."""
    rng = np.random.default_rng(seed)
    return rng.integers(-9, 10, size=shape) if integer else rng.standard_normal(shape)


def assert_matches(ours, reference, integer):
    assert ours.shape == reference.shape
    if integer:
        assert ours.dtype.kind == "i"
        assert np.array_equal(ours, reference)
    else:
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-10)


@pytest.fixture(params=["banded", "im2col"])
def method(request, monkeypatch):
    """Run a test once with each of ops' two correlation methods forced (through the public API)."""
    monkeypatch.setattr(ops, "_BANDED_MAX_FILTERS", 10**9 if request.param == "banded" else 0)
    return request.param


seeds = st.integers(0, 2**32 - 1)


# --- conv1d ----------------------------------------------------------------------------------------------


def test_conv1d_reproduces_the_notebook_example():
    out = conv1d(NOTEBOOK_X1, NOTEBOOK_W1, padding=2, stride=1)
    assert np.array_equal(out, [5, 14, 16, 26, 24, 34, 19, 22])
    assert out.dtype.kind == "i"


def test_conv1d_stride_2_is_every_other_element_of_stride_1():
    out = conv1d(NOTEBOOK_X1, NOTEBOOK_W1, padding=2, stride=2)
    assert np.array_equal(out, [5, 16, 24, 19])


@FAST
@given(seed=seeds, n=st.integers(1, 20), m=st.integers(1, 20), integer=st.booleans(),
       mode=st.sampled_from(ops.MODES))  # fmt: skip
def test_conv1d_mode_equals_np_convolve(seed, n, m, integer, mode):
    x, w = random_array(seed, n, integer), random_array(seed + 1, m, integer)
    assert_matches(conv1d(x, w, mode=mode), np.convolve(x, w, mode), integer)


@FAST
@given(seed=seeds, n=st.integers(1, 20), m=st.integers(1, 9), padding=st.integers(0, 9),
       stride=st.integers(1, 5), integer=st.booleans())  # fmt: skip
def test_conv1d_padding_and_stride_slice_the_stride_1_result(seed, n, m, padding, stride, integer):
    assume(n + 2 * padding >= m)  # else no window fits: refused, as the error tests below check
    x, w = random_array(seed, n, integer), random_array(seed + 1, m, integer)
    out = conv1d(x, w, padding=padding, stride=stride)
    assert len(out) == (n + 2 * padding - m) // stride + 1
    assert_matches(out, np.convolve(np.pad(x, padding), w, "valid")[::stride], integer)
    if padding == m - 1:
        assert_matches(out, np.convolve(x, w, "full")[::stride], integer)
    if m % 2 == 1 and padding == m // 2 and m <= n:
        assert_matches(out, np.convolve(x, w, "same")[::stride], integer)


@FAST
@given(seed=seeds, n=st.integers(1, 15), m=st.integers(1, 15), stride=st.integers(1, 4),
       mode=st.sampled_from(ops.MODES))  # fmt: skip
def test_conv1d_stride_applies_after_mode(seed, n, m, stride, mode):
    x, w = random_array(seed, n, True), random_array(seed + 1, m, True)
    assert np.array_equal(conv1d(x, w, mode=mode, stride=stride), np.convolve(x, w, mode)[::stride])


def test_conv1d_keeps_float32_and_complex_dtypes():
    x = np.arange(6, dtype=np.float32)
    assert conv1d(x, np.ones(3, np.float32), mode="same").dtype == np.float32
    z = np.array([1 + 2j, 3, 1j])
    np.testing.assert_allclose(conv1d(z, [1j, 2], mode="full"), np.convolve(z, [1j, 2]), atol=1e-12)


# --- conv2d --------------------------------------------------------------------------------------------


def test_conv2d_reproduces_the_notebook_example():
    out = conv2d(NOTEBOOK_X2, NOTEBOOK_W2, padding=(1, 1), stride=(1, 1))
    assert np.array_equal(out, NOTEBOOK_OUT2)
    assert out.dtype.kind == "i"
    assert np.array_equal(conv2d(NOTEBOOK_X2, NOTEBOOK_W2, mode="same"), NOTEBOOK_OUT2)


def test_conv2d_stride_2_is_every_other_row_and_column_of_stride_1():
    out = conv2d(NOTEBOOK_X2, NOTEBOOK_W2, padding=1, stride=2)
    assert np.array_equal(out, np.asarray(NOTEBOOK_OUT2)[::2, ::2])
    assert np.array_equal(
        conv2d(NOTEBOOK_X2, NOTEBOOK_W2, padding=1, stride=(1, 2)), [r[::2] for r in NOTEBOOK_OUT2]
    )


shapes2d = st.tuples(st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=80, deadline=None)
@given(seed=seeds, x_shape=shapes2d, w_shape=shapes2d, integer=st.booleans(), mode=st.sampled_from(ops.MODES))
def test_conv2d_mode_equals_scipy_convolve2d(seed, x_shape, w_shape, integer, mode):
    x, w = random_array(seed, x_shape, integer), random_array(seed + 1, w_shape, integer)
    try:
        reference = scipy.signal.convolve2d(x, w, mode=mode)
    except ValueError:  # scipy's 'valid' needs one array at least as large as the other in every dimension
        with pytest.raises(ValueError, match="mode='valid'"):
            conv2d(x, w, mode=mode)
        return
    assert_matches(conv2d(x, w, mode=mode), reference, integer)


@FAST
@given(seed=seeds, x_shape=shapes2d, k=st.integers(1, 6), padding=st.tuples(st.integers(0, 4), st.integers(0, 4)),
       stride=st.tuples(st.integers(1, 4), st.integers(1, 4)), integer=st.booleans())  # fmt: skip
def test_conv2d_padding_and_stride_slice_the_stride_1_result(seed, x_shape, k, padding, stride, integer):
    x, w = random_array(seed, x_shape, integer), random_array(seed + 1, (k, k + 1), integer)
    padded = np.pad(x, [(padding[0], padding[0]), (padding[1], padding[1])])
    assume(padded.shape[0] >= w.shape[0] and padded.shape[1] >= w.shape[1])  # else no window fits
    reference = scipy.signal.convolve2d(padded, w, mode="valid")[:: stride[0], :: stride[1]]
    assert_matches(conv2d(x, w, padding=padding, stride=stride), reference, integer)
    if padding == (k - 1, k):
        full = scipy.signal.convolve2d(x, w, mode="full")
        assert_matches(
            conv2d(x, w, padding=padding, stride=stride), full[:: stride[0], :: stride[1]], integer
        )


@pytest.mark.parametrize("kernel", [(3, 3), (4, 6), (15, 15), (1, 40)])
def test_conv2d_both_methods_equal_scipy_on_wide_images(method, kernel):
    rng = np.random.default_rng(sum(kernel))
    x, w = rng.standard_normal((37, 301)), rng.standard_normal(kernel)
    for mode in ops.MODES:
        np.testing.assert_allclose(
            conv2d(x, w, mode=mode), scipy.signal.convolve2d(x, w, mode), rtol=0, atol=1e-10
        )
    xi, wi = rng.integers(-50, 50, (37, 301)), rng.integers(-50, 50, kernel)
    assert np.array_equal(conv2d(xi, wi, mode="same"), scipy.signal.convolve2d(xi, wi, "same"))


def test_conv2d_row_chunks_give_the_same_result(method, monkeypatch):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((45, 70)), rng.standard_normal((5, 4))
    whole = conv2d(x, w, mode="full", stride=(2, 1))
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 500)  # a few output rows per tensordot
    np.testing.assert_allclose(conv2d(x, w, mode="full", stride=(2, 1)), whole, rtol=0, atol=1e-12)
    np.testing.assert_allclose(whole, scipy.signal.convolve2d(x, w, "full")[::2], rtol=0, atol=1e-10)


def test_nan_and_inf_reach_exactly_the_outputs_whose_window_holds_them():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 50))
    x[10, 20], x[30, 5] = np.nan, np.inf
    w = rng.standard_normal((5, 7))
    for mode in ops.MODES:
        np.testing.assert_allclose(conv2d(x, w, mode=mode), scipy.signal.convolve2d(x, w, mode), atol=1e-10)
    out = conv2d(x, w, mode="same")
    assert np.isnan(out[10, 20]) and np.isfinite(out[0, 0]) and np.isfinite(out[20, 40])
    line = conv1d([1.0, np.nan, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0], mode="valid")
    assert np.isnan(line[:2]).all() and np.array_equal(line[2:], [5.0, 7.0, 9.0])


# --- conv2d_multi --------------------------------------------------------------------------------------


@st.composite
def layer_cases(draw):
    n, c, f = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 10))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    h, w = draw(st.integers(kh, 14)), draw(st.integers(kw, 14))
    return {
        "seed": draw(seeds),
        "x_shape": (n, c, h, w),
        "w_shape": (f, c, kh, kw),
        "bias": draw(st.booleans()),
        "padding": draw(st.tuples(st.integers(0, 3), st.integers(0, 3))),
        "stride": draw(st.tuples(st.integers(1, 3), st.integers(1, 3))),
        "batched": draw(st.booleans()),
        "integer": draw(st.booleans()),
    }


def torch_conv(x, w, bias=None, **kwargs):
    as_tensor = lambda a: None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    return F.conv2d(as_tensor(x), as_tensor(w), as_tensor(bias), **kwargs).numpy()


@settings(max_examples=80, deadline=None)
@given(case=layer_cases())
def test_conv2d_multi_equals_torch_conv2d(case):
    x = random_array(case["seed"], case["x_shape"], case["integer"])
    w = random_array(case["seed"] + 1, case["w_shape"], case["integer"])
    bias = random_array(case["seed"] + 2, case["w_shape"][0], case["integer"]) if case["bias"] else None
    reference = torch_conv(x, w, bias, stride=case["stride"], padding=case["padding"])
    if not case["batched"]:
        x, reference = x[0], reference[0]
    out = conv2d_multi(x, w, bias, padding=case["padding"], stride=case["stride"])
    assert_matches(out, reference.astype(np.int64) if case["integer"] else reference, case["integer"])


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@FAST
@given(case=layer_cases())
def test_conv2d_multi_valid_and_same_padding_equal_torch(case):
    x = random_array(case["seed"], case["x_shape"], False)
    w = random_array(case["seed"] + 1, case["w_shape"], False)
    for padding in ("valid", "same"):
        assert_matches(conv2d_multi(x, w, padding=padding), torch_conv(x, w, padding=padding), False)


@FAST
@given(case=layer_cases())
def test_conv2d_multi_same_with_stride_is_tensorflow_same(case):
    x = random_array(case["seed"], case["x_shape"], False)
    w = random_array(case["seed"] + 1, case["w_shape"], False)
    pads = []
    for n, k, s in zip(x.shape[2:], w.shape[2:], case["stride"], strict=True):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)  # TensorFlow's formula, extra on the bottom/right
        pads += [total // 2, total - total // 2]
    padded = np.pad(x, [(0, 0), (0, 0), pads[0:2], pads[2:4]])
    out = conv2d_multi(x, w, padding="same", stride=case["stride"])
    assert out.shape[2:] == tuple(math.ceil(n / s) for n, s in zip(x.shape[2:], case["stride"], strict=True))
    assert_matches(out, torch_conv(padded, w, stride=case["stride"]), False)


@FAST
@given(case=layer_cases(), mode=st.sampled_from(ops.MODES))
def test_conv2d_multi_flip_kernel_is_scipy_convolution_summed_over_channels(case, mode):
    x = random_array(case["seed"], case["x_shape"], case["integer"])
    w = random_array(case["seed"] + 1, case["w_shape"], case["integer"])
    reference = np.array(
        [[sum(scipy.signal.convolve2d(image[c], w[f, c], mode) for c in range(w.shape[1])) for f in range(len(w))]
         for image in x]
    )  # fmt: skip
    assert_matches(conv2d_multi(x, w, padding=mode, flip_kernel=True), reference, case["integer"])
    flipped = conv2d_multi(x, w[:, :, ::-1, ::-1], padding=case["padding"], stride=case["stride"])
    assert_matches(conv2d_multi(x, w, padding=case["padding"], stride=case["stride"], flip_kernel=True), flipped,
                   case["integer"])  # fmt: skip


def test_conv2d_multi_both_methods_equal_torch(method):
    rng = np.random.default_rng(11)
    x, w, bias = (
        rng.standard_normal((2, 3, 20, 41)),
        rng.standard_normal((5, 3, 4, 9)),
        rng.standard_normal(5),
    )
    for stride in [(1, 1), (2, 1), (3, 2)]:
        reference = torch_conv(x, w, bias, stride=stride, padding=(2, 1))
        np.testing.assert_allclose(conv2d_multi(x, w, bias, (2, 1), stride), reference, rtol=0, atol=1e-10)


def test_conv2d_on_single_channel_equals_conv2d_multi_with_flip():
    x, w = np.asarray(NOTEBOOK_X2), np.asarray(NOTEBOOK_W2)
    out = conv2d_multi(x[None], w[None, None], padding=1, flip_kernel=True)
    assert np.array_equal(out, np.asarray(NOTEBOOK_OUT2)[None])


# --- pooling -------------------------------------------------------------------------------------------


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ndim = draw(st.integers(2, 4))
    shape = draw(st.tuples(*[st.integers(1, 3)] * (ndim - 2), st.integers(kh, 13), st.integers(kw, 13)))
    stride = draw(st.none() | st.tuples(st.integers(1, 4), st.integers(1, 4)))
    return draw(seeds), shape, (kh, kw), stride


def torch_pool(pool, x, size, stride, pads=(0, 0, 0, 0), fill=0.0):
    """torch pooling of x (..., H, W), optionally after padding (left, right, top, bottom) with fill."""
    batch = torch.from_numpy(x.reshape(-1, 1, *x.shape[-2:]))
    pooled = pool(F.pad(batch, pads, value=fill), size, stride).numpy()
    return pooled.reshape(*x.shape[:-2], *pooled.shape[-2:])


def tensorflow_same_pads(shape, size, stride):
    """(left, right, top, bottom) padding of TensorFlow's SAME, the extra cell after the image."""
    (top, bottom), (left, right) = [
        (total // 2, total - total // 2)
        for total in (
            max((math.ceil(n / s) - 1) * s + k - n, 0) for n, k, s in zip(shape, size, stride, strict=True)
        )
    ]
    return left, right, top, bottom


@FAST
@given(case=pool_cases())
def test_pooling_with_valid_padding_equals_torch(case):
    seed, shape, size, stride = case
    x = random_array(seed, shape, False)
    torch_stride = size if stride is None else stride
    assert np.array_equal(max_pool2d(x, size, stride), torch_pool(F.max_pool2d, x, size, torch_stride))
    np.testing.assert_allclose(
        mean_pool2d(x, size, stride), torch_pool(F.avg_pool2d, x, size, torch_stride), rtol=0, atol=1e-12
    )


@FAST
@given(case=pool_cases())
def test_same_pooling_equals_torch_on_the_tensorflow_padded_image(case):
    seed, shape, size, stride = case
    x = random_array(seed, shape, False)
    stride = size if stride is None else stride
    pads = tensorflow_same_pads(shape[-2:], size, stride)
    assert np.array_equal(
        max_pool2d(x, size, stride, "same"), torch_pool(F.max_pool2d, x, size, stride, pads, -np.inf)
    )
    # TensorFlow's mean counts only real cells: window sums over the zero-padded image / real cells per window
    sums = torch_pool(F.avg_pool2d, x, size, stride, pads) * (size[0] * size[1])
    counts = torch_pool(F.avg_pool2d, np.ones(shape[-2:]), size, stride, pads) * (size[0] * size[1])
    np.testing.assert_allclose(mean_pool2d(x, size, stride, "same"), sums / counts, rtol=0, atol=1e-12)


@FAST
@given(case=pool_cases())
def test_same_pooling_output_is_ceil_of_size_over_stride(case):
    seed, shape, size, stride = case
    x = random_array(seed, shape, True)
    steps = size if stride is None else stride
    expected = shape[:-2] + tuple(math.ceil(n / s) for n, s in zip(shape[-2:], steps, strict=True))
    assert max_pool2d(x, size, stride, padding="same").shape == expected
    assert mean_pool2d(x, size, stride, padding="same").shape == expected
    # Padding never wins a max and never dilutes a mean: all-equal input pools to the same value.
    assert np.all(max_pool2d(np.full(shape, -7), size, stride, "same") == -7)
    assert np.all(mean_pool2d(np.full(shape, -7.0), size, stride, "same") == -7.0)


def test_same_pooling_matches_tensorflow_on_a_5x5_image():
    x = np.arange(25).reshape(5, 5)
    assert np.array_equal(max_pool2d(x, 2, padding="same"), [[6, 8, 9], [16, 18, 19], [21, 23, 24]])
    # TensorFlow's SAME avg_pool divides by the real cells in each window: 2 in the last column, 1 in the corner
    mean = mean_pool2d(x, 2, padding="same")
    assert np.array_equal(mean, [[3, 5, 6.5], [13, 15, 16.5], [20.5, 22.5, 24]])
    assert mean.dtype == np.float64


def test_same_pooling_puts_the_odd_padding_on_the_bottom_right():
    x = np.arange(16.0).reshape(4, 4)  # size 3, stride 2: one padding row/column, after the image
    assert np.array_equal(max_pool2d(x, 3, 2, "same"), [[10, 11], [14, 15]])
    assert np.array_equal(mean_pool2d(x, 3, 2, "same"), [[5, 6.5], [11, 12.5]])


def test_pooling_takes_channels_and_batches_and_pairs():
    x = np.arange(2 * 3 * 4 * 6).reshape(2, 3, 4, 6)
    out = max_pool2d(x, size=(2, 3))
    assert out.shape == (2, 3, 2, 2) and out.dtype == x.dtype
    assert np.array_equal(out[1, 2], max_pool2d(x[1, 2], (2, 3)))
    assert np.array_equal(max_pool2d(x[0], (2, 3), stride=(2, 3)), out[0])


def test_pooling_propagates_nan():
    x = np.arange(16.0).reshape(4, 4)
    x[0, 1] = np.nan
    for padding in ("valid", "same"):
        pooled = max_pool2d(x, 2, padding=padding)
        assert np.isnan(pooled[0, 0]) and not np.isnan(pooled[1:]).any() and not np.isnan(pooled[0, 1])
        averaged = mean_pool2d(x, 2, padding=padding)
        assert np.isnan(averaged[0, 0]) and not np.isnan(averaged[1:]).any()
    reference = F.max_pool2d(torch.from_numpy(x[None]), 2).numpy()[0]
    assert np.array_equal(max_pool2d(x, 2), reference, equal_nan=True)


# --- bad arguments -------------------------------------------------------------------------------------

X1, W1 = np.arange(5.0), np.ones(3)
X2, W2 = np.ones((4, 5)), np.ones((3, 3))
XM, WM = np.ones((2, 6, 6)), np.ones((4, 2, 3, 3))

BAD_ARGUMENTS = [
    (conv1d, (np.ones((2, 3)), W1), {}, r"x must have shape \(n,\); got 2-D"),
    (conv1d, (X1, np.ones((1, 3))), {}, r"w must have shape \(m,\)"),
    (conv1d, ([], W1), {}, r"x is empty"),
    (conv1d, (X1, []), {}, r"w is empty"),
    (conv1d, (X1, W1), {"padding": -1}, r"padding must be an int >= 0, got -1"),
    (conv1d, (X1, W1), {"padding": 1.5}, r"padding must be an int >= 0"),
    (conv1d, (X1, W1, "same"), {}, r"padding must be .*pass mode='same'"),
    (conv1d, (X1, W1), {"stride": 0}, r"stride must be an int >= 1, got 0"),
    (conv1d, (X1, W1), {"stride": -2}, r"stride must be an int >= 1"),
    (conv1d, (X1, W1), {"mode": "fulll"}, r"mode must be one of 'full', 'same', 'valid'; got 'fulll'"),
    (conv1d, (X1, W1), {"mode": "same", "padding": 1}, r"give mode or padding, not both"),
    (conv1d, (X1, np.ones(8)), {"padding": 1}, r"w \(length 8\) is longer than x \(length 5\)"),
    (conv1d, (np.array([True, False]), W1), {}, r"x must hold numbers, got dtype bool"),
    (conv1d, (["a", "b"], W1), {}, r"x must hold numbers"),
    (conv2d, (np.ones((2, 3, 4)), W2), {}, r"x must have shape \(H, W\); for channels use conv2d_multi"),
    (conv2d, (X2, np.ones(3)), {}, r"w must have shape \(kh, kw\)"),
    (conv2d, (np.ones((0, 4)), W2), {}, r"x is empty \(shape \(0, 4\)\)"),
    (conv2d, (X2, W2), {"padding": (1, -1)}, r"padding must be an int >= 0 or a pair"),
    (conv2d, (X2, W2), {"padding": (1, 1, 1)}, r"padding must be an int >= 0 or a pair"),
    (conv2d, (X2, W2), {"stride": (1, 0)}, r"stride must be an int >= 1 or a pair"),
    (conv2d, (X2, W2), {"mode": "circular"}, r"mode must be one of"),
    (conv2d, (X2, W2), {"mode": "valid", "padding": 0}, r"give mode or padding, not both"),
    (conv2d, (X2, np.ones((5, 5))), {}, r"w \(5, 5\) is larger than x \(4, 5\) padded by \(0, 0\)"),
    (
        conv2d,
        (np.ones((3, 5)), np.ones((4, 2))),
        {"mode": "valid"},
        r"mode='valid' needs one of x \(3, 5\) and w",
    ),
    (conv2d_multi, (X2, WM), {}, r"x must have shape \(C, H, W\) or \(N, C, H, W\); got 2-D"),
    (conv2d_multi, (XM, W2), {}, r"w must have shape \(F, C, kh, kw\)"),
    (conv2d_multi, (np.ones((3, 6, 6)), WM), {}, r"w has 2 input channels .* but x has 3"),
    (conv2d_multi, (XM, WM), {"bias": np.ones(3)}, r"bias must have shape \(4,\)"),
    (
        conv2d_multi,
        (XM, WM),
        {"padding": "circular"},
        r"padding must be an int, a pair \(p1, p2\), or one of",
    ),
    (conv2d_multi, (XM, WM), {"padding": -1}, r"padding must be an int >= 0"),
    (conv2d_multi, (XM, WM), {"stride": 0}, r"stride must be an int >= 1"),
    (
        conv2d_multi,
        (XM, np.ones((4, 2, 7, 3))),
        {},
        r"kernel \(7, 3\) of w is larger than x's image \(6, 6\)",
    ),
    (conv2d_multi, (np.ones((1, 2, 0, 6)), WM), {}, r"x is empty"),
    (max_pool2d, (np.ones(5),), {}, r"x must have shape \(H, W\), \(C, H, W\) or \(N, C, H, W\); got 1-D"),
    (max_pool2d, (np.ones((2, 0)),), {}, r"x is empty"),
    (max_pool2d, (X2,), {"size": 0}, r"size must be an int >= 1"),
    (max_pool2d, (X2,), {"stride": (2, 0)}, r"stride must be an int >= 1 or a pair"),
    (max_pool2d, (X2,), {"padding": "full"}, r"padding must be 'valid' or 'same', got 'full'"),
    (max_pool2d, (X2,), {"size": (5, 2)}, r"size \(5, 2\) is larger than x's last two dimensions \(4, 5\)"),
    (max_pool2d, (X2 * 1j,), {}, r"x must hold real numbers"),
    (mean_pool2d, (X2,), {"size": -1}, r"size must be an int >= 1"),
    (mean_pool2d, (X2,), {"padding": "bogus"}, r"padding must be 'valid' or 'same'"),
    (mean_pool2d, (np.ones((1, 1, 2, 2)),), {"size": 3}, r"size \(3, 3\) is larger"),
]


@pytest.mark.parametrize(
    ("function", "args", "kwargs", "message"),
    BAD_ARGUMENTS,
    ids=[f"{f.__name__}-{i}" for i, (f, *_rest) in enumerate(BAD_ARGUMENTS)],
)
def test_bad_arguments_raise_value_error_naming_the_argument(function, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        function(*args, **kwargs)


def test_valid_mode_swaps_like_numpy_and_scipy_when_the_kernel_is_larger():
    assert np.array_equal(
        conv1d([1, 2], [1, 2, 3, 4], mode="valid"), np.convolve([1, 2], [1, 2, 3, 4], "valid")
    )
    x, w = np.arange(6).reshape(2, 3), np.arange(20).reshape(4, 5)
    assert np.array_equal(conv2d(x, w, mode="valid"), scipy.signal.convolve2d(x, w, "valid"))
