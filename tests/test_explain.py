"""cnnkit explain and plots.explain_*: the step-by-step drawings show what cnnkit.ops computes, write out
the arithmetic of more than one output, say that a CNN's layers do not flip the kernel, and draw no text
smaller than 11 pixels."""

import numpy as np
import pytest
from PIL import Image

from cnnkit import ops, plots
from cnnkit.cli import main


def texts(fig) -> str:
    from matplotlib.text import Text

    return "\n".join(t.get_text() for t in fig.findobj(Text))


def png_size(fig) -> tuple[int, int]:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=plots.DPI)
    return Image.open(io.BytesIO(buffer.getvalue())).size


NOTEBOOK_OUT2 = [[10, 24, 33, 14], [23, 24, 37, 14], [17, 36, 30, 19], [11, 21, 18, 10]]


def test_default_drawings_are_the_chapters_examples_with_their_numbers():
    fig = plots.explain_conv1d()
    drawn = texts(fig)
    assert (
        "y[0] = 0·2 + 0·1 + 1·3 + 3·0 + 2·1 = 5" in drawn
        and "y[7] = 6·2 + 1·1 + 3·3 + 0·0 + 0·1 = 22" in drawn
    )
    assert np.array_equal(plots.conv2d_steps(plots.CHAPTER_X2, plots.CHAPTER_W2, 1).output, NOTEBOOK_OUT2)
    drawn = texts(plots.explain_conv2d())
    assert "= 0·1 + 0·1 + 0·0 + 0·1 + 1·2 + 2·1 + 0·3 + 5·0 + 6·1 = 10" in drawn
    assert all(f"y[{i}, {j}] = {NOTEBOOK_OUT2[i][j]}" in drawn for i in range(4) for j in range(4))
    drawn = texts(plots.explain_pool())
    assert "max 6, mean 3\n(4 real cells)" in drawn and "max 24, mean 24\n(1 real cell)" in drawn
    assert "padding 0 rows above, 1 below, 0 columns left, 1 right" in drawn


@pytest.mark.parametrize(
    "draw",
    [
        lambda: plots.explain_conv1d(range(40), [1, -1, 2], padding=3, stride=2),
        lambda: plots.explain_conv2d(
            np.arange(144).reshape(12, 12) % 7, np.ones((5, 5), int), padding=(2, 0)
        ),
        lambda: plots.explain_conv2d([[0.5, 1.25], [2, 3]], [[1]], padding=0, stride=(1, 2)),
        lambda: plots.explain_pool(np.arange(49).reshape(7, 7), size=3, stride=1, padding="same"),
        lambda: plots.explain_pool(np.arange(20).reshape(4, 5), size=(2, 3), padding="valid"),
    ],
    ids=["long 1-D", "12x12", "floats", "overlapping windows", "valid"],
)
def test_other_examples_render_and_say_how_many_outputs_are_not_drawn(draw):
    fig = draw()
    width, height = png_size(fig)
    assert 600 < width < 4000 and 300 < height < 4000
    assert "outputs" in texts(fig)


@pytest.mark.parametrize("seed", range(25))
def test_every_drawn_window_gives_the_output_cnnkit_ops_computed(seed):
    rng = np.random.default_rng(seed)
    w = rng.integers(-3, 4, tuple(rng.integers(1, 4, 2)))
    padding, stride = tuple(rng.integers(0, 3, 2)), tuple(rng.integers(1, 4, 2))
    # x at least as large as the kernel once padded (else no window fits), so every seed draws windows.
    x_shape = tuple(rng.integers(max(1, k - 2 * p), 8) for k, p in zip(w.shape, padding, strict=True))
    x = rng.integers(-5, 6, x_shape)
    steps = plots.conv2d_steps(x, w, padding, stride)
    assert np.array_equal(steps.output, ops.conv2d(x, w, padding=padding, stride=stride))
    assert len(steps.windows) == steps.output.size
    for (i, j), (top, left) in steps.windows.items():
        window = steps.padded[top : top + w.shape[0], left : left + w.shape[1]]
        assert (window * steps.kernel).sum() == steps.output[i, j]
    row = x[0]  # its padded length fits w's row, as x's padded width fits w's
    steps = plots.conv1d_steps(row, w[0], padding[1], stride[1])
    assert np.array_equal(steps.output[0], ops.conv1d(row, w[0], padding=padding[1], stride=stride[1]))
    assert len(steps.windows) == steps.output.size
    for (_, j), (_, left) in steps.windows.items():
        assert (steps.padded[0, left : left + w.shape[1]] * steps.kernel[0]).sum() == steps.output[0, j]
    size, pool_stride = tuple(rng.integers(1, 4, 2)), tuple(rng.integers(1, 4, 2))
    # "valid" takes only windows inside x: there the window is cut to x where it is larger.
    sizes = {"same": size, "valid": tuple(min(s, n) for s, n in zip(size, x.shape, strict=True))}
    for padding, size in sizes.items():
        maximum = plots.pool_steps(x, size, pool_stride, padding, "max")
        mean = plots.pool_steps(x, size, pool_stride, padding, "mean")
        assert len(maximum.windows) == maximum.output.size > 0
        for (i, j), (top, left) in maximum.windows.items():
            cells = maximum.padded[top : top + size[0], left : left + size[1]]
            real = maximum.real[top : top + size[0], left : left + size[1]]
            assert cells[real].max() == maximum.output[i, j]
            assert cells[real].mean() == pytest.approx(mean.output[i, j])


def test_conv2d_writes_out_the_first_middle_and_last_outputs_and_any_asked_for():
    drawn = texts(plots.explain_conv2d())
    assert "y[2, 2] = 6·1 + 1·1 + 3·0 + 6·1 + 0·2 + 3·1 + 4·3 + 3·0 + 2·1 = 30" in drawn
    assert "y[3, 3] = 0·1 + 3·1 + 0·0 + 3·1 + 2·2 + 0·1 + 0·3 + 0·0 + 0·1 = 10" in drawn
    drawn = texts(plots.explain_conv2d(show=[(1, 2)]))
    assert "y[1, 2] = " in drawn and "= 37" in drawn and "y[0, 0] = 0·1" not in drawn
    with pytest.raises(ValueError, match=r"\(4, 0\) is outside y, which is 4 x 4"):
        plots.explain_conv2d(show=[(4, 0)])


def test_the_convolutions_say_that_a_cnns_layers_compute_cross_correlation():
    for fig, layer in (
        (plots.explain_conv2d(), "torch.nn.Conv2d"),
        (plots.explain_conv1d(), "torch.nn.Conv1d"),
    ):
        drawn = " ".join(texts(fig).split())
        assert "compute cross-correlation" in drawn and "not flipped" in drawn and layer in drawn
        assert "it flips the kernel" in drawn


@pytest.mark.parametrize(
    "draw",
    [
        plots.explain_conv1d,
        plots.explain_conv2d,
        plots.explain_pool,
        lambda: plots.explain_conv2d([[0.5, 1.25], [2, 3]], [[1]], padding=0, stride=(1, 2)),
    ],
    ids=["conv1d", "conv2d", "pool", "floats"],
)
def test_no_text_is_smaller_than_11_pixels(draw):
    from matplotlib.text import Text

    fig = draw()
    sizes = [t.get_fontsize() * plots.DPI / 72 for t in fig.findobj(Text) if t.get_text().strip()]
    assert sizes and min(sizes) >= 11


def test_explain_conv2d_at_writes_the_asked_outputs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "conv2d", "--at", "1,2", "--at", "0,3"]) == 0
    assert capsys.readouterr().out == "wrote conv2d.png\n"
    assert Image.open(tmp_path / "conv2d.png").format == "PNG"


def test_explain_conv2d_at_outside_the_output_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["explain", "conv2d", "--at", "9,9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "(9, 9) is outside y, which is 4 x 4" in err[0]
    assert not list(tmp_path.iterdir())
