"""Pictures: one function per figure, each returning a matplotlib Figure, for notebooks and `cnnkit report`.

Of a trained network:

    history(record.history)                       learning curves: losses, validation accuracy, learning rate
    confusion_matrix(confusion, class_names)      counts, and shares of each true class
    per_class_accuracy(confusion, class_names)    one bar per class
    mistakes(images, labels, probabilities, class_names)   the most confident wrong answers
    filters(inspect.filters(model)["conv1"])      the first layer's kernels
    feature_maps(inspect.activations(model, x), 0, class_names)   what every layer makes of image 0
    projection(features, labels, class_names)     the last hidden layer in 2-D (PCA)
    network(record.architecture)                  the layers, their shapes and parameters

Of the chapter's primitives, drawn step by step from what `cnnkit.ops` computes:

    explain_conv1d(x, w, padding, stride), explain_conv2d(x, w, padding, stride), explain_pool(x, size, stride, padding)

matplotlib is imported inside the functions that draw (Figure objects, Agg, no pyplot), so importing
this module costs nothing. Grids of small images (mistakes, filters, feature maps) are drawn with Pillow,
about 100 times faster than one matplotlib axes per image: `*_image` returns the PIL image (what the
report saves), and the Figure shows it at its own pixel size.
"""

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cnnkit import ops

DPI = 100
# Pixel sizes (width, height) of the matplotlib figures; the image grids are GRID_WIDTH wide.
SIZES = {
    "history": (1500, 450),
    "confusion_matrix": (1500, 700),
    "per_class_accuracy": (1000, 550),
    "projection": (1000, 800),
    "network": (1500, 340),
}
GRID_WIDTH = 1200
# At most this many characters of a class name are drawn (the rest as "…"; report.json holds them
# whole): Pillow refuses a text of a million characters, and matplotlib takes minutes to lay one out.
NAME_CHARS = 40

# Pillow colours
_INK, _MUTED, _BACKGROUND = (20, 20, 20), (100, 100, 100), (255, 255, 255)
_WRONG, _RIGHT = (180, 30, 30), (20, 110, 40)
_NEGATIVE, _POSITIVE = np.array([33, 102, 172]), np.array([178, 24, 43])  # ColorBrewer RdBu ends


# --- a trained network: matplotlib figures ---------------------------------------------------------


def history(history, epoch: int | None = None, best_epoch: int | None = None):
    """Learning curves from a run's history (a list of dicts, one per epoch, as `record.history`).

    Three panels: training and validation loss, validation accuracy, learning rate, per epoch.
    `epoch` marks the model being reported, `best_epoch` the best validation accuracy. Returns a Figure
    of SIZES["history"] pixels.
    """
    fig = _figure("history", left=70, right=25, top=70, bottom=55)
    axes = fig.subplots(1, 3, gridspec_kw={"wspace": 0.28})
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    train_loss = _series(history, "train_loss")
    valid_loss = _series(history, "valid_loss")
    valid_acc = _series(history, "valid_accuracy") * 100
    lr = _series(history, "learning_rate")
    marker = "o" if len(epochs) <= 30 else None
    loss_ax, acc_ax, lr_ax = axes

    loss_ax.plot(epochs, train_loss, marker=marker, label="training (mean over the epoch)")
    if np.isfinite(valid_loss).any():
        loss_ax.plot(epochs, valid_loss, marker=marker, label="validation (at the epoch's end)")
    loss_ax.set(title="Loss (cross-entropy)", xlabel="epoch", ylabel="loss")
    if np.isfinite(valid_acc).any():
        acc_ax.plot(epochs, valid_acc, marker=marker, color="tab:green")
        acc_ax.set(ylabel="accuracy (%)")
        if best_epoch in epochs:
            i = epochs.index(best_epoch)
            acc_ax.plot([best_epoch], [valid_acc[i]], marker="*", markersize=16, color="tab:orange", zorder=3,
                        linestyle="", label=f"best: {valid_acc[i]:.2f}% (epoch {best_epoch})")  # fmt: skip
            acc_ax.legend(loc="lower right", fontsize=9)
    else:
        _note(acc_ax, "no validation split:\nthis run trained without one")
        acc_ax.set_yticks([])
    acc_ax.set(title="Validation accuracy", xlabel="epoch")
    if np.isfinite(lr).any():
        lr_ax.plot(epochs, lr, marker=marker, color="tab:purple")
        finite = lr[np.isfinite(lr) & (lr > 0)]
        if len(finite) and finite.max() / finite.min() > 20:
            lr_ax.set_yscale("log")
        else:
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            lr_ax.set_ylim(0, np.nanmax(lr) * 1.15)
    else:
        _note(lr_ax, "no learning rate recorded")
    lr_ax.set(title="Learning rate (at the epoch's last step)", xlabel="epoch", ylabel="learning rate")
    if not epochs:
        for ax in axes:
            _note(ax, "no epochs recorded")
    for ax in axes:
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
            ax.xaxis.get_major_locator().set_params(integer=True)
            if epoch in epochs:
                ax.axvline(
                    epoch, color="0.45", linestyle="--", linewidth=1, label=f"this model (epoch {epoch})"
                )
        ax.grid(alpha=0.3)
    loss_ax.legend(loc="upper right", fontsize=9)
    fig.suptitle(f"Learning curves: {len(epochs)} epoch{'s' * (len(epochs) != 1)}", fontsize=14)
    return fig


def confusion_matrix(confusion, class_names):
    """The confusion matrix (K, K) as two heatmaps: counts, and each true class's shares (rows sum to 100%).

    confusion[i, j] counts images of true class i predicted as class j (`Evaluation.confusion`, or
    report.json's "confusion_matrix"). Returns a Figure of SIZES["confusion_matrix"] pixels.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    k = len(class_names)
    if confusion.shape != (k, k):
        raise ValueError(f"confusion must be ({k}, {k}) for {k} class names, got {confusion.shape}")
    totals = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion * 100.0, totals, out=np.zeros(confusion.shape), where=totals > 0)
    fig = _figure(
        "confusion_matrix",
        left=_names_width(class_names) + 45,
        right=60,
        top=75,
        bottom=_names_width(class_names) * 0.7 + 45,
    )
    count_ax, share_ax = fig.subplots(1, 2, gridspec_kw={"wspace": 0.3 + _names_width(class_names) / 600})
    panels = (
        (count_ax, confusion, "Counts", "Blues", lambda v: f"{v:,}", "images"),
        (
            share_ax,
            shares,
            "Share of each true class (each row sums to 100%)",
            "Greens",
            _percent,
            "% of the row",
        ),
    )
    for ax, values, title, cmap, text, unit in panels:
        image = ax.imshow(values, cmap=cmap, vmin=0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label=unit)
        ax.set_title(title, fontsize=12)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        _class_ticks(ax, class_names, "x")
        _class_ticks(ax, class_names, "y")
        if k <= 15:
            high = values.max() * 0.6
            for i in range(k):
                for j in range(k):
                    if values[i, j]:
                        ax.text(j, i, text(values[i, j]), ha="center", va="center", fontsize=8 if k > 10 else 9,
                                color="white" if values[i, j] > high else "black")  # fmt: skip
    n = int(confusion.sum())
    right = int(np.trace(confusion))
    fig.suptitle(
        f"Confusion matrix: {right:,} of {n:,} images on the diagonal ({_percent(100 * right / max(n, 1))} correct); "
        "rows are the true classes, columns the predictions",
        fontsize=13,
    )
    return fig


def per_class_accuracy(confusion, class_names):
    """Each class's accuracy (the share of its images classified as it), with the overall accuracy.

    Returns a Figure of SIZES["per_class_accuracy"] pixels.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    totals = confusion.sum(axis=1)
    accuracy = np.divide(
        np.diag(confusion) * 100.0, totals, out=np.full(len(totals), np.nan), where=totals > 0
    )
    overall = 100.0 * np.trace(confusion) / max(confusion.sum(), 1)
    fig = _figure("per_class_accuracy", left=_names_width(class_names) + 50, right=20, top=40, bottom=55)
    ax = fig.subplots()
    k = len(class_names)
    rows = np.arange(k)
    colors = ["tab:red" if a < overall - 5 else "tab:blue" for a in np.nan_to_num(accuracy, nan=100)]
    ax.barh(rows, np.nan_to_num(accuracy), color=colors, height=0.7)
    ax.axvline(overall, color="0.2", linestyle="--", linewidth=1.2)
    ax.invert_yaxis()
    _class_ticks(ax, class_names, "y")
    if k <= 30:
        for i, (a, n) in enumerate(zip(accuracy, totals, strict=True)):
            if n == 0:
                ax.text(1, i, "no images", va="center", fontsize=9)
            elif a >= 30:  # inside the bar, at its end
                ax.text(
                    a - 1, i, f"{_percent(a)} of {n:,}", va="center", ha="right", fontsize=9, color="white"
                )
            else:
                ax.text(a + 1, i, f"{_percent(a)} of {n:,}", va="center", fontsize=9)
    ax.set_xlim(0, 100)
    ax.set_xticks(range(0, 101, 10))
    ax.set_xlabel("accuracy (% of the class's images classified as that class)")
    ax.set_ylabel("true class")
    ax.set_title(
        f"Accuracy per class; dashed line: all classes ({_percent(overall)}); red: more than 5 points below it",
        fontsize=12,
    )
    ax.grid(axis="x", alpha=0.3)
    return fig


def projection(features, labels, class_names, explained=None, title_detail: str = ""):
    """A scatter of 2-D points (N, 2) coloured by class; give `features` (N, D) to project them here (PCA).

    `explained` is each axis's share of the variance (from `pca_2d`). Returns a Figure of
    SIZES["projection"] pixels.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be (N, D) with N = {len(labels)} labels, got {features.shape}")
    points = features if features.shape[1] == 2 and explained is not None else None
    if points is None:
        points, explained = pca_2d(features)
    class_names = _drawn_names(class_names, 18)  # as the axes' class ticks: the legend's margin fits 18
    legend = max(_names_width(class_names), 60) + 90 if len(class_names) <= 20 else 20
    fig = _figure("projection", left=75, right=legend, top=70, bottom=60)
    ax = fig.subplots()
    k = len(class_names)
    order = np.random.default_rng(0).permutation(len(points))  # no class drawn wholly on top of another
    x, y, classes = points[order, 0], points[order, 1], labels[order]
    if k <= 20:
        from matplotlib.lines import Line2D

        colors = _class_colors(k)
        ax.scatter(x, y, c=colors[classes], s=7, alpha=0.7, linewidths=0)
        handles = [
            Line2D([], [], marker="o", linestyle="", color=colors[i], label=name, markersize=7)
            for i, name in enumerate(class_names)
        ]
        ax.legend(
            handles=handles, title="true class", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False
        )
    else:  # too many classes to name: a colour scale of class numbers
        dots = ax.scatter(x, y, c=classes, cmap="turbo", vmin=0, vmax=k - 1, s=7, alpha=0.7, linewidths=0)
        fig.colorbar(
            dots, ax=ax, label=f"true class number (0 = {class_names[0]}, ..., {k - 1} = {class_names[-1]})"
        )
    ax.set_xlabel(f"principal component 1 ({_percent(100 * explained[0])} of the variance)")
    ax.set_ylabel(f"principal component 2 ({_percent(100 * explained[1])} of the variance)")
    ax.set_title(
        f"The last hidden layer's features of {len(points):,} images{title_detail}, projected to 2-D (PCA)\n"
        "images the network finds alike lie close together; colour = true class",
        fontsize=12,
    )
    ax.grid(alpha=0.3)
    return fig


def pca_2d(features) -> tuple[np.ndarray, np.ndarray]:
    """Project features (N, D) on their first two principal components: points (N, 2) and the share of
    the variance each component explains (2,), by scikit-learn's PCA. Signs are fixed (largest loading
    positive); constant features give zeros."""
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2 or float(x.var(axis=0).sum()) <= 0:  # nothing varies: nothing to project
        return np.zeros((len(x), 2)), np.zeros(2)
    k = min(2, *x.shape)
    pca = PCA(n_components=k, svd_solver="full").fit(x)
    vectors = pca.components_.T * np.sign(
        pca.components_[np.arange(k), np.abs(pca.components_).argmax(axis=1)] + 1e-300
    )
    points, explained = (x - pca.mean_) @ vectors, pca.explained_variance_ratio_
    if k < 2:  # a single feature or image: the second axis is flat
        points, explained = np.pad(points, ((0, 0), (0, 2 - k))), np.append(explained, 0.0)
    return points, explained


def network(architecture, build: str = "layers"):
    """The network's layers as boxes from input to output, with each one's output shape and parameters.

    Returns a Figure of SIZES["network"] pixels.
    """
    from matplotlib.patches import FancyBboxPatch

    rows = architecture.layers()
    fig = _figure("network")
    ax = fig.add_axes((0, 0, 1, 0.88))
    ax.set_xlim(0, len(rows))
    ax.set_ylim(0, 1)
    ax.set_axis_off()
    kinds = {"input": "#e8e8e8", "conv": "#cfe2f3", "max-": "#d9ead3", "dens": "#fce5cd", "drop": "#f4cccc"}
    for i, (name, shape, count) in enumerate(rows):
        color = next((c for prefix, c in kinds.items() if name.startswith(prefix)), "#eeeeee")
        ax.add_patch(FancyBboxPatch((i + 0.06, 0.14), 0.88, 0.78, boxstyle="round,pad=0.01,rounding_size=0.05",
                                    facecolor=color, edgecolor="0.35"))  # fmt: skip
        title, _, detail = name.partition(" ")
        ax.text(i + 0.5, 0.83, title, ha="center", va="center", fontsize=12, weight="bold")
        ax.text(i + 0.5, 0.67, _wrap(detail, 18), ha="center", va="center", fontsize=8.5)
        ax.text(i + 0.5, 0.46, " x ".join(map(str, shape)), ha="center", va="center", fontsize=11)
        ax.text(i + 0.5, 0.26, f"{count:,} parameters" if count else "no parameters", ha="center",
                va="center", fontsize=8.5, color="0.3")  # fmt: skip
        if i:
            ax.annotate(
                "", (i + 0.06, 0.53), (i - 0.06, 0.53), arrowprops={"arrowstyle": "->", "color": "0.3"}
            )
    ax.text(0.06, 0.02, "output shape: channels x height x width, or units", fontsize=9, color="0.3")
    fig.suptitle(
        f"The network: {architecture.num_parameters:,} parameters ({build} build); softmax turns the "
        f"{architecture.num_classes} logits into probabilities",
        fontsize=13,
    )
    return fig


# --- a trained network: image grids (Pillow) ------------------------------------------------------------


def most_confident_mistakes(labels, probabilities, count: int = 16) -> np.ndarray:
    """Indices of the wrongly classified images, the most confident wrong answer first (at most `count`)."""
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != np.asarray(labels))
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count]


def mistakes_image(
    images, labels, probabilities, class_names, count: int = 16, split: str = "test"
) -> Image.Image:
    """A grid of the `count` most confident mistakes: each image with its true and predicted class and
    the confidence of the prediction. images (N, C, H, W) as stored (uint8 or float), labels (N,),
    probabilities (N, K). GRID_WIDTH pixels wide, 8 images a row."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    class_names = _drawn_names(class_names)
    chosen = most_confident_mistakes(labels, probabilities, count)
    n_wrong = int((probabilities.argmax(axis=1) != labels).sum())
    columns, cell_w, picture = 8, GRID_WIDTH // 8, 104
    cell_h = picture + 50
    header = 64
    rows = max(1, math.ceil(len(chosen) / columns))
    canvas = Image.new("RGB", (GRID_WIDTH, header + rows * cell_h + 10), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    title = f"The {len(chosen)} most confident mistakes" if len(chosen) else "No mistakes"
    _text(draw, (12, 8), title, 20, bold=True)
    _text(
        draw,
        (12, 36),
        f"{n_wrong:,} of {len(labels):,} {split} images are misclassified ({100 * n_wrong / max(len(labels), 1):.2f}%); "
        "under each: the true class, and the network's answer with its probability",
        14,
        _MUTED,
    )
    if not len(chosen):
        _text(draw, (12, header + 20), "Every image is classified correctly.", 16)
    predicted = probabilities.argmax(axis=1)
    for slot, index in enumerate(chosen):
        x0 = (slot % columns) * cell_w
        y0 = header + (slot // columns) * cell_h
        tile = _fit(_display(np.asarray(images[index])), picture)
        canvas.paste(tile, (x0 + (cell_w - tile.width) // 2, y0))
        p = int(predicted[index])
        _text(
            draw,
            (x0 + 6, y0 + picture + 4),
            _clip(draw, f"true: {class_names[labels[index]]}", 14, cell_w - 10),
            14,
            _RIGHT,
        )
        answer = f"said: {class_names[p]}"
        confidence = f" {probabilities[index, p]:.0%}"
        answer = _clip(draw, answer, 14, cell_w - 10 - draw.textlength(confidence, font=_font(14)))
        _text(draw, (x0 + 6, y0 + picture + 22), answer + confidence, 14, _WRONG)
    return canvas


def mistakes(images, labels, probabilities, class_names, count: int = 16, split: str = "test"):
    """The most confident mistakes as a Figure (see `mistakes_image`)."""
    return _image_figure(mistakes_image(images, labels, probabilities, class_names, count, split))


def filters_image(kernels) -> Image.Image:
    """The first layer's filters (F, C, k, k) as a grid, 16 a row, GRID_WIDTH pixels wide.

    One channel: red where a weight is positive, blue where negative, on one scale for all filters.
    Three channels: each filter shown as a colour picture, scaled to 0..1 on its own.
    """
    kernels = np.asarray(kernels, dtype=np.float64)
    if kernels.ndim != 4 or kernels.shape[1] not in (1, 3):
        raise ValueError(f"kernels must be (F, 1 or 3, k, k), got {kernels.shape}")
    count, channels, kh, kw = kernels.shape
    columns = 16
    cell = GRID_WIDTH // columns
    size = cell - 22
    header = 70
    rows = math.ceil(count / columns)
    canvas = Image.new("RGB", (GRID_WIDTH, header + rows * cell + 10), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _text(
        draw,
        (12, 8),
        f"The first layer's {count} filters ({kh} x {kw}, {channels} channel{'s' * (channels > 1)})",
        20,
        bold=True,
    )
    if channels == 1:
        legend = "red: positive weight (the filter answers to light there); blue: negative; white: 0 (one scale for all)"
        scale = np.abs(kernels).max() or 1.0
        tiles = [_diverging(k[0] / scale) for k in kernels]
    else:
        legend = (
            "each filter as a colour picture (its weights scaled to 0..1): the colours and edges it looks for"
        )
        tiles = [_stretch(k).transpose(1, 2, 0) for k in kernels]
    _text(draw, (12, 38), legend, 14, _MUTED)
    for i, tile in enumerate(tiles):
        x0, y0 = (i % columns) * cell, header + (i // columns) * cell
        picture = Image.fromarray(tile).resize((size, size), Image.Resampling.NEAREST)
        canvas.paste(picture, (x0 + (cell - size) // 2, y0))
        draw.rectangle(
            (x0 + (cell - size) // 2 - 1, y0 - 1, x0 + (cell + size) // 2, y0 + size), outline=(160, 160, 160)
        )
        _text(draw, (x0 + cell // 2, y0 + size + 3), str(i + 1), 11, _MUTED, anchor="ma")
    return canvas


def filters(kernels):
    """The first layer's filters as a Figure (see `filters_image`)."""
    return _image_figure(filters_image(kernels))


MAP_LAYERS = ("input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2")


def feature_maps_image(
    activations, index: int = 0, class_names=None, label=None, title: str = ""
) -> Image.Image:
    """What each layer makes of one image: every map of conv1, relu1, pool1, conv2, relu2 and pool2.

    `activations` is `cnnkit.layer_outputs.activations(model, images)`; `index` picks the image; `label` is
    its true class (optional). Each row is labelled with the layer and its shape. GRID_WIDTH wide.
    """
    from cnnkit.layer_outputs import DESCRIPTIONS

    label_width, gap = 330, 2
    content = GRID_WIDTH - label_width - 10
    blocks = []
    for name in MAP_LAYERS:
        maps = np.asarray(activations[name][index], dtype=np.float64)  # (channels, H, W)
        side = max(maps.shape[1:])
        scale = max(1, (112 if name == "input" else 48) // side)
        tile_w, tile_h = maps.shape[2] * scale, maps.shape[1] * scale
        if side * scale > 96:  # large images: shrink the tiles
            tile_w, tile_h = (
                max(1, round(maps.shape[2] * 96 / side)),
                max(1, round(maps.shape[1] * 96 / side)),
            )
        if name == "input":
            tiles = [
                _stretch(maps).transpose(1, 2, 0).squeeze(-1)
                if len(maps) == 1
                else _stretch(maps).transpose(1, 2, 0)
            ]
        elif name.startswith("conv"):
            top = _strong(np.abs(maps))
            tiles = [_diverging(m / top) for m in maps]
        else:
            top = _strong(maps)
            tiles = [(np.clip(m / top, 0, 1) * 255).astype(np.uint8) for m in maps]
        per_row = max(1, content // (tile_w + gap))
        if per_row > 16:  # 32 or 64 maps in whole rows
            per_row = 16 * (per_row // 16)
        rows = math.ceil(len(tiles) / per_row)
        blocks.append((name, maps.shape, tiles, (tile_w, tile_h), per_row, max(rows * (tile_h + gap), 62)))
    header, footer = 74, 62
    height = header + sum(b[-1] + 12 for b in blocks) + footer
    canvas = Image.new("RGB", (GRID_WIDTH, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    probabilities = activations["probabilities"][index]
    predicted = int(np.argmax(probabilities))
    names = _drawn_names(class_names or range(len(probabilities)))
    _text(draw, (12, 8), title or "What each layer sees", 20, bold=True)
    verdict = f"the network says {names[predicted]} ({probabilities[predicted]:.1%})"
    if label is not None:
        verdict = f"true class {names[label]}; " + verdict + ("" if label == predicted else "  (wrong)")
    _text(draw, (12, 38), verdict, 15, _RIGHT if label is None or label == predicted else _WRONG)
    y = header
    for name, shape, tiles, (tile_w, tile_h), per_row, block_h in blocks:
        draw.line((10, y - 6, GRID_WIDTH - 10, y - 6), fill=(225, 225, 225))
        _text(draw, (12, y), name, 16, bold=True)
        count = f"{shape[0]} map{'s' * (shape[0] > 1)} of {shape[1]} x {shape[2]}"
        _text(draw, (12 + draw.textlength(name, font=_font(16, True)) + 10, y + 1), count, 14)
        _text(draw, (12, y + 22), _wrap(DESCRIPTIONS[name], 44), 12, _MUTED)
        for i, tile in enumerate(tiles):
            x0 = label_width + (i % per_row) * (tile_w + gap)
            y0 = y + (i // per_row) * (tile_h + gap)
            canvas.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.Resampling.NEAREST), (x0, y0))
        y += block_h + 12
    top3 = np.argsort(-probabilities)[:3]
    _text(
        draw,
        (12, y),
        "output: " + ",  ".join(f"{names[i]} {probabilities[i]:.1%}" for i in top3),
        15,
        bold=True,
    )
    _text(
        draw,
        (12, y + 24),
        "convolution maps: red positive, blue negative, white 0; ReLU and pooling maps: black 0, white "
        "strong (one scale per layer: its 99th percentile of non-zero values and above)",
        13,
        _MUTED,
    )
    return canvas


def feature_maps(activations, index: int = 0, class_names=None, label=None, title: str = ""):
    """What each layer makes of one image, as a Figure (see `feature_maps_image`)."""
    return _image_figure(feature_maps_image(activations, index, class_names, label, title))


# --- the chapter's primitives, step by step -----------------------------------------------------------


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
    height = 2.2 + 1.4 + 1.2 + shown + (0.9 if shown < len(out) else 0) + 0.5 + 1.5
    fig, ax = _sheet(width, height)
    _title(ax, width, title)
    y = 2.2
    ax.text(label_w - 0.3, y + 0.5, "x, padded", ha="right", va="center", fontsize=11)
    _board(ax, label_w, y, xs[None], steps.real)
    y += 1.4
    ax.text(label_w - 0.3, y + 0.5, "w flipped", ha="right", va="center", fontsize=11)
    _board(ax, label_w, y, kernel[None], np.ones((1, len(kernel)), bool), fill=_KERNEL)
    ax.text(label_w + len(kernel) + 0.4, y + 0.5, f"w = {_numbers(np.asarray(w))} reversed: convolution flips the kernel",
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


def explain_conv2d(x=CHAPTER_X2, w=CHAPTER_W2, padding=1, stride=1, max_steps: int = 16):
    """2-D convolution drawn step by step: the padded input, the kernel and its flipped copy, the output,
    and for each output (up to `max_steps`) the window of the input it sums. Defaults are the chapter's
    example, which equals scipy.signal.convolve2d(x, w, mode="same"). Every number comes from `ops.conv2d`."""
    steps = conv2d_steps(x, w, padding, stride)
    out, flipped = steps.output, steps.kernel
    (p1, _), (p2, _) = steps.padding
    s1, s2 = steps.stride
    kh, kw = flipped.shape
    first = steps.windows[(0, 0)]
    window = steps.padded[first[0] : first[0] + kh, first[1] : first[1] + kw]
    terms = " + ".join(f"{a:g}·{b:g}" for a, b in zip(window.ravel(), flipped.ravel(), strict=True))
    equation = f"y[0, 0] = sum of the orange window times the flipped kernel = {terms} = {out[0, 0]:g}"
    title = (
        f"2-D convolution: y = conv2d(x, w, padding=({p1}, {p2}), stride=({s1}, {s2})): {out.shape[0]} x {out.shape[1]} outputs",
        f"grey cells are the zero padding; each output sums a {kh} x {kw} window of x times the flipped kernel; "
        f"the window moves {s2} column{'s' * (s2 > 1)} right, then {s1} row{'s' * (s1 > 1)} down",
    )
    return _explain_windows(steps, title, equation, max_steps, w=np.asarray(w))


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
    return _explain_windows(maximum, title, None, max_steps, mean=mean)


def _explain_windows(steps, title, equation, max_steps, w=None, mean=None):
    """The layout of explain_conv2d and explain_pool: the inputs and results on top, then one small copy of
    the padded input per output with its window in orange."""
    padded, real, out = steps.padded, steps.real, steps.output
    hp, wp = padded.shape
    kh, kw = steps.window_shape
    cells = list(steps.windows)[:max_steps]
    gap, small = 1.5, 0.62
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
    width = max(panel_width, _units(title[0], 13), _units(title[1], 11), _units(equation or "", 10), 12) + 1.5
    per_row = max(1, min(len(cells), int((width - 1 + gap) // (wp * small + gap))))
    if out.shape[1] <= per_row:  # one row of drawings per row of outputs
        per_row = out.shape[1]
    step_rows = math.ceil(len(cells) / per_row)
    top_height = max(v.shape[0] for _, v, *_ in panels)
    height = 2.8 + top_height + 0.6 + (1.2 if equation else 0.4) + step_rows * (hp * small + 1.3) + 0.6
    fig, ax = _sheet(width, height)
    _title(ax, width, title)
    left, y = 0.75, 2.8
    for role, values, text, fill in panels:
        block = max(values.shape[1], _units(text, 11))
        x0 = left + (block - values.shape[1]) / 2
        ax.text(x0 + values.shape[1] / 2, y - 0.25, text, ha="center", va="bottom", fontsize=11)
        is_real = real if role == "input" else np.ones(values.shape, bool)
        if mean is None:  # convolution: the first output's window and cell
            window = (steps.windows[cells[0]], (kh, kw)) if role == "input" else None
            mark = cells[0] if role == "output" else None
            _board(ax, x0, y, values, is_real, fill=fill, window=window, mark=mark)
        else:  # pooling: every window outlined, where they do not overlap
            _board(ax, x0, y, values, is_real, fill=fill, pad_text="pad")
            apart = steps.stride[0] >= kh and steps.stride[1] >= kw
            if role == "input":
                for row, col in list(steps.windows.values())[: None if apart else 1]:
                    ax.add_patch(_rectangle((x0 + col, y + row), kw, kh, edge="#b35806", width=1.6))
        left += block + gap
    y += top_height + 0.6
    if equation:
        ax.text(0.75, y + 0.2, equation, va="center", fontsize=10)
        y += 1.2
    else:
        y += 0.4
    for n, (i, j) in enumerate(cells):
        x0 = 0.75 + (n % per_row) * (wp * small + gap)
        y0 = y + (n // per_row) * (hp * small + 1.3) + 0.8
        row, col = steps.windows[(i, j)]
        if mean is None:
            caption = f"y[{i}, {j}] = {out[i, j]:g}"
        else:
            count = int(real[row : row + kh, col : col + kw].sum())
            caption = (
                f"max {out[i, j]:g}, mean {mean.output[i, j]:.3g}\n({count} real cell{'s' * (count != 1)})"
            )
        ax.text(x0 + wp * small / 2, y0 - 0.15, caption, ha="center", va="bottom", fontsize=9)
        _board(ax, x0, y0, np.where(real, padded, 0), real, scale=small, window=((row, col), (kh, kw)), fontsize=7,
               pad_text="" if mean is not None else None)  # fmt: skip
    if len(cells) < len(steps.windows):
        ax.text(width / 2, height - 0.35, f"(the first {len(cells)} of {len(steps.windows)} outputs)", ha="center",
                va="center", fontsize=10, color="0.3")  # fmt: skip
    return fig


# --- drawing helpers -------------------------------------------------------------------------------


def save_figure(fig, path) -> Path:
    """Write a Figure as a PNG of its own pixel size (figure inches x DPI), atomically (see `save_image`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return save_image(Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]), path)


def save_image(image: Image.Image, path) -> Path:
    """Write a PIL image as a PNG in 256 colours, atomically: a third of the bytes of full colour for
    figures of flat colours and text, and quicker to write. A FileError names `path` if it cannot be written."""
    from cnnkit.atomic import atomic_write

    path = Path(path)
    if image.mode not in ("L", "P"):
        image = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        palette = np.array(image.getpalette()[: 3 * 256]).reshape(-1, 3)
        nearest = np.abs(palette - 255).sum(axis=1).argmin()
        if np.abs(palette[nearest] - 255).sum() <= 24:  # the octree averages white with its neighbours
            palette[nearest] = 255
            image.putpalette(palette.ravel().tolist())
    with atomic_write(path) as f:
        image.save(f, format="PNG")
    return path


def _figure(name: str, left=0, right=0, top=0, bottom=0):
    """A Figure of SIZES[name] pixels whose subplots leave these margins (pixels) for labels and titles.

    (Fixed margins: matplotlib's constrained layout took a third of the report's drawing time.)
    """
    width, height = SIZES[name]
    fig = _plain_figure(width / DPI, height / DPI)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height
    )
    return fig


def _names_width(class_names) -> float:
    """About how many pixels the longest class name takes as a tick label (at most 18 characters, 9 pt)."""
    return 7.0 * min(max((len(name) for name in class_names), default=1), 18)


def _plain_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def _image_figure(image: Image.Image):
    fig = _plain_figure(image.width / DPI, image.height / DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.asarray(image), interpolation="nearest")
    ax.set_axis_off()
    return fig


def _series(history, key) -> np.ndarray:
    return np.array([np.nan if h.get(key) is None else float(h[key]) for h in history], dtype=np.float64)


def _note(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.4")


def _percent(value) -> str:
    return (
        "-"
        if not np.isfinite(value)
        else f"{value:.1f}%"
        if value < 99.95 or value == 100
        else f"{value:.2f}%"
    )


def _class_ticks(ax, class_names, axis: str):
    k = len(class_names)
    every = max(1, math.ceil(k / 40))
    positions = list(range(0, k, every))
    labels = [_shorten(class_names[i], 18) for i in positions]
    if axis == "x":
        tilt = k > 3 and max(len(name) for name in labels) > 3
        ax.set_xticks(positions, labels, rotation=40 if tilt else 0, ha="right" if tilt else "center",
                      rotation_mode="anchor", fontsize=9 if k <= 20 else 7)  # fmt: skip
    else:
        ax.set_yticks(positions, labels, fontsize=9 if k <= 20 else 7)


def _class_colors(k: int) -> np.ndarray:
    """k <= 20 distinct colours, one per class (RGB rows)."""
    import matplotlib

    return np.array(matplotlib.colormaps["tab10" if k <= 10 else "tab20"].colors)[:k]


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _drawn_names(class_names, limit: int = NAME_CHARS) -> list[str]:
    """The class names as a figure draws them: at most `limit` characters each, cut with an ellipsis."""
    return [_shorten(str(name), limit) for name in class_names]


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _numbers(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in np.ravel(values)) + "]"


_UNIT = 0.42  # inches per cell in the step-by-step drawings
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
    fig = _plain_figure(width * _UNIT, height * _UNIT)
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


def _board(ax, left, top, values, real, scale=1.0, fill=_BACKGROUND_CELL, window=None, mark=None, fontsize=None,
           pad_text=None):  # fmt: skip
    """A 2-D array as numbered cells at (left, top): padding grey, `window` ((top, left), (h, w)) orange and
    outlined, cell `mark` (i, j) outlined. `pad_text` replaces the numbers of padding cells."""
    values = np.asarray(values)
    h, w = values.shape
    inside = set()
    if window is not None:
        (top_row, left_col), (kh, kw) = window
        inside = {(r, c) for r in range(top_row, top_row + kh) for c in range(left_col, left_col + kw)}
    size = fontsize or (11 if scale == 1 else 7)
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
    if mark is not None:
        ax.add_patch(
            _rectangle(
                (left + mark[1] * scale, top + mark[0] * scale), scale, scale, edge="#b35806", width=2.2
            )
        )


# --- Pillow helpers ---


@functools.cache
def _font(size: int, bold: bool = False):
    """DejaVu Sans (shipped with matplotlib; many scripts), found without importing matplotlib; else Pillow's own."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        path = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf" / name
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _text(draw, xy, text, size, fill=_INK, bold=False, anchor=None):
    draw.text(xy, text, font=_font(size, bold), fill=fill, anchor=anchor)


def _clip(draw, text: str, size: int, width: float) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    font = _font(size)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _display(image) -> Image.Image:
    """An image (C, H, W) as stored (uint8, or floats of any range) as a PIL image, gray or RGB."""
    array = image if image.dtype == np.uint8 else _stretch(image)
    if array.shape[0] == 1:
        return Image.fromarray(array[0], "L")
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), "RGB")


def _fit(image: Image.Image, size: int) -> Image.Image:
    """Scale an image to fit size x size: whole-number enlargement (sharp pixels), or reduction."""
    side = max(image.size)
    if side <= size:
        factor = size // side
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    return image.resize(
        (max(1, image.width * size // side), max(1, image.height * size // side)), Image.Resampling.LANCZOS
    )


def _stretch(values) -> np.ndarray:
    """Any array scaled to uint8 0..255 by its own minimum and maximum (constant: mid-gray)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = np.nanmin(values), np.nanmax(values)
    if not high > low:
        return np.full(values.shape, 128, np.uint8)
    return ((values - low) / (high - low) * 255).round().astype(np.uint8)


def _strong(values) -> float:
    """A layer's 'strong' value for a colour scale: the 99th percentile of its non-zero magnitudes, so that
    a few outliers do not leave every other map black."""
    values = np.abs(np.asarray(values))
    nonzero = values[values > 0]
    return float(np.percentile(nonzero, 99)) if len(nonzero) else 1.0


def _diverging(values) -> np.ndarray:
    """Values in [-1, 1] as RGB uint8: blue (negative), white (0), red (positive)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), -1, 1)[..., None]
    white = np.array([247.0, 247.0, 247.0])
    rgb = np.where(v >= 0, white + v * (_POSITIVE - white), white + (-v) * (_NEGATIVE - white))
    return rgb.round().astype(np.uint8)
