"""`cnnkit report`: a trained model's pictures and numbers, in one folder that opens from disk.

    RUN/report/
      index.html              one page: the numbers, every figure with how to read it, the layers
      report.json             the numbers behind the figures; its accuracy, loss, per_class and
                              confusion_matrix are `cnnkit evaluate --json`'s (the same code)
      learning_curves.png  confusion_matrix.png  per_class_accuracy.png  mistakes.png  filters.png
      feature_maps_1.png ...  projection.png  network.png

The figures come from `cnnkit.plots` (the functions a notebook calls), the layers' outputs from
`cnnkit.layer_outputs.activations`. The page links only its own PNG files: no network, no CDN.
"""

import html
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cnnkit import __version__
from cnnkit.atomic import atomic_write
from cnnkit.checkpoint import load_network, read_record, resolve_checkpoint
from cnnkit.device import resolve_device, resolve_precision
from cnnkit.errors import FileError
from cnnkit.evaluation import evaluate_split, evaluation_split
from cnnkit.layer_outputs import activations, filters, layers_of
from cnnkit.metrics import strict_json

REPORT_FOLDER = "report"
FEATURE_MAP_IMAGES = 3  # test images whose every layer is drawn
PROJECTION_IMAGES = 2000  # test images in the PCA scatter: enough to see the clusters
MISTAKES = 16
_CHUNK = 128  # images per call of `activations` (it keeps every layer: 128 MNIST images take 60 MB)


def default_report_folder(run) -> Path:
    """RUN/report for a run folder or one of its checkpoints; NAME-report beside any other checkpoint file."""
    run = Path(run)
    if run.is_dir():
        return run / REPORT_FOLDER
    if run.parent.name == "checkpoints":
        return run.parent.parent / REPORT_FOLDER
    return run.with_name(f"{run.stem}-{REPORT_FOLDER}")


# The report's figures in the order the page shows them: file, title and caption (formatted with the
# split's name and counts); write_report draws each.
FIGURES = {
    "learning_curves.png": (
        "Learning curves",
        "Left: the loss on the training images (mean over each epoch) and on the validation images "
        "(after each epoch); a validation loss that rises while the training loss falls means the network "
        "is memorizing. The training loss is measured with dropout on (and label smoothing, in the fast "
        "recipe), so it can lie above the validation loss. Middle: validation accuracy, its best epoch "
        "starred. Right: the learning rate the schedule used. The dashed line marks the epoch of the model "
        "reported here.",
    ),
    "confusion_matrix.png": (
        "Confusion matrix",
        "Each row is a true class, each column the class the network answered, over the {split} split's "
        "{images:,} images. The diagonal (green) holds the right answers. Off it, the errors have a colour "
        "scale of their own, from white (none) to red at the largest error, so that the pairs of classes "
        "the network confuses stand out however many images it gets right. Left: counts; right: the share "
        "of each true class.",
    ),
    "per_class_accuracy.png": (
        "Accuracy per class",
        "The share of each class's images that the network classifies as that class (its recall). "
        "The dashed line is the accuracy over all classes.",
    ),
    "mistakes.png": (
        "The most confident mistakes",
        "The wrong answers the network was surest of, each with the probability it gave the true class "
        "and its second choice (2nd). Some are the network's fault; others are images a person would "
        "find ambiguous, or labels that look wrong.",
    ),
    "filters.png": (
        "The first layer's filters",
        "Each small square is one filter of the first convolution: the pattern of weights it slides over "
        "the image, on one colour scale for all filters (its bar: orange to yellow positive, blue "
        "negative, black 0). The filters are numbered as the maps they make: map 5 of {layer} (below) "
        "is bright where the image looks like filter 5.",
    ),
    "feature_maps_1.png": (
        "What each layer sees: {split} image {index:,}",
        "One image on its way through the network, layer by layer. Each convolution turns every map of "
        "the layer before into one map per filter; ReLU keeps the positive part; max-pooling halves "
        "the size, keeping the strongest answer in each 2 x 2 block. The maps get smaller and more "
        "abstract: by the last pooling layer they no longer look like the image. Colours: black is 0, "
        "positive values run from purple through orange to pale yellow, negative ones (before ReLU) from "
        "dark to pale blue. Each layer has one scale, the same for all its maps and for the {images} "
        "images drawn here, stated on its bar, so that the figures compare layer by layer.",
    ),
    "feature_maps_{n}.png": (
        "What each layer sees: {split} image {index:,}",
        "Another image, of another class, read the same way: what differs from image {first:,} "
        "in each layer is what tells the classes apart.",
    ),
    "projection.png": (
        "The last hidden layer, in 2-D",
        "The {features:,} features that the last layer reads, for {sample:,} {split} images, projected on "
        "the two directions in which they vary most (principal component analysis). Each dot is an image, "
        "coloured by its true class: classes that form separate clouds are easy for the network; "
        "overlapping clouds are the pairs the confusion matrix shows.",
    ),
    "network.png": (
        "The network",
        "The network, from the image to the class scores, drawn to scale: each block's face is its maps' "
        "height x width, its depth its channels, so the maps shrink while the channels grow; a bar is a "
        "vector of units. Under each: the layer's output shape and number of weights.",
    ),
}


def write_report(
    run,
    out=None,
    which: str | None = None,
    dataset: str | None = None,
    split: str = "test",
    precision: str = "auto",
    device="cpu",
    batch_size: int | None = None,
    started: float | None = None,
) -> Path:
    """Write the report of a run folder or checkpoint file `run` into `out` (default: RUN/report).

    `which`, `dataset`, `split`, `precision`, `device` and `batch_size` mean what they mean for
    `cnnkit evaluate`. `started` is the time.time() at which the work began (default: now; `cnnkit
    report` gives its process's start), so that report.json's "seconds" and the page's footer are the
    wall time it took. Returns the folder; raises CnnkitError for a bad run, dataset or folder (FileError
    naming `out` when it cannot be written).
    """
    from cnnkit import plots

    started = time.time() if started is None else started
    device = resolve_device(device)
    model, ckpt = load_network(run, which, device)
    record = ckpt.record
    out = Path(out) if out is not None else default_report_folder(run)
    _make_folder(out)
    source, _, data = evaluation_split(record, ckpt.path, dataset, split)
    precision = resolve_precision(precision, device)
    scored = evaluate_split(model, ckpt, source, data, precision, device, batch_size)
    names = list(record.class_names)
    probabilities = scored.probabilities
    predicted = probabilities.argmax(axis=1)
    second = plots.runner_up(probabilities) if len(names) > 1 else predicted
    standardized = record.standardization.apply(data.images)
    history, best_epoch = _run_history(run, ckpt)
    figures = []

    def add(file, picture, entry=None, **context):
        title, caption = FIGURES[entry or file]
        title, caption = title.format(split=data.name, **context), caption.format(split=data.name, **context)
        path = out / file
        if isinstance(picture, Image.Image):
            plots.save_image(picture, path)
        else:
            plots.save_figure(picture, path)
        with Image.open(path) as written:
            width, height = written.size
        figures.append({"file": file, "title": title, "caption": caption, "width": width, "height": height})

    add("learning_curves.png", plots.history(history, record.epoch, best_epoch))
    confusion = scored.evaluation.confusion
    add("confusion_matrix.png", plots.confusion_matrix(confusion, names), images=len(data))
    add("per_class_accuracy.png", plots.per_class_accuracy(confusion, names))
    add(
        "mistakes.png",
        plots.mistakes_image(data.images, data.labels, probabilities, names, MISTAKES, data.name),
    )
    first_layer, kernels = next(iter(filters(model).items()))
    add("filters.png", plots.filters_image(kernels), layer=first_layer)
    chosen = _one_per_class(data.labels, FEATURE_MAP_IMAGES)
    maps = activations(model, standardized[chosen])
    descriptions = layers_of(model)
    for n, index in enumerate(chosen, 1):
        add(
            f"feature_maps_{n}.png",
            plots.feature_maps_image(
                maps,
                n - 1,
                names,
                int(data.labels[index]),
                f"What each layer sees: {data.name} image {index:,}",
                descriptions,
            ),
            entry="feature_maps_1.png" if n == 1 else "feature_maps_{n}.png",
            index=index,
            first=chosen[0],
            images=len(chosen),
        )
    hidden = _last_hidden_layer(maps)
    sample = np.unique(np.linspace(0, len(data) - 1, min(PROJECTION_IMAGES, len(data))).round().astype(int))
    features = np.concatenate(
        [
            activations(model, standardized[sample[i : i + _CHUNK]])[hidden]
            for i in range(0, len(sample), _CHUNK)
        ]
    )
    points, explained = plots.pca_2d(np.nan_to_num(features))
    add(
        "projection.png",
        plots.projection(points, data.labels[sample], names, explained, f" of the {data.name} split"),
        features=features.shape[1],
        sample=len(sample),
    )
    arch = record.architecture
    add("network.png", plots.network(arch, record.build))
    wrong = plots.most_confident_mistakes(data.labels, probabilities, MISTAKES)
    report = dict(scored.numbers)  # cnnkit evaluate --json's object, first and unchanged
    report.update(
        {
            "class_names": names,
            "best_epoch": best_epoch,
            "history": list(history),
            "mistakes": [
                {
                    "index": int(i),
                    "true": names[data.labels[i]],
                    "predicted": names[predicted[i]],
                    "confidence": round(float(probabilities[i, predicted[i]]), 6),
                    "true_probability": round(float(probabilities[i, data.labels[i]]), 6),
                    "runner_up": names[second[i]],
                    "runner_up_probability": round(float(probabilities[i, second[i]]), 6),
                }
                for i in wrong
            ],
            "feature_map_images": [
                {"index": int(i), "true": names[data.labels[i]], "predicted": names[predicted[i]]}
                for i in chosen
            ],
            "projection": {
                "layer": hidden,
                "method": "PCA",
                "explained_variance": [round(float(v), 6) for v in explained],
                "indices": sample.tolist(),
                "points": np.round(points, 4).tolist(),
            },
            "layers": [
                {"layer": name, "output_shape": list(shape), "parameters": count}
                for name, shape, count in arch.layers()
            ],
            "parameters": arch.num_parameters,
            "figures": figures,
            "cnnkit_version": __version__,
            "made": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
            "seconds": round(time.time() - started, 2),
        }
    )
    with atomic_write(out / "report.json", "w") as f:
        json.dump(strict_json(report), f, allow_nan=False, indent=1)
        f.write("\n")
    with atomic_write(out / "index.html", "w") as f:
        f.write(_page(run, report, data.name))
    return out


def _last_hidden_layer(maps: dict) -> str:
    """The name of the last layer of features before the scores: the last (N, units) layer before "logits"."""
    vectors = [
        name
        for name, values in maps.items()
        if np.ndim(values) == 2 and name not in ("logits", "probabilities")
    ]
    return vectors[-1] if vectors else "logits"


def _make_folder(out: Path):
    if out.exists() and not out.is_dir():
        raise FileError(f"{out}: is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileError(f"{out}: cannot create the report folder ({exc.strerror or exc})") from None


def _run_history(run, ckpt) -> tuple[list, int | None]:
    """The whole run's history (the newest checkpoint's record, for a run folder), and its best epoch."""
    record = ckpt.record
    if Path(run).is_dir():
        newest = resolve_checkpoint(run)
        if newest != ckpt.path:
            record = read_record(newest)
    return list(record.history), record.best_epoch


def _one_per_class(labels, count: int) -> list[int]:
    """The first image of each of the first `count` classes met (fewer when there are fewer classes)."""
    chosen, seen = [], set()
    for i, label in enumerate(np.asarray(labels).tolist()):
        if label not in seen:
            seen.add(label)
            chosen.append(i)
            if len(chosen) == count:
                break
    return chosen


_STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; color: #222; max-width: 1260px; margin: 0 auto; padding: 1em 1.5em 3em; }
h1 { margin-bottom: 0.2em; overflow-wrap: anywhere; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; overflow-wrap: anywhere; }
.numbers { display: flex; flex-wrap: wrap; gap: 0.5em 2.5em; margin: 1em 0; }
.numbers div { font-size: 0.9em; color: #555; } .numbers b { display: block; font-size: 1.8em; color: #222; }
figure { margin: 1.5em 0; } .picture { display: block; overflow-x: auto; }
.picture img { display: block; box-sizing: border-box; max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; max-width: 60em; } .phone { display: none; }
.table { overflow-x: auto; } table { border-collapse: collapse; }
td, th { padding: 0.2em 0.9em; text-align: left; border-bottom: 1px solid #eee; vertical-align: top; }
td.n, th.n { text-align: right; white-space: nowrap; }
code { background: #f4f4f4; padding: 0 0.2em; overflow-wrap: anywhere; }
@media (max-width: 720px) {
  body { padding: 0.5em 0.8em 2em; }
  h1 { font-size: 1.5em; } .numbers { gap: 0.5em 1.5em; } .numbers b { font-size: 1.4em; }
  /* a phone shows each figure at its own size, its text as drawn (11 px and up), in a box that scrolls
     sideways; tapping it opens the picture alone */
  .picture img { max-width: none; }
  .phone { display: inline; }
  td, th { padding: 0.2em 0.4em; }
}
"""

_SECTIONS = (
    ("How training went", ("learning_curves",)),
    ("Where it is right and wrong", ("confusion_matrix", "per_class_accuracy", "mistakes")),
    ("What the network learned", ("filters", "feature_maps", "projection")),
    ("The network", ("network",)),
)


def _page(run, report: dict, split: str) -> str:
    e = html.escape
    accuracy = "-" if report["accuracy"] is None else f"{100 * report['accuracy']:.2f}%"
    loss = "-" if report["loss"] is None else f"{report['loss']:.4f}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>cnnkit report: {e(str(run))}</title><style>{_STYLE}</style></head><body>",
        f"<h1>cnnkit report: {e(str(run))}</h1>",
        f'<p class="meta">checkpoint <code>{e(report["checkpoint"])}</code> (epoch {report["epoch"]}'
        + (f", best epoch {report['best_epoch']}" if report["best_epoch"] else "")
        + f"), scored on the {e(split)} split of <code>{e(str(report['dataset']))}</code>: "
        f"{report['n']:,} images, {len(report['class_names'])} classes, {e(report['precision'])} on {e(report['device'])}</p>",
        '<div class="numbers">',
        f"<div><b>{accuracy}</b>accuracy</div><div><b>{loss}</b>loss (cross-entropy)</div>",
        f"<div><b>{report['n'] - int(np.trace(np.asarray(report['confusion_matrix']))):,}</b>mistakes</div>",
        f"<div><b>{report['parameters']:,}</b>parameters</div></div>",
    ]
    figures = report["figures"]
    for heading, prefixes in _SECTIONS:
        parts.append(f"<h2>{e(heading)}</h2>")
        for prefix in prefixes:
            for figure in figures:
                if figure["file"].startswith(prefix):
                    parts.append(
                        f'<figure><a class="picture" href="{e(figure["file"])}" title="open the picture alone, '
                        f'at full size"><img src="{e(figure["file"])}" width="{figure["width"]}" '
                        f'height="{figure["height"]}" alt="{e(figure["title"])}"></a>'
                        f"<figcaption><b>{e(figure['title'])}.</b> {e(figure['caption'])} "
                        f'<a href="{e(figure["file"])}">Full size</a> ({figure["width"]:,} x {figure["height"]:,} '
                        'pixels)<span class="phone">; on a phone the picture scrolls sideways</span>.'
                        "</figcaption></figure>"
                    )
            if prefix == "mistakes":
                parts.append(_mistake_links(run, report, split))
        if heading == "The network":
            parts.append(_layers_table(report))
    parts.append(
        f'<p class="meta">Made by cnnkit {e(report["cnnkit_version"])} on {e(report["made"])} in '
        f"{report['seconds']:.1f} s (wall time, from the start of the command to this page). The numbers "
        'behind every figure are in <a href="report.json">report.json</a>; its accuracy, loss, per_class and '
        "confusion_matrix are what <code>cnnkit evaluate --json</code> prints.</p>"
    )
    parts.append("</body></html>\n")
    return "\n".join(parts)


# Where `cnnkit serve RUN` answers by default; its page opens an image of the run's data from the URL
# (?test=INDEX, ?valid=INDEX or ?train=INDEX, and &epoch=N; see docs/serve-page.md).
SERVE_ADDRESS = "http://127.0.0.1:8000"


def _mistake_links(run, report: dict, split: str) -> str:
    """Each mistake as a link into the web page, which shows it layer by layer at this epoch."""
    if split not in ("test", "valid", "train") or not report["mistakes"]:
        return ""
    e = html.escape
    links = ", ".join(
        f'<a href="{SERVE_ADDRESS}/?{split}={m["index"]}&amp;epoch={report["epoch"]}">{split} image '
        f"{m['index']:,}</a> ({e(m['true'])} read as {e(m['predicted'])})"
        for m in report["mistakes"]
    )
    return (
        f'<p class="meta">Layer by layer in the web page, with <code>cnnkit serve {e(str(run))}</code> '
        f"running at its default address: {links}.</p>"
    )


def _layers_table(report: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(layer['layer'])}</td><td>{' x '.join(map(str, layer['output_shape']))}</td>"
        f'<td class="n">{layer["parameters"]:,}</td></tr>'
        for layer in report["layers"]
    )
    return (
        '<div class="table"><table><tr><th>layer</th><th>output shape</th><th class="n">parameters</th></tr>'
        f'{rows}<tr><th>total</th><th></th><th class="n">{report["parameters"]:,}</th></tr></table></div>'
    )
