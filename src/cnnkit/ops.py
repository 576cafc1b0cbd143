"""Exact NumPy convolution and pooling: the chapter's primitives, without its off-by-stride bugs.

`conv1d` and `conv2d` compute true convolution (kernel flipped) and speak NumPy/SciPy's `mode`
vocabulary: they equal `np.convolve` and `scipy.signal.convolve2d`. `conv2d_multi` is what a CNN layer
computes over channels: cross-correlation like `torch.nn.functional.conv2d`, or true convolution with
`flip_kernel=True`. `max_pool2d` and `mean_pool2d` pool with 'valid' or TensorFlow's 'same' padding.

Nothing loops over pixels: windows are `sliding_window_view`s multiplied out with `tensordot`. Integer
inputs stay integers (computed in `np.result_type` of the inputs, wrapping on overflow like NumPy).
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["MODES", "conv1d", "conv2d", "conv2d_multi", "max_pool2d", "mean_pool2d"]

MODES = ("full", "same", "valid")

# Upper bound on the elements of one window matrix that tensordot copies; larger jobs go in row chunks.
_CHUNK_ELEMENTS = 1 << 22
# Up to this many filters a banded (Toeplitz) matrix beats im2col: im2col's copy of kh*kw values per
# output dominates when there are few filters, the banded matrix's extra multiplications when there are many.
_BANDED_MAX_FILTERS = 8
_BLAS_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.complex64, np.complex128))


def conv1d(x, w, padding=None, stride=1, *, mode=None) -> np.ndarray:
    """Convolve a 1-D signal with a 1-D kernel (true convolution: the kernel is flipped).

    x: (n,) signal; w: (m,) kernel; numbers of any real or complex dtype (not bool).
    Give either `padding` or `mode`, not both:

    - padding: int p >= 0 zeros added at both ends (default 0). Output length
      floor((n + 2p - m) / stride) + 1; the kernel must fit: m <= n + 2p.
    - mode: 'full', 'same' or 'valid', exactly as `np.convolve` (which swaps x and w when w is longer):
      lengths n + m - 1, max(n, m), max(n, m) - min(n, m) + 1.

    stride: int >= 1; the output keeps every stride-th element of the stride-1 output, starting with
    the first.

    Returns an (n_out,) array of dtype np.result_type(x, w). Raises ValueError naming the bad argument.
    """
    x = _numeric_array("x", x, ndims=(1,), expected="(n,)")
    w = _numeric_array("w", w, ndims=(1,), expected="(m,)")
    stride = _positive_int("stride", stride)
    if mode is not None:
        _check_mode(mode, padding)
        if w.size > x.size:  # np.convolve convolves the longer array with the shorter one
            x, w = w, x
        pad = _mode_padding(mode, w.size)
    else:
        pad = (_non_negative_int("padding", 0 if padding is None else padding, hint=True),) * 2
        if x.size + sum(pad) < w.size:
            raise ValueError(
                f"w (length {w.size}) is longer than x (length {x.size}) padded by {pad[0]} at each end; "
                "use a larger padding or mode='full'"
            )
    dtype = np.result_type(x, w)
    padded = _pad(x.astype(dtype, copy=False)[None, None, None, :], (0, 0), pad)
    kernel = w.astype(dtype, copy=False)[::-1][None, None, None, :]
    return _correlate(padded, kernel, (1, stride))[0, 0, 0]


def conv2d(x, w, padding=None, stride=1, *, mode=None) -> np.ndarray:
    """Convolve a 2-D image with a 2-D kernel (true convolution: the kernel is flipped both ways).

    x: (H, W) image; w: (kh, kw) kernel; numbers of any real or complex dtype (not bool). For channels
    and batches use `conv2d_multi`. Give either `padding` or `mode`, not both:

    - padding: int p or pair (p1, p2) of zeros added on both sides of each axis (default 0). Output
      shape floor((H + 2 p1 - kh) / s1) + 1 by floor((W + 2 p2 - kw) / s2) + 1; the kernel must fit.
    - mode: 'full', 'same' or 'valid', exactly as `scipy.signal.convolve2d`: 'full' is
      (H + kh - 1, W + kw - 1); 'same' is (H, W), centered on 'full' (so an even kernel takes its extra
      row/column of padding on the top/left); 'valid' needs one of x and w at least as large as the
      other in every dimension and is (|H - kh| + 1, |W - kw| + 1).

    stride: int or pair (s1, s2) >= 1; the output keeps every s-th row/column of the stride-1 output,
    starting with the first.

    Returns an (H_out, W_out) array of dtype np.result_type(x, w). Raises ValueError naming the bad
    argument.
    """
    x = _numeric_array("x", x, ndims=(2,), expected="(H, W); for channels use conv2d_multi")
    w = _numeric_array("w", w, ndims=(2,), expected="(kh, kw); for channels use conv2d_multi")
    stride = _positive_pair("stride", stride)
    if mode is not None:
        _check_mode(mode, padding)
        if mode == "valid" and not _fits(w.shape, x.shape):
            if not _fits(x.shape, w.shape):
                raise ValueError(
                    f"mode='valid' needs one of x {x.shape} and w {w.shape} to be at least as large as "
                    "the other in every dimension (as scipy.signal.convolve2d does)"
                )
            x, w = w, x  # convolution commutes; scipy swaps too
        pads = [_mode_padding(mode, m) for m in w.shape]
    else:
        p1, p2 = _non_negative_pair("padding", 0 if padding is None else padding, hint=True)
        pads = [(p1, p1), (p2, p2)]
        if not _fits(w.shape, _padded_shape(x.shape, pads)):
            raise ValueError(
                f"w {w.shape} is larger than x {x.shape} padded by {(p1, p2)} on each side; "
                "use a larger padding or mode='full'"
            )
    dtype = np.result_type(x, w)
    padded = _pad(x.astype(dtype, copy=False)[None, None], *pads)
    kernel = w.astype(dtype, copy=False)[::-1, ::-1][None, None]
    return _correlate(padded, kernel, stride)[0, 0]


def conv2d_multi(x, w, bias=None, padding=0, stride=1, *, flip_kernel=False) -> np.ndarray:
    """What a CNN convolution layer computes: every filter applied to all channels, summed, plus bias.

    x: (C, H, W) image or (N, C, H, W) batch; w: (F, C, kh, kw) filters; bias: None or (F,).
    Returns (F, H_out, W_out) or (N, F, H_out, W_out) of dtype np.result_type(x, w, bias).

    flip_kernel: False (default) computes cross-correlation, what CNN layers call convolution and what
    `torch.nn.functional.conv2d` returns: out[f, i, j] = bias[f] + the sum over c, di, dj of
    padded_x[c, i * s1 + di, j * s2 + dj] * w[f, c, di, dj]. True flips each kernel first, giving true
    convolution: the sum over channels of `scipy.signal.convolve2d(x[c], w[f, c], mode)`.

    padding: int p or pair (p1, p2) of zeros on both sides of each axis, or a string:
    'valid' (none), 'full' (kh - 1 and kw - 1 on each side), or 'same': TensorFlow's SAME, output
    ceil(H / s1) by ceil(W / s2), total padding max((out - 1) * s + k - n, 0) per axis split in half. An
    odd total puts the extra row/column on the bottom/right for cross-correlation (like TensorFlow and
    torch's padding='same') and on the top/left for true convolution (like scipy's 'same').
    With an int or pair the output is floor((H + 2 p1 - kh) / s1) + 1 by floor((W + 2 p2 - kw) / s2) + 1.

    stride: int or pair (s1, s2) >= 1.
    """
    x = _numeric_array("x", x, ndims=(3, 4), expected="(C, H, W) or (N, C, H, W)")
    w = _numeric_array("w", w, ndims=(4,), expected="(F, C, kh, kw)")
    batch = x if x.ndim == 4 else x[None]
    if w.shape[1] != batch.shape[1]:
        raise ValueError(
            f"w has {w.shape[1]} input channels (w is (F, C, kh, kw) = {w.shape}) but x has "
            f"{batch.shape[1]} (x is {'(N, C, H, W)' if x.ndim == 4 else '(C, H, W)'} = {x.shape})"
        )
    if bias is not None:
        bias = _numeric_array("bias", bias, ndims=(1,), expected=f"({w.shape[0]},), one value per filter")
        if bias.shape != w.shape[:1]:
            raise ValueError(f"bias must have shape ({w.shape[0]},), one value per filter; got {bias.shape}")
    stride = _positive_pair("stride", stride)
    kernel_shape = w.shape[2:]
    pads = _layer_padding(padding, batch.shape[2:], kernel_shape, stride, flip_kernel)
    if not _fits(kernel_shape, _padded_shape(batch.shape[2:], pads)):
        raise ValueError(
            f"kernel {kernel_shape} of w is larger than x's image {batch.shape[2:]} with padding "
            f"{padding!r}; use a larger padding or padding='same'"
        )
    dtype = np.result_type(x, w) if bias is None else np.result_type(x, w, bias)
    kernel = w.astype(dtype, copy=False)
    if flip_kernel:
        kernel = kernel[:, :, ::-1, ::-1]
    out = _correlate(_pad(batch.astype(dtype, copy=False), *pads), kernel, stride)
    if bias is not None:
        out += bias.astype(dtype, copy=False)[:, None, None]
    return out if x.ndim == 4 else out[0]


def max_pool2d(x, size=2, stride=None, padding="valid") -> np.ndarray:
    """Largest value in each size[0] x size[1] window.

    x: (H, W), (C, H, W) or (N, C, H, W) of real numbers; pools the last two axes.
    size: int or pair (kh, kw) >= 1. stride: int or pair >= 1, default `size` (windows do not overlap).
    padding: 'valid' (windows inside the image, output floor((H - kh) / s1) + 1, like torch's max_pool2d)
    or 'same' (TensorFlow's SAME: output ceil(H / s1), padding split in half with the extra row/column
    on the bottom/right; padded cells never win).
    Returns the same leading shape with pooled (H_out, W_out), in x's dtype. NaN in a window gives NaN.
    """
    array = np.asarray(x)
    windows, _ = _pool_windows(array, size, stride, padding, fill=_lowest(array.dtype))
    return windows.max(axis=(-2, -1))


def mean_pool2d(x, size=2, stride=None, padding="valid") -> np.ndarray:
    """Mean of each size[0] x size[1] window.

    Arguments as `max_pool2d`. With padding='same' a window that overlaps the padding averages only its
    real elements, as TensorFlow's avg_pool does; with 'valid' it equals torch's avg_pool2d.
    Returns the pooled array: float64 for integer x, else x's dtype.
    """
    array = np.asarray(x)
    if array.dtype.kind in "iu":
        array = array.astype(np.float64)
    windows, counts = _pool_windows(array, size, stride, padding, fill=0)
    return windows.sum(axis=(-2, -1)) / counts.astype(array.dtype)


# --- the computation ---------------------------------------------------------------------------------


def _correlate(padded, w, stride):
    """Cross-correlate padded images (N, C, Hp, Wp) with filters (F, C, kh, kw): (N, F, H_out, W_out)."""
    # The banded method does ~(block + kw - 1) / kw times im2col's multiplications, which pays only where
    # BLAS does them (floats; NumPy multiplies integers in its own loops). It also multiplies zeros with
    # every input value of a block, and NaN * 0 or inf * 0 is NaN: non-finite inputs take im2col, which
    # touches exactly the values in each output's window.
    if (
        w.shape[0] <= _BANDED_MAX_FILTERS
        and stride[1] == 1
        and padded.dtype in _BLAS_DTYPES
        and np.isfinite(padded).all()
    ):
        return _correlate_banded(padded, w, stride[0])
    return _correlate_im2col(padded, w, stride)


def _correlate_im2col(padded, w, stride):
    """Each output is one window (C, kh, kw) dotted with each filter: a matrix product over row chunks."""
    n, c = padded.shape[:2]
    filters, _, kh, kw = w.shape
    windows = sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, :: stride[0], :: stride[1]]
    out = np.empty((n, filters, *windows.shape[2:4]), dtype=np.result_type(padded, w))
    rows = max(1, _CHUNK_ELEMENTS // (n * c * windows.shape[3] * kh * kw))
    for top in range(0, out.shape[2], rows):
        chunk = np.tensordot(windows[:, :, top : top + rows], w, axes=((1, 4, 5), (1, 2, 3)))
        out[:, :, top : top + rows] = chunk.transpose(0, 3, 1, 2)
    return out


def _correlate_banded(padded, w, row_stride):
    """Column stride 1: `block` neighbouring outputs of a row are one product with a banded matrix.

    The (C, kh, span) input patch under `block` consecutive outputs, span = block + kw - 1, times
    band (C, kh, span, block) with band[c, i, b + j, b] = w[c, i, j] gives all `block` outputs at once:
    a few large BLAS products instead of scipy's direct loop or im2col's kh*kw-fold copy.
    """
    n, c, height, width = padded.shape
    filters, _, kh, kw = w.shape
    out_height, out_width = (height - kh) // row_stride + 1, width - kw + 1
    block = 16 if kw <= 8 else 32
    span = block + kw - 1
    blocks = -(-out_width // block)
    extra = (blocks - 1) * block + span - width  # zero columns so the last block is whole; trimmed below
    if extra > 0:
        padded = np.pad(padded, ((0, 0), (0, 0), (0, 0), (0, extra)))
    band = np.zeros((filters, c, kh, span, block), dtype=np.result_type(padded, w))
    position, tap = np.arange(block)[:, None], np.arange(kw)[None, :]
    band[:, :, :, position + tap, position] = w[:, :, :, None, :]
    windows = sliding_window_view(padded, (kh, span), axis=(2, 3))[:, :, ::row_stride, ::block]
    out = np.empty((n, filters, out_height, blocks * block), dtype=band.dtype)
    rows = max(1, _CHUNK_ELEMENTS // (n * c * blocks * kh * span))
    for top in range(0, out_height, rows):
        chunk = np.tensordot(windows[:, :, top : top + rows], band, axes=((1, 4, 5), (1, 2, 3)))
        # chunk is (N, rows, blocks, F, block): put filters first and lay the blocks side by side
        out[:, :, top : top + rows] = chunk.transpose(0, 3, 1, 2, 4).reshape(n, filters, -1, blocks * block)
    return out[..., :out_width]


def _pool_windows(x, size, stride, padding, fill):
    """Check pooling arguments; return x's windows and how many real cells each has.

    The windows (..., H_out, W_out, kh, kw) are views of x padded with `fill`; the counts are (H_out, W_out).
    """
    x = _numeric_array("x", x, ndims=(2, 3, 4), expected="(H, W), (C, H, W) or (N, C, H, W)", real=True)
    kernel = _positive_pair("size", size)
    strides = _positive_pair("stride", kernel if stride is None else stride)
    if padding == "valid":
        if not _fits(kernel, x.shape[-2:]):
            raise ValueError(
                f"size {kernel} is larger than x's last two dimensions {x.shape[-2:]} with "
                "padding='valid'; use a smaller size or padding='same'"
            )
        pads = [(0, 0), (0, 0)]
    elif padding == "same":
        pads = [_same_padding(n, k, s) for n, k, s in zip(x.shape[-2:], kernel, strides, strict=True)]
    else:
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    windows = sliding_window_view(_pad(x, *pads, fill=fill), kernel, axis=(-2, -1))
    windows = windows[..., :: strides[0], :: strides[1], :, :]
    rows, cols = (
        _real_counts(n, k, s, before, out)
        for n, k, s, (before, _), out in zip(
            x.shape[-2:], kernel, strides, pads, windows.shape[-4:-2], strict=True
        )
    )
    return windows, np.outer(rows, cols)


def _real_counts(n, k, s, before, out):
    """Along one axis with `before` padding cells: how many of each window's k cells are among the n real."""
    starts = np.arange(out) * s - before
    return np.minimum(starts + k, n) - np.maximum(starts, 0)


# --- padding -------------------------------------------------------------------------------------------


def _mode_padding(mode, m):
    """Zeros (before, after) around the signal that make `mode`'s output the kernel's sliding window (length m)."""
    if mode == "full":
        return m - 1, m - 1
    if mode == "same":  # centered on 'full', as np.convolve and scipy do: extra zero before for even m
        return m // 2, (m - 1) // 2
    return 0, 0


def _same_padding(n, k, s, extra_before=False):
    """TensorFlow's SAME padding (before, after) along one axis: output ceil(n / s)."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    small, large = total // 2, total - total // 2
    return (large, small) if extra_before else (small, large)


def _layer_padding(padding, image_shape, kernel_shape, stride, flip_kernel):
    """conv2d_multi's padding argument as [(top, bottom), (left, right)]."""
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0), (0, 0)]
        if padding == "full":
            return [(k - 1, k - 1) for k in kernel_shape]
        if padding == "same":
            return [
                _same_padding(n, k, s, extra_before=flip_kernel)
                for n, k, s in zip(image_shape, kernel_shape, stride, strict=True)
            ]
        raise ValueError(
            f"padding must be an int, a pair (p1, p2), or one of 'valid', 'same', 'full'; got {padding!r}"
        )
    p1, p2 = _non_negative_pair("padding", padding)
    return [(p1, p1), (p2, p2)]


def _pad(x, rows, cols, fill=0):
    """Pad the last two axes of x by rows = (top, bottom) and cols = (left, right) cells of `fill`."""
    if rows == (0, 0) and cols == (0, 0):
        return x
    widths = [(0, 0)] * (x.ndim - 2) + [tuple(rows), tuple(cols)]
    return np.pad(x, widths, constant_values=fill)


def _padded_shape(shape, pads):
    return tuple(n + before + after for n, (before, after) in zip(shape, pads, strict=True))


def _fits(small, large):
    return all(a <= b for a, b in zip(small, large, strict=True))


def _lowest(dtype):
    """The value a max never prefers to a real element: -inf, or the integer type's minimum."""
    if dtype.kind in "iu":
        return np.iinfo(dtype).min
    return -np.inf


# --- argument checks -----------------------------------------------------------------------------------


def _numeric_array(name, value, ndims, expected, real=False):
    array = np.asarray(value)
    kinds = "iuf" if real else "iufc"
    if array.dtype.kind not in kinds:
        raise ValueError(f"{name} must hold {'real ' if real else ''}numbers, got dtype {array.dtype}")
    if array.ndim not in ndims:
        raise ValueError(f"{name} must have shape {expected}; got {array.ndim}-D shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); expected {expected} with no zero sizes")
    return array


def _check_mode(mode, padding):
    if mode not in MODES:
        raise ValueError(f"mode must be one of 'full', 'same', 'valid'; got {mode!r}")
    if padding is not None:
        raise ValueError(
            f"give mode or padding, not both: mode={mode!r} already decides the padding "
            f"(got padding={padding!r})"
        )


def _is_int(value):
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _positive_int(name, value):
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _non_negative_int(name, value, hint=False):
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}{_mode_tip(value, hint)}")
    return int(value)


def _pair(name, value, smallest, hint=False):
    pair = (value, value) if _is_int(value) else tuple(value) if isinstance(value, tuple | list) else None
    if pair is None or len(pair) != 2 or not all(_is_int(v) and v >= smallest for v in pair):
        raise ValueError(
            f"{name} must be an int >= {smallest} or a pair of them, got {value!r}{_mode_tip(value, hint)}"
        )
    return int(pair[0]), int(pair[1])


def _positive_pair(name, value):
    return _pair(name, value, 1)


def _non_negative_pair(name, value, hint=False):
    return _pair(name, value, 0, hint)


def _mode_tip(value, hint):
    if hint and isinstance(value, str) and value in MODES:
        return f"; for {value!r} pass mode={value!r}"
    return ""
