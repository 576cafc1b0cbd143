"""cnnkit.plots: every figure renders at its stated size, and the step-by-step drawings show what cnnkit.ops computes."""

import io

import numpy as np
import pytest
from PIL import Image

from cnnkit import plots
from cnnkit.data.sources import FASHION_MNIST
from cnnkit.layer_outputs import activations, filters
from cnnkit.model import Architecture, build_model
from cnnkit.viz import grids, style

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
    rows = 1 if n_wrong <= 8 else 2  # each row: the picture and at least three lines of text
    assert grid.width == plots.GRID_WIDTH and grid.height >= 64 + rows * (80 + 3 * 17)
    kernels = filters(model)["conv1"]
    assert plots.filters_image(kernels).size == (plots.GRID_WIDTH, 70 + plots.GRID_WIDTH // 16 + 10)
    maps = plots.feature_maps_image(acts, 2, names, label=2)
    assert maps.width == plots.GRID_WIDTH and 400 < maps.height < 2600
    for fig in (plots.mistakes(images, labels, acts["probabilities"], names), plots.feature_maps(acts, 0)):
        assert png_size(fig) in {(plots.GRID_WIDTH, h) for h in range(100, 2600)}


def test_mistakes_image_with_no_mistakes_says_so():
    probabilities = np.eye(3)[[0, 1, 2]]
    grid = plots.mistakes_image(np.zeros((3, 1, 16, 16), np.uint8), [0, 1, 2], probabilities, ["a", "b", "c"])
    assert grid.width == plots.GRID_WIDTH and 150 < grid.height < 300


def test_feature_maps_draw_positive_values_in_magma_and_negative_ones_in_blue():
    # one filter that copies the image and one that negates it: magma's top where the image is bright, and
    # the blue ramp's top in the negated map; after ReLU that map is black (0)
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
    picture = np.asarray(plots.feature_maps_image(activations(model, image), 0)).astype(int)

    def pixels_of(colour):
        return (np.abs(picture - np.asarray(colour)).sum(axis=-1) <= 6).sum()

    assert pixels_of(style.POSITIVE_LUT[255]) > 100 and pixels_of(style.NEGATIVE_LUT[255]) > 100


def test_colours_js_mirrors_the_palette_of_style_py():
    """The page (serve/static/colours.js) and the report (viz/style.py) draw with the same colours."""
    import json
    import re
    from pathlib import Path

    import cnnkit

    script = (Path(cnnkit.__file__).parent / "serve" / "static" / "colours.js").read_text()
    assert "src/cnnkit/viz/style.py" in script  # it names its source
    constants = {
        name: json.loads(value)
        for name, value in re.findall(r"^export const ([A-Z_]+) = (\[.*\]|\"[^\"]*\");$", script, re.M)
    }
    expected = {name: json.loads(json.dumps(value)) for name, value in style.SHARED_WITH_PAGE.items()}
    assert constants == expected
    # colours.js builds its tables with ramp(): the same arithmetic as style.ramp
    body = script[script.index("export function ramp") :]
    assert "(i / 255) * (stops.length - 1)" in body and "Math.round(t * 255)" in body


def test_colours_js_computes_the_same_colours_as_style_py():
    """Where Node.js is installed: the page's colour tables, computed by colours.js itself."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    import cnnkit

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("no Node.js to run colours.js")
    url = (Path(cnnkit.__file__).parent / "serve" / "static" / "colours.js").as_uri()
    script = (
        f"import({json.dumps(url)}).then((m) => {{ const out = new Uint8ClampedArray(4 * 9);"
        "[-4, -3, -1, -0.01, 0, 0.01, 1, 3, 4].forEach((v, i) => m.colour(v, 4, out, 4 * i));"
        "console.log(JSON.stringify([Array.from(m.WARM), Array.from(m.COLD), Array.from(out)])); })"
    )
    done = subprocess.run(
        [node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    warm, cold, colours = json.loads(done.stdout)
    assert warm == style.POSITIVE_LUT.ravel().tolist() and cold == style.NEGATIVE_LUT.ravel().tolist()
    values = np.array([-4, -3, -1, -0.01, 0, 0.01, 1, 3, 4])
    expected = np.concatenate([style.value_colours(values, 4.0), np.full((9, 1), 255)], axis=1)
    assert colours == expected.ravel().tolist()


def test_value_colours_put_black_at_zero_magma_above_and_blue_below_on_one_scale():
    values = np.array([-4.0, -2.0, 0.0, 1.0, 2.0, 4.0, 8.0])
    colours = style.value_colours(values, 4.0)
    assert colours[2].tolist() == list(style.POSITIVE_STOPS[0])  # 0 is black
    assert (
        colours[5].tolist() == list(style.POSITIVE_STOPS[-1]) == colours[6].tolist()
    )  # the scale, and above
    assert colours[0].tolist() == list(style.NEGATIVE_STOPS[-1])
    assert colours[4].tolist() == style.POSITIVE_LUT[128].tolist()  # half the scale: Math.round(127.5)
    assert colours[1].tolist() == style.NEGATIVE_LUT[128].tolist()
    lightness = style.POSITIVE_LUT.sum(axis=1)
    assert (np.diff(lightness.astype(int)) >= -1).all()  # sequential: brighter with the value
    assert style.layer_scale(np.array([[-3.0, 2.0]])) == 3.0 and style.layer_scale(np.zeros(4)) == 1.0


def fake_activations(n=2, seed=0):
    """Activations of a made-up network with names cnnkit does not know: maps, features, scores."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 3))
    return {
        "input": rng.normal(size=(n, 1, 12, 12)),
        "stem": rng.normal(size=(n, 5, 12, 12)),
        "stem_relu": np.maximum(rng.normal(size=(n, 5, 12, 12)), 0),
        "block": np.maximum(rng.normal(size=(n, 7, 6, 6)), 0),
        "features": np.maximum(rng.normal(size=(n, 100)), 0),
        "logits": logits,
        "probabilities": np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True),
    }


def test_feature_maps_draw_whatever_layers_they_are_given():
    acts = fake_activations()
    picture = plots.feature_maps_image(
        acts, 0, ["a", "b", "c"], descriptions={"stem": "the first convolution"}
    )
    fewer = dict(acts)
    del fewer["block"], fewer["features"]
    assert picture.width == plots.GRID_WIDTH
    assert plots.feature_maps_image(fewer, 0, ["a", "b", "c"]).height < picture.height  # every layer drawn


def test_feature_maps_have_one_scale_per_layer_over_all_the_images():
    acts = fake_activations(n=2)
    acts["stem"][1] *= 10  # image 1 is ten times stronger: image 0 is drawn darker than on its own
    alone = {name: values[:1] for name, values in acts.items()}
    together = np.asarray(plots.feature_maps_image(acts, 0))
    assert not np.array_equal(together, np.asarray(plots.feature_maps_image(alone, 0)))
    scales = {name: style.layer_scale(values) for name, values in acts.items()}
    given = np.asarray(plots.feature_maps_image(alone, 0, scales=scales))
    assert np.array_equal(together[:-70], given[:-70])  # all but the note, which says over how many images


def test_confusion_matrix_colours_the_errors_on_their_own_scale():
    confusion = np.array([[500, 3, 0], [7, 480, 1], [0, 2, 490]])
    fig = plots.confusion_matrix(confusion, ["a", "b", "c"])
    counts, shares = fig.axes[0].images[0], fig.axes[1].images[0]
    assert counts.norm.vmax == 7 and shares.norm.vmax == pytest.approx(
        100 * 7 / 488
    )  # not the diagonal's 500
    assert counts.get_array().mask.tolist() == np.eye(3, dtype=bool).tolist()  # the diagonal drawn apart
    drawn = texts(fig)
    assert "0 to 7" in drawn and "green: right answers" in drawn


def test_mistakes_give_the_true_class_probability_and_the_runner_up():
    probabilities = np.array([[0.1, 0.85, 0.05], [0.3, 0.2, 0.5]])
    assert plots.runner_up(probabilities).tolist() == [0, 0]
    assert grids.probability_text(0.9996) == ">99.9%" and grids.probability_text(0.0004) == "<0.1%"
    assert grids.probability_text(0.05) == "5.0%" and grids.probability_text(0.85) == "85%"
    from PIL import ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name = "true: " + FASHION[0] + " and a class name long enough to need three lines"
    lines = grids.wrap_pixels(draw, name, 13, 138)
    assert len(lines) >= 3 and " ".join(lines) == name  # whole, not cut
    assert all(draw.textlength(line, font=style.load_font(13)) <= 138 for line in lines)
    assert "".join(grids.wrap_pixels(draw, "x" * 80, 13, 138)) == "x" * 80


def test_network_draws_each_layer_to_scale():
    from matplotlib.patches import Polygon

    arch = Architecture()
    fig = plots.network(arch)
    faces = []  # the front faces: upright rectangles, one per layer, in order
    for patch in fig.axes[0].patches:
        if isinstance(patch, Polygon):
            xy = patch.get_xy()[:4]
            if xy[0][1] == xy[1][1] and xy[1][0] == xy[2][0]:
                faces.append((xy[1][0] - xy[0][0], xy[2][1] - xy[1][1]))
    rows = arch.layers()
    assert len(faces) == len(rows)
    heights = {name.split()[0]: abs(h) for (name, _, _), (_, h) in zip(rows, faces, strict=True)}
    assert heights["input"] / heights["max-pool2"] == pytest.approx(28 / 4)  # the maps shrink, to scale
    assert heights["dense3"] > heights["dense4"]
    assert "Drawn to scale" in texts(fig)


def test_history_draws_each_quantity_in_the_palettes_colour():
    from matplotlib.colors import to_hex

    fig = plots.history([epoch(n) for n in range(1, 4)], epoch=3, best_epoch=3)
    loss_lines = [to_hex(line.get_color()) for line in fig.axes[0].lines[:2]]
    assert loss_lines == [style.TRAINING, style.VALIDATION]
    assert to_hex(fig.axes[1].lines[0].get_color()) == style.ACCURACY


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
