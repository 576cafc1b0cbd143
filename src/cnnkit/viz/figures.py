"""The figures of a trained network, one function each, each returning a matplotlib Figure: learning
curves, confusion matrix, per-class accuracy, the most confident mistakes, filters, feature maps, a
2-D projection of any features, the network."""

import math

import numpy as np

from cnnkit.viz.grids import feature_maps_image, filters_image, mistakes_image
from cnnkit.viz.style import (
    ACCURACY,
    LEARNING_RATE,
    RIGHT_HEX,
    SIZES,
    TRAINING,
    VALIDATION,
    WRONG_HEX,
    add_note,
    drawn_names,
    image_figure,
    names_width,
    percent_text,
    shorten,
    sized_figure,
    wrap_text,
)


def history(history, epoch: int | None = None, best_epoch: int | None = None):
    """Learning curves from a run's history (a list of dicts, one per epoch, as `record.history`).

    Three panels: training and validation loss, validation accuracy, learning rate, per epoch.
    `epoch` marks the model being reported, `best_epoch` the best validation accuracy. Returns a Figure
    of SIZES["history"] pixels.
    """
    fig = sized_figure("history", left=70, right=25, top=70, bottom=55)
    axes = fig.subplots(1, 3, gridspec_kw={"wspace": 0.28})
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    train_loss = _series(history, "train_loss")
    valid_loss = _series(history, "valid_loss")
    valid_acc = _series(history, "valid_accuracy") * 100
    lr = _series(history, "learning_rate")
    marker = "o" if len(epochs) <= 30 else None
    loss_ax, acc_ax, lr_ax = axes

    loss_ax.plot(epochs, train_loss, marker=marker, color=TRAINING, label="training (mean over the epoch)")
    if np.isfinite(valid_loss).any():
        loss_ax.plot(
            epochs, valid_loss, marker=marker, color=VALIDATION, label="validation (at the epoch's end)"
        )
    loss_ax.set(title="Loss (cross-entropy)", xlabel="epoch", ylabel="loss")
    if np.isfinite(valid_acc).any():
        acc_ax.plot(epochs, valid_acc, marker=marker, color=ACCURACY)
        acc_ax.set(ylabel="accuracy (%)")
        if best_epoch in epochs:
            i = epochs.index(best_epoch)
            acc_ax.plot([best_epoch], [valid_acc[i]], marker="*", markersize=18, color=ACCURACY, zorder=3,
                        markeredgecolor="0.1", linestyle="", label=f"best: {valid_acc[i]:.2f}% (epoch {best_epoch})")  # fmt: skip
            acc_ax.legend(loc="lower right", fontsize=9)
    else:
        add_note(acc_ax, "no validation split:\nthis run trained without one")
        acc_ax.set_yticks([])
    acc_ax.set(title="Validation accuracy", xlabel="epoch")
    if np.isfinite(lr).any():
        lr_ax.plot(epochs, lr, marker=marker, color=LEARNING_RATE)
        finite = lr[np.isfinite(lr) & (lr > 0)]
        if len(finite) and finite.max() / finite.min() > 20:
            lr_ax.set_yscale("log")
        else:
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            lr_ax.set_ylim(0, np.nanmax(lr) * 1.15)
    else:
        add_note(lr_ax, "no learning rate recorded")
    lr_ax.set(title="Learning rate (at the epoch's last step)", xlabel="epoch", ylabel="learning rate")
    if not epochs:
        for ax in axes:
            add_note(ax, "no epochs recorded")
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
    report.json's "confusion_matrix"). In both panels the errors (off the diagonal) have their own colour
    scale, white for none to red at the panel's largest error, so that the pairs the network confuses
    stand out; the diagonal (the right answers) is green, with its number. Returns a Figure of
    SIZES["confusion_matrix"] pixels.
    """
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Rectangle

    confusion = np.asarray(confusion, dtype=np.int64)
    k = len(class_names)
    if confusion.shape != (k, k):
        raise ValueError(f"confusion must be ({k}, {k}) for {k} class names, got {confusion.shape}")
    totals = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion * 100.0, totals, out=np.zeros(confusion.shape), where=totals > 0)
    fig = sized_figure(
        "confusion_matrix",
        left=names_width(class_names) + 45,
        right=75,
        top=75,
        bottom=names_width(class_names) * 0.7 + 45,
    )
    count_ax, share_ax = fig.subplots(1, 2, gridspec_kw={"wspace": 0.35 + names_width(class_names) / 600})
    errors_map = LinearSegmentedColormap.from_list("errors", ["#ffffff", WRONG_HEX])
    off = ~np.eye(k, dtype=bool)
    panels = (
        (count_ax, confusion, "Counts", lambda v: f"{v:,}", "images", lambda v: f"{int(v):,}"),
        (
            share_ax,
            shares,
            "Share of each true class (each row sums to 100%)",
            percent_text,
            "% of the true class",
            lambda v: f"{v:.3g}%",
        ),
    )
    for ax, values, title, text, unit, end in panels:
        top = float(values[off].max()) if k > 1 else 0.0
        image = ax.imshow(np.ma.masked_where(~off, values), cmap=errors_map, vmin=0, vmax=top or 1,
                          interpolation="nearest")  # fmt: skip
        for i in range(k):
            ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, facecolor=_DIAGONAL, edgecolor="none"))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label(
            f"errors (off the diagonal), {unit}: 0 to {end(top)}", fontsize=9
        )
        ax.set_title(title + "; green: right answers", fontsize=12)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        _class_ticks(ax, class_names, "x")
        _class_ticks(ax, class_names, "y")
        if k <= 15:
            for i in range(k):
                for j in range(k):
                    if i == j:
                        ax.text(j, i, text(values[i, j]), ha="center", va="center", fontsize=8 if k > 10 else 9,
                                color=RIGHT_HEX, weight="bold")  # fmt: skip
                    elif values[i, j]:
                        ax.text(j, i, text(values[i, j]), ha="center", va="center", fontsize=8 if k > 10 else 9,
                                color="white" if values[i, j] > 0.6 * top else "black")  # fmt: skip
    n = int(confusion.sum())
    right = int(np.trace(confusion))
    fig.suptitle(
        f"Confusion matrix: {right:,} of {n:,} images on the diagonal ({percent_text(100 * right / max(n, 1))} correct); "
        "rows are the true classes, columns the predictions",
        fontsize=13,
    )
    return fig


_DIAGONAL = "#dcefe0"  # a pale RIGHT: the right answers' cells


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
    fig = sized_figure("per_class_accuracy", left=names_width(class_names) + 50, right=20, top=40, bottom=55)
    ax = fig.subplots()
    k = len(class_names)
    rows = np.arange(k)
    colors = [WRONG_HEX if a < overall - 5 else ACCURACY for a in np.nan_to_num(accuracy, nan=100)]
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
                    a - 1,
                    i,
                    f"{percent_text(a)} of {n:,}",
                    va="center",
                    ha="right",
                    fontsize=9,
                    color="white",
                )
            else:
                ax.text(a + 1, i, f"{percent_text(a)} of {n:,}", va="center", fontsize=9)
    ax.set_xlim(0, 100)
    ax.set_xticks(range(0, 101, 10))
    ax.set_xlabel("accuracy (% of the class's images classified as that class)")
    ax.set_ylabel("true class")
    ax.set_title(
        f"Accuracy per class; dashed line: all classes ({percent_text(overall)}); red: more than 5 points below it",
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
    class_names = drawn_names(class_names, 18)  # as the axes' class ticks: the legend's margin fits 18
    legend = max(names_width(class_names), 60) + 90 if len(class_names) <= 20 else 20
    fig = sized_figure("projection", left=75, right=legend, top=70, bottom=60)
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
    ax.set_xlabel(f"principal component 1 ({percent_text(100 * explained[0])} of the variance)")
    ax.set_ylabel(f"principal component 2 ({percent_text(100 * explained[1])} of the variance)")
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
    """The network's layers from input to output, each drawn to scale, with its output shape and parameters.

    A layer of maps (C, H, W) is a block whose face is H x W (to scale: the maps shrink) and whose depth is
    its channels (square-root scale: they grow); a vector of units is a bar as tall as its length
    (square-root scale). Layers come from `architecture.layers()` (any network). Returns a Figure of
    SIZES["network"] pixels.
    """
    from matplotlib.patches import Polygon

    rows = architecture.layers()
    width, height = SIZES["network"]
    fig = sized_figure("network")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # pixels, y down
    ax.set_axis_off()
    column = (width - 20) / len(rows)
    base, tallest = 300, 215  # the drawings stand on y = base
    maps = [shape for _, shape, _ in rows if len(shape) == 3]
    side = max((max(shape[1:]) for shape in maps), default=1)
    channels = max((shape[0] for shape in maps), default=1)
    units = max((shape[0] for _, shape, _ in rows if len(shape) == 1), default=1)
    face_max, depth_max = min(150.0, column * 0.55), column * 0.3
    text_size = 11 if column >= 150 else 9.5 if column >= 110 else 8
    previous = None
    for i, (name, shape, count) in enumerate(rows):
        centre = 10 + (i + 0.5) * column
        color = next((c for prefix, c in _KINDS.items() if name.startswith(prefix)), None)
        if len(shape) == 3:
            c, h, w = shape
            face_w, face_h = max(3.0, face_max * w / side), max(3.0, face_max * h / side)
            depth = max(3.0, depth_max * math.sqrt(c / channels))
            color = color or _KINDS["conv"]
        else:
            face_w, face_h = 12.0, max(3.0, tallest * math.sqrt(shape[0] / units))
            depth = 0.0
            color = color or _KINDS["dens"]
        dx, dy = depth * 0.75, depth * 0.5
        left, top = centre - (face_w + dx) / 2, base - face_h
        if depth:
            back = [(left, top), (left + dx, top - dy), (left + dx + face_w, top - dy), (left + face_w, top)]
            side_face = [(left + face_w, top), (left + face_w + dx, top - dy), (left + face_w + dx, base - dy),
                         (left + face_w, base)]  # fmt: skip
            ax.add_patch(Polygon(back, facecolor=_shade(color, 0.9), edgecolor="0.35", linewidth=0.8))
            ax.add_patch(Polygon(side_face, facecolor=_shade(color, 0.75), edgecolor="0.35", linewidth=0.8))
        ax.add_patch(Polygon([(left, top), (left + face_w, top), (left + face_w, base), (left, base)],
                             facecolor=color, edgecolor="0.35", linewidth=0.8))  # fmt: skip
        if previous is not None:  # at half the lower of the two, so that it meets both
            y = base - min(previous[1], face_h) / 2
            ax.annotate("", (left - 4, y), (previous[0], y),
                        arrowprops={"arrowstyle": "->", "color": "0.45", "shrinkA": 0, "shrinkB": 0})  # fmt: skip
        previous = (left + face_w + dx + 4, face_h)
        title, _, detail = name.partition(" ")
        chars = max(8, int(column / (text_size * 0.62)))
        ax.text(centre, base + 22, title, ha="center", va="center", fontsize=text_size + 1, weight="bold")
        ax.text(centre, base + 40, wrap_text(detail, chars), ha="center", va="top", fontsize=text_size - 1.5,
                color="0.25", linespacing=1.2)  # fmt: skip
        ax.text(
            centre, base + 110, " x ".join(map(str, shape)), ha="center", va="center", fontsize=text_size + 1
        )
        ax.text(centre, base + 132, f"{count:,} parameters" if count else "no parameters", ha="center",
                va="center", fontsize=text_size - 1.5, color="0.3")  # fmt: skip
    ax.text(14, height - 16, "Drawn to scale: a block's face is its maps' height x width, its depth its channels "
            "(square root); a bar is a vector, as tall as its length (square root). Output shape: channels x height x width, "
            "or units.", fontsize=9.5, color="0.3", va="center")  # fmt: skip
    ax.text(width / 2, 30, f"The network: {architecture.num_parameters:,} parameters ({build} build); softmax turns "
            f"the {architecture.num_classes} logits into probabilities", ha="center", va="center", fontsize=13)  # fmt: skip
    return fig


_KINDS = {"input": "#e8e8e8", "conv": "#cfe2f3", "max-": "#d9ead3", "dens": "#fce5cd", "drop": "#f4cccc"}


def _shade(color: str, factor: float) -> tuple:
    from matplotlib.colors import to_rgb

    return tuple(v * factor for v in to_rgb(color))


def mistakes(images, labels, probabilities, class_names, count: int = 16, split: str = "test"):
    """The most confident mistakes as a Figure (see `mistakes_image`)."""
    return image_figure(mistakes_image(images, labels, probabilities, class_names, count, split))


def filters(kernels):
    """The first layer's filters as a Figure (see `filters_image`)."""
    return image_figure(filters_image(kernels))


def feature_maps(activations, index: int = 0, class_names=None, label=None, title: str = ""):
    """What each layer makes of one image, as a Figure (see `feature_maps_image`)."""
    return image_figure(feature_maps_image(activations, index, class_names, label, title))


def _series(history, key) -> np.ndarray:
    return np.array([np.nan if h.get(key) is None else float(h[key]) for h in history], dtype=np.float64)


def _class_ticks(ax, class_names, axis: str):
    k = len(class_names)
    every = max(1, math.ceil(k / 40))
    positions = list(range(0, k, every))
    labels = [shorten(class_names[i], 18) for i in positions]
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
