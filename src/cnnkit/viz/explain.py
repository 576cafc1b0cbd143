"""The chapter's primitives drawn step by step from what `cnnkit.ops` computes: `explain_conv1d`,
`explain_conv2d`, `explain_pool` (the figures of `cnnkit explain`)."""

import math
from dataclasses import dataclass

import numpy as np

from cnnkit import ops
from cnnkit.viz.style import numbers_text, plain_figure


@dataclass
class Steps:
    """How a convolution or pooling output is made, from `cnnkit.ops`' own result.

    padded     the input with its padding (2-D; a 1-D signal is one row); `real` marks the input's cells
    kernel     what slides over it: the flipped kernel for a convolution, None for pooling
    output     what `cnnkit.ops` returned (2-D; one row for a 1-D convolution)
    windows    for each output cell (i, j): (top, left) of its window in `padded`; the window is
               window_shape cells
    """

    padded: np.ndarray
    real: np.ndarray
    kernel: np.ndarray | None
    output: np.ndarray
    windows: dict
    window_shape: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    stride: tuple[int, int]


def conv1d_steps(x, w, padding: int = 0, stride: int = 1) -> Steps:
    """`ops.conv1d(x, w, padding, stride)` and, for each output, the padded inputs it sums."""
    output = ops.conv1d(x, w, padding=padding, stride=stride)
    x2, w2 = np.asarray(x)[None], np.asarray(w)[None]
    return _steps(x2, w2[:, ::-1], output[None], ((0, 0), (padding, padding)), (1, stride))


def conv2d_steps(x, w, padding=0, stride=1) -> Steps:
    """`ops.conv2d(x, w, padding, stride)` and, for each output, the window of the padded input it sums."""
    output = ops.conv2d(x, w, padding=padding, stride=stride)
    p1, p2 = (padding, padding) if np.isscalar(padding) else padding
    s = (stride, stride) if np.isscalar(stride) else tuple(stride)
    return _steps(np.asarray(x), np.asarray(w)[::-1, ::-1], output, ((p1, p1), (p2, p2)), s)


def pool_steps(x, size=2, stride=None, padding="same", kind: str = "max") -> Steps:
    """`ops.max_pool2d` (kind "max") or `ops.mean_pool2d` ("mean") and each output's window."""
    x = np.asarray(x)
    pool = {"max": ops.max_pool2d, "mean": ops.mean_pool2d}[kind]
    output = pool(x, size, stride, padding)
    k = (size, size) if np.isscalar(size) else tuple(size)
    s = k if stride is None else ((stride, stride) if np.isscalar(stride) else tuple(stride))
    pads = ((0, 0), (0, 0))
    if padding == "same":
        pads = tuple(ops._same_padding(n, kk, ss) for n, kk, ss in zip(x.shape, k, s, strict=True))
    return _steps(x, None, output, pads, s, k)


def _steps(x, kernel, output, pads, stride, window=None) -> Steps:
    window = tuple(kernel.shape) if kernel is not None else window
    padded = np.pad(x, pads)
    real = np.pad(np.ones(x.shape, bool), pads)
    windows = {
        (i, j): (i * stride[0], j * stride[1]) for i in range(output.shape[0]) for j in range(output.shape[1])
    }
    return Steps(padded, real, kernel, output, windows, window, pads, stride)


CHAPTER_X1 = (1, 3, 2, 4, 5, 6, 1, 3)


CHAPTER_W1 = (1, 0, 3, 1, 2)


CHAPTER_X2 = ((1, 2, 3, 4), (5, 6, 1, 3), (1, 6, 0, 3), (3, 4, 3, 2))


CHAPTER_W2 = ((1, 0, 3), (1, 2, 1), (0, 1, 1))


POOL_EXAMPLE = tuple(tuple(range(r * 5, r * 5 + 5)) for r in range(5))


def explain_conv1d(x=CHAPTER_X1, w=CHAPTER_W1, padding: int = 2, stride: int = 1, max_steps: int = 12):
    """1-D convolution drawn step by step: the padded input, the flipped kernel, and for each output (up
    to `max_steps`) the inputs it multiplies and their sum. Defaults are the chapter's example, which
    equals np.convolve(x, w, "same"). Every number comes from `ops.conv1d`."""
    steps = conv1d_steps(x, w, padding, stride)
    xs, kernel, out = steps.padded[0], steps.kernel[0], steps.output[0]
    shown = min(len(out), max_steps)
    lines = []
    for step in range(shown):
        left = steps.windows[(0, step)][1]
        terms = " + ".join(f"{a:g}·{b:g}" for a, b in zip(xs[left : left + len(kernel)], kernel, strict=True))
        lines.append(f"y[{step}] = {terms} = {out[step]:g}")
    title = (
        f"1-D convolution: y = conv1d(x, w, padding={padding}, stride={stride}): {len(out)} outputs",
        f"grey cells are the zero padding; each output lays the flipped kernel over the orange cells, "
        f"multiplies and sums; the next output moves {stride} cell{'s' * (stride > 1)} right",
    )
    label_w, cells = 3.2, len(xs)
    width = max(label_w + cells + 0.8 + max(_units(t, 10) for t in lines) + 0.5, _units(title[1], 11) + 1, 14)
    note = _wrap_units(CROSS_CORRELATION_1D, width - 1.5, _NOTE_SIZE)
    height = 2.2 + 1.4 + 1.2 + shown + (0.9 if shown < len(out) else 0) + 0.5 + 1.5 + 0.6 * len(note) + 0.4
    fig, ax = _sheet(width, height)
    _title(ax, width, title)
    _note(ax, 0.75, height - 0.6 * len(note) - 0.2, note)
    y = 2.2
    ax.text(label_w - 0.3, y + 0.5, "x, padded", ha="right", va="center", fontsize=11)
    _board(ax, label_w, y, xs[None], steps.real)
    y += 1.4
    ax.text(label_w - 0.3, y + 0.5, "w flipped", ha="right", va="center", fontsize=11)
    _board(ax, label_w, y, kernel[None], np.ones((1, len(kernel)), bool), fill=_KERNEL)
    ax.text(label_w + len(kernel) + 0.4, y + 0.5, f"w = {numbers_text(np.asarray(w))} reversed: convolution flips the kernel",
            va="center", fontsize=10, color="0.3")  # fmt: skip
    y += 1.6
    for step, line in enumerate(lines):
        left = steps.windows[(0, step)][1]
        ax.text(label_w - 0.3, y + 0.5, f"y[{step}]", ha="right", va="center", fontsize=10, color="0.3")
        _board(ax, label_w, y, xs[None], steps.real, window=((0, left), (1, len(kernel))), fontsize=9)
        ax.text(label_w + cells + 0.5, y + 0.5, line, va="center", fontsize=10)
        y += 1
    if shown < len(out):
        ax.text(
            label_w,
            y + 0.45,
            f"... and {len(out) - shown} more outputs",
            va="center",
            fontsize=10,
            color="0.3",
        )
        y += 0.9
    y += 0.5
    ax.text(label_w - 0.3, y + 0.5, "y", ha="right", va="center", fontsize=12, weight="bold")
    _board(ax, label_w, y, out[None], np.ones((1, len(out)), bool), fill=_OUTPUT)
    return fig


def explain_conv2d(x=CHAPTER_X2, w=CHAPTER_W2, padding=1, stride=1, max_steps: int = 16, show=None):
    """2-D convolution drawn step by step: the padded input, the kernel and its flipped copy, the output,
    the arithmetic of the outputs in `show` ((i, j) positions; default: the first, the middle and the last
    output), and for each output (up to `max_steps`) the window of the input it sums. Defaults are the
    chapter's example, which equals scipy.signal.convolve2d(x, w, mode="same"). Every number comes from
    `ops.conv2d`. A note says that a CNN's layers compute cross-correlation (no flip). A ValueError names a
    position outside the output."""
    steps = conv2d_steps(x, w, padding, stride)
    out, flipped = steps.output, steps.kernel
    (p1, _), (p2, _) = steps.padding
    s1, s2 = steps.stride
    kh, kw = flipped.shape
    h, w_out = out.shape
    if show is None:
        show = [(0, 0), (h // 2, w_out // 2), (h - 1, w_out - 1)]
    show = list(dict.fromkeys((int(i), int(j)) for i, j in show))
    for i, j in show:
        if not (0 <= i < h and 0 <= j < w_out):
            raise ValueError(f"output position ({i}, {j}) is outside y, which is {h} x {w_out}")
    equations = []
    for i, j in show:
        top, left = steps.windows[(i, j)]
        window = steps.padded[top : top + kh, left : left + kw]
        terms = " + ".join(f"{a:g}·{b:g}" for a, b in zip(window.ravel(), flipped.ravel(), strict=True))
        equations.append(f"y[{i}, {j}] = {terms} = {out[i, j]:g}")
    title = (
        f"2-D convolution: y = conv2d(x, w, padding=({p1}, {p2}), stride=({s1}, {s2})): {out.shape[0]} x {out.shape[1]} outputs",
        f"grey cells are the zero padding; each output sums a {kh} x {kw} window of x times the flipped kernel; "
        f"the window moves {s2} column{'s' * (s2 > 1)} right, then {s1} row{'s' * (s1 > 1)} down",
    )
    heading = (
        f"Each output is the sum of its window times the flipped kernel, cell by cell (row by row); "
        f"{'this one' if len(show) == 1 else f'these {len(show)}'} outlined in y:"
    )
    return _explain_windows(
        steps, title, [heading, *equations], max_steps, w=np.asarray(w), shown=show, note=CROSS_CORRELATION_2D
    )


def explain_pool(x=POOL_EXAMPLE, size=2, stride=None, padding="same", max_steps: int = 16):
    """Max and mean pooling drawn step by step: the input with its padding, both results, and each output's
    window (up to `max_steps`). Default: a 5 x 5 image, 2 x 2 windows, stride 2 and TensorFlow's SAME
    padding, as the chapter's network pools. Every number comes from `ops.max_pool2d` and `ops.mean_pool2d`."""
    maximum = pool_steps(x, size, stride, padding, "max")
    mean = pool_steps(x, size, stride, padding, "mean")
    (top, bottom), (left, right) = maximum.padding
    kh, kw = maximum.window_shape
    s1, s2 = maximum.stride
    out = maximum.output
    if padding == "same":
        how = (
            f"TensorFlow's SAME: ceil(n / stride) outputs a side; padding {top} row{'s' * (top != 1)} above, "
            f"{bottom} below, {left} column{'s' * (left != 1)} left, {right} right; "
            "padded cells never win a max and are left out of a mean"
        )
    else:
        how = "VALID: only windows that lie wholly inside the image"
    title = (
        f"Pooling: {kh} x {kw} windows, stride ({s1}, {s2}), {padding.upper()} padding: "
        f"{out.shape[0]} x {out.shape[1]} outputs",
        how,
    )
    return _explain_windows(maximum, title, [], max_steps, mean=mean)


def _explain_windows(steps, title, equations, max_steps, w=None, mean=None, shown=(), note=""):
    """The layout of explain_conv2d and explain_pool: the inputs and results on top (the outputs `shown`
    outlined), `equations` (lines of text), then one small copy of the padded input per output with its
    window in orange, and `note` at the foot."""
    padded, real, out = steps.padded, steps.real, steps.output
    hp, wp = padded.shape
    kh, kw = steps.window_shape
    cells = list(steps.windows)[:max_steps]
    gap, small = 1.5, _SMALL
    if mean is None:  # convolution: x, w, w flipped, y
        panels = [
            ("input", padded, "x, padded", _BACKGROUND_CELL),
            ("", w, "kernel w", _BACKGROUND_CELL),
            ("", steps.kernel, "w flipped (rotated 180°)", _KERNEL),
            ("output", out, "y = conv2d(x, w)", _OUTPUT),
        ]
    else:
        panels = [
            ("input", np.where(real, padded, 0), "x, padded", _BACKGROUND_CELL),
            ("output", out, "max pooling: the largest value", _OUTPUT),
            ("output", mean.output, "mean pooling: mean of the real cells", _MEAN),
        ]
    panel_width = sum(max(v.shape[1], _units(t, 11)) for _, v, t, _ in panels) + gap * (len(panels) - 1)
    width = (
        max(
            panel_width, _units(title[0], 13), _units(title[1], 11), *(_units(e, 10.5) for e in equations), 12
        )
        + 1.5
    )
    note = _wrap_units(note, width - 1.5, _NOTE_SIZE) if note else []
    per_row = max(1, min(len(cells), int((width - 1 + gap) // (wp * small + gap))))
    if out.shape[1] <= per_row:  # one row of drawings per row of outputs
        per_row = out.shape[1]
    caption_h = 1.3 if mean is None else 1.9
    rows_fit = max(1, int(60 // (hp * small + caption_h)))  # large inputs: fewer copies, not a huge figure
    cells = cells[: rows_fit * per_row]
    step_rows = math.ceil(len(cells) / per_row)
    top_height = max(v.shape[0] for _, v, *_ in panels)
    height = (
        2.8 + top_height + 0.6 + (0.7 * len(equations) + 0.5 if equations else 0.4)
        + step_rows * (hp * small + caption_h) + 0.6 + (0.6 * len(note) + 0.3 if note else 0)
    )  # fmt: skip
    fig, ax = _sheet(width, height)
    _title(ax, width, title)
    left, y = 0.75, 2.8
    for role, values, text, fill in panels:
        block = max(values.shape[1], _units(text, 11))
        x0 = left + (block - values.shape[1]) / 2
        ax.text(x0 + values.shape[1] / 2, y - 0.25, text, ha="center", va="bottom", fontsize=11)
        is_real = real if role == "input" else np.ones(values.shape, bool)
        if mean is None:  # convolution: the first shown output's window, and the shown outputs
            first = steps.windows[shown[0]] if shown else steps.windows[cells[0]]
            window = (first, (kh, kw)) if role == "input" else None
            marks = shown if role == "output" else ()
            _board(ax, x0, y, values, is_real, fill=fill, window=window, marks=marks)
        else:  # pooling: every window outlined, where they do not overlap
            _board(ax, x0, y, values, is_real, fill=fill, pad_text="pad")
            apart = steps.stride[0] >= kh and steps.stride[1] >= kw
            if role == "input":
                for row, col in list(steps.windows.values())[: None if apart else 1]:
                    ax.add_patch(_rectangle((x0 + col, y + row), kw, kh, edge="#b35806", width=1.6))
        left += block + gap
    y += top_height + 0.6
    if equations:
        for n, line in enumerate(equations):
            ax.text(
                0.75, y + 0.3 + 0.7 * n, line, va="center", fontsize=10.5, color="0.25" if n == 0 else "black"
            )
        y += 0.7 * len(equations) + 0.5
    else:
        y += 0.4
    for n, (i, j) in enumerate(cells):
        x0 = 0.75 + (n % per_row) * (wp * small + gap)
        y0 = y + (n // per_row) * (hp * small + caption_h) + caption_h - 0.5
        row, col = steps.windows[(i, j)]
        if mean is None:
            caption = f"y[{i}, {j}] = {out[i, j]:g}"
        else:
            count = int(real[row : row + kh, col : col + kw].sum())
            caption = (
                f"max {out[i, j]:g}, mean {mean.output[i, j]:.3g}\n({count} real cell{'s' * (count != 1)})"
            )
        ax.text(x0 + wp * small / 2, y0 - 0.15, caption, ha="center", va="bottom", fontsize=9)
        _board(ax, x0, y0, np.where(real, padded, 0), real, scale=small, window=((row, col), (kh, kw)),
               fontsize=_SMALL_SIZE, pad_text="" if mean is not None else None)  # fmt: skip
    if note:
        _note(ax, 0.75, height - 0.6 * len(note) - 0.2, note)
    if len(cells) < len(steps.windows):
        ax.text(width / 2, height - 0.6 * len(note) - 0.65, f"(the first {len(cells)} of {len(steps.windows)} outputs)",
                ha="center", va="center", fontsize=10, color="0.3")  # fmt: skip
    return fig


def _cross_correlation(function: str, reference: str, layer: str) -> str:
    return (
        f"Convolution or cross-correlation? {function} here (cnnkit.ops) is the convolution of mathematics, as "
        f"{reference}: it flips the kernel. A CNN's convolution layers ({layer}, the layers of cnnkit's "
        "networks) compute cross-correlation: the same sums with w as it is, not flipped. A CNN learns its "
        "kernels, so the two differ only in which way round a learned kernel is stored."
    )


CROSS_CORRELATION_1D = _cross_correlation("conv1d", "np.convolve", "torch.nn.Conv1d")
CROSS_CORRELATION_2D = _cross_correlation("conv2d", "scipy.signal.convolve2d", "torch.nn.Conv2d")


_NOTE_SIZE = 10.5


def _note(ax, left, top, lines):
    for n, line in enumerate(lines):
        ax.text(left, top + 0.6 * n + 0.3, line, va="center", fontsize=_NOTE_SIZE, color="#8a4200")


def _wrap_units(text: str, width: float, fontsize: float) -> list[str]:
    """`text` in lines that fit `width` cells at `fontsize` (as `_units` measures them)."""
    import textwrap

    chars = max(20, int(width * _UNIT * 72 / (0.55 * fontsize)))
    return textwrap.wrap(text, chars)


_UNIT = 0.42  # inches per cell in the step-by-step drawings

# The small copies of the input: cells of 0.85 units (36 pixels at DPI 100) and digits of 8.5 points
# (12 pixels), so that no number in the drawings is smaller than 11 pixels.
_SMALL, _SMALL_SIZE = 0.85, 8.5


_BACKGROUND_CELL, _KERNEL, _OUTPUT, _MEAN, _WINDOW, _PAD = (
    "#ffffff",
    "#fde0c5",
    "#d9ead3",
    "#cfe2f3",
    "#fdb863",
    "#d9d9d9",
)


def _sheet(width: float, height: float):
    """A Figure `width` x `height` cells in size, one axes over all of it; y grows downwards."""
    fig = plain_figure(width * _UNIT, height * _UNIT)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    return fig, ax


def _units(text: str, fontsize: float) -> float:
    """About how many cells a line of text takes (DejaVu Sans averages 0.55 em a character)."""
    return max((len(line) for line in text.split("\n")), default=0) * 0.55 * fontsize / (_UNIT * 72)


def _title(ax, width, lines):
    ax.text(width / 2, 0.7, lines[0], ha="center", va="center", fontsize=13, weight="bold")
    ax.text(width / 2, 1.45, lines[1], ha="center", va="center", fontsize=11, color="0.25")


def _rectangle(xy, w, h, face="none", edge="0.55", width=0.6):
    from matplotlib.patches import Rectangle

    return Rectangle(xy, w, h, facecolor=face, edgecolor=edge, linewidth=width)


def _board(ax, left, top, values, real, scale=1.0, fill=_BACKGROUND_CELL, window=None, marks=(), fontsize=None,
           pad_text=None):  # fmt: skip
    """A 2-D array as numbered cells at (left, top): padding grey, `window` ((top, left), (h, w)) orange and
    outlined, the cells `marks` [(i, j), ...] outlined. `pad_text` replaces the numbers of padding cells."""
    values = np.asarray(values)
    h, w = values.shape
    inside = set()
    if window is not None:
        (top_row, left_col), (kh, kw) = window
        inside = {(r, c) for r in range(top_row, top_row + kh) for c in range(left_col, left_col + kw)}
    size = fontsize or (11 if scale == 1 else _SMALL_SIZE)
    for r in range(h):
        for c in range(w):
            is_real = bool(real[r, c])
            face = _WINDOW if (r, c) in inside else (fill if is_real else _PAD)
            ax.add_patch(_rectangle((left + c * scale, top + r * scale), scale, scale, face=face))
            text = f"{values[r, c]:.3g}" if values.dtype.kind == "f" else f"{values[r, c]:g}"
            if not is_real and pad_text is not None:
                text = pad_text
            ax.text(left + (c + 0.5) * scale, top + (r + 0.5) * scale, text, ha="center", va="center", fontsize=size,
                    color="black" if is_real else "0.4")  # fmt: skip
    if window is not None:
        corner = (left + left_col * scale, top + top_row * scale)
        ax.add_patch(_rectangle(corner, kw * scale, kh * scale, edge="#b35806", width=2))
    for i, j in marks:
        ax.add_patch(_rectangle((left + j * scale, top + i * scale), scale, scale, edge="#b35806", width=2.2))
