"""cnnkit.plots: every figure renders at its stated size, and the step-by-step drawings show what cnnkit.ops computes."""

import io

import numpy as np
import pytest
from PIL import Image

from cnnkit import ops, plots
from cnnkit.data.sources import FASHION_MNIST
from cnnkit.layer_outputs import activations, filters
from cnnkit.model import Architecture, build_model

FASHION = list(FASHION_MNIST.class_names)


def png_size(fig) -> tuple[int, int]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=plots.DPI)
    return Image.open(io.BytesIO(buffer.getvalue())).size


def texts(fig) -> str:
    """Every piece of text drawn in a figure (titles, labels, annotations), joined by newlines."""
    from matplotlib.text import Text

    return "\n".join(t.get_text() for t in fig.findobj(Text))


def epoch(n, valid=True, lr=1e-3):
    return {
        "epoch": n,
        "train_loss": 1.0 / n,
        "valid_loss": 1.2 / n if valid else None,
        "valid_accuracy": 0.8 + 0.01 * n if valid else None,
        "learning_rate": lr,
        "images_per_s": 1000.0,
        "epoch_seconds": 1.0,
    }


# --- figures of a trained network ---


@pytest.mark.parametrize(
    "history",
    [
        [epoch(n) for n in range(1, 8)],
        [epoch(n, valid=False) for n in range(1, 4)],
        [epoch(1)],
        [epoch(n, lr=4e-3 * 10**-n) for n in range(1, 6)],  # a schedule spanning decades: log scale
        [],
    ],
    ids=["validation", "no validation", "one epoch", "schedule", "empty"],
)
def test_history_renders_at_its_stated_size_with_or_without_validation(history):
    fig = plots.history(history, epoch=len(history) or None, best_epoch=3 if len(history) >= 3 else None)
    assert png_size(fig) == plots.SIZES["history"]
    drawn = texts(fig)
    assert "Loss" in drawn and "Validation accuracy" in drawn and "Learning rate" in drawn
    assert ("no validation split" in drawn) == (not history or history[0]["valid_loss"] is None)


def test_history_marks_the_best_epoch_and_the_reported_one():
    drawn = texts(plots.history([epoch(n) for n in range(1, 6)], epoch=5, best_epoch=4))
    assert "best: 84.00% (epoch 4)" in drawn and "this model (epoch 5)" in drawn


@pytest.mark.parametrize("k", [2, 3, 10, 50])
def test_confusion_matrix_and_per_class_accuracy_render_for_any_class_count(k):
    rng = np.random.default_rng(k)
    confusion = rng.integers(0, 5, (k, k)) + np.diag(rng.integers(20, 40, k))
    names = FASHION if k == 10 else [f"class {i}" for i in range(k)]
    fig = plots.confusion_matrix(confusion, names)
    assert png_size(fig) == plots.SIZES["confusion_matrix"]
    drawn = texts(fig)
    assert f"{np.trace(confusion):,} of {confusion.sum():,} images on the diagonal" in drawn
    if k == 10:  # class names on the axes, counts and shares in the cells
        assert "Ankle boot" in drawn and f"{confusion[0, 0]:,}" in drawn
        assert f"{100 * confusion[0, 0] / confusion[0].sum():.1f}%" in drawn
    assert png_size(plots.per_class_accuracy(confusion, names)) == plots.SIZES["per_class_accuracy"]


def test_per_class_accuracy_says_which_class_has_no_images():
    confusion = np.array([[5, 1, 0], [0, 0, 0], [1, 0, 3]])
    drawn = texts(plots.per_class_accuracy(confusion, ["a", "b", "c"]))
    assert "83.3% of 6" in drawn and "no images" in drawn and "75.0% of 4" in drawn
    assert "all classes (80.0%)" in drawn


def test_confusion_matrix_refuses_a_matrix_that_does_not_match_the_names():
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        plots.confusion_matrix(np.eye(2, dtype=int), ["a", "b", "c"])


def test_pca_2d_agrees_with_scikit_learn_up_to_sign():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 12)) * np.linspace(5, 0.1, 12)
    points, explained = plots.pca_2d(features)
    reference = PCA(2, svd_solver="full").fit(features)
    np.testing.assert_allclose(np.abs(points), np.abs(reference.transform(features)), atol=1e-8)
    np.testing.assert_allclose(explained, reference.explained_variance_ratio_, rtol=1e-10)


@pytest.mark.parametrize("k", [3, 10, 30])
def test_projection_renders_with_a_legend_of_class_names(k):
    rng = np.random.default_rng(0)
    labels = np.arange(200) % k
    features = rng.normal(size=(200, 16)) + labels[:, None]
    names = FASHION if k == 10 else [f"c{i}" for i in range(k)]
    fig = plots.projection(features, labels, names)
    assert png_size(fig) == plots.SIZES["projection"]
    drawn = texts(fig)
    assert "principal component 1" in drawn and "of the variance" in drawn
    assert ("Ankle boot" in drawn) == (k == 10) and (fig.axes[0].get_legend() is not None) == (k <= 20)
    assert ("true class number" in drawn) == (k > 20)


def test_network_shows_every_layer_with_its_shape_and_parameters():
    arch = Architecture()
    fig = plots.network(arch)
    assert png_size(fig) == plots.SIZES["network"]
    drawn = texts(fig)
    assert "32 x 24 x 24" in drawn and "1,049,600 parameters" in drawn and f"{arch.num_parameters:,}" in drawn


def test_most_confident_mistakes_come_first_and_right_answers_never():
    labels = np.array([0, 1, 2, 0, 1])
    probabilities = np.array(
        [[0.9, 0.1, 0.0], [0.7, 0.2, 0.1], [0.05, 0.9, 0.05], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]]
    )
    assert plots.most_confident_mistakes(labels, probabilities).tolist() == [2, 1, 3]
    assert plots.most_confident_mistakes(labels, probabilities, count=1).tolist() == [2]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 20, 20), (3, 64, 48)])
def test_image_grids_render_for_gray_rgb_and_large_images(shape):
    arch = Architecture(input_shape=shape, num_classes=3, conv_channels=(4, 6), hidden_units=8)
    model = build_model(arch, seed=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, *shape)).astype(np.uint8)
    standardized = (images - 127.5) / 60
    acts = activations(model, standardized)
    names = ["square", "λ-bar", "a class with a very long name indeed"]
    labels = np.array([0, 1, 2, 0, 1, 2])
    grid = plots.mistakes_image(images, labels, acts["probabilities"], names)
    n_wrong = int((acts["probabilities"].argmax(axis=1) != labels).sum())
    assert grid.width == plots.GRID_WIDTH and grid.height == 64 + 154 * (1 if n_wrong <= 8 else 2) + 10
    kernels = filters(model)["conv1"]
    assert plots.filters_image(kernels).size == (plots.GRID_WIDTH, 70 + plots.GRID_WIDTH // 16 + 10)
    maps = plots.feature_maps_image(acts, 2, names, label=2)
    assert maps.width == plots.GRID_WIDTH and 400 < maps.height < 1600
    for fig in (plots.mistakes(images, labels, acts["probabilities"], names), plots.feature_maps(acts, 0)):
        assert png_size(fig) in {(plots.GRID_WIDTH, h) for h in range(100, 1600)}


def test_mistakes_image_with_no_mistakes_says_so():
    probabilities = np.eye(3)[[0, 1, 2]]
    grid = plots.mistakes_image(np.zeros((3, 1, 16, 16), np.uint8), [0, 1, 2], probabilities, ["a", "b", "c"])
    assert grid.size == (plots.GRID_WIDTH, 64 + 154 + 10)


def test_feature_maps_scale_conv_maps_to_their_sign_and_relu_maps_from_black():
    # one filter that copies the image and one that negates it: red where the image is bright, and blue
    arch = Architecture(
        input_shape=(1, 16, 16), num_classes=2, conv_channels=(2, 2), hidden_units=4, kernel_size=1
    )
    model = build_model(arch, seed=0)
    with np.errstate(all="ignore"):
        state = model.state_dict()
        state["features.0.weight"][:] = 0
        state["features.0.weight"][0, 0, 0, 0], state["features.0.weight"][1, 0, 0, 0] = 1.0, -1.0
    image = np.zeros((1, 1, 16, 16), np.float32)
    image[0, 0, 4:8, 4:8] = 3.0
    picture = np.asarray(plots.feature_maps_image(activations(model, image), 0))
    reds = (picture[..., 0] > 150) & (picture[..., 2] < 80)
    blues = (picture[..., 2] > 140) & (picture[..., 0] < 80)
    assert reds.sum() > 100 and blues.sum() > 100


# --- the chapter's primitives, step by step ---

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


def test_save_figure_writes_a_png_without_a_software_url(tmp_path):
    path = plots.save_figure(plots.explain_pool(), tmp_path / "pool.png")
    assert Image.open(path).format == "PNG" and b"matplotlib.org" not in path.read_bytes()


def test_importing_plots_does_not_import_matplotlib():
    import subprocess
    import sys

    code = "import sys, cnnkit.plots, cnnkit.report; assert 'matplotlib' not in sys.modules, 'imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.parametrize("d", [1, 5, 64, 600, 1024])
def test_pca_2d_agrees_with_scikit_learn_for_few_and_many_features(d):
    from sklearn.decomposition import PCA

    features = np.random.default_rng(d).normal(size=(200, d)) * np.linspace(3, 0.1, d)
    points, explained = plots.pca_2d(features)
    k = min(d, 2)
    reference = PCA(k, svd_solver="full").fit(features)
    tolerance = 1e-8 if d <= 256 else 1e-4  # many features: float32 products
    np.testing.assert_allclose(np.abs(points[:, :k]), np.abs(reference.transform(features)), atol=tolerance)
    np.testing.assert_allclose(explained[:k], reference.explained_variance_ratio_, rtol=tolerance)
    assert plots.pca_2d(np.ones((10, d)))[1].tolist() == [0.0, 0.0]  # constant features: nothing to show
