"""`cnnkit data info`: a dataset summarized as a table for the terminal."""

import numpy as np

from cnnkit.data.dataset import Dataset, Standardization


def info_table(ds: Dataset) -> str:
    """A multi-line summary of `ds`: image shape, classes, how `predict` prepares photos, notes on how the
    data was loaded, the training split's per-channel mean and std, and a table of per-class counts
    with one column per split and a total row."""
    c, h, w = ds.image_shape
    dtype = ds.splits[0].images.dtype
    values = "0..255" if dtype == np.uint8 else "already scaled"
    lines = [
        f"dataset      {ds.name}",
        f"image shape  {c} x {h} x {w} (channels x height x width), {dtype} {values}",
        f"classes      {len(ds.class_names)}",
        f"preprocess   {ds.preprocessing} (how cnnkit predict prepares a photo)",
        *(f"note         {note}" for note in ds.notes),
    ]
    if ds.train is not None:
        stats = Standardization.fit(ds.train.images)
        lines.append(f"train mean   {_numbers(stats.mean)}" + ("  (per channel)" if c > 1 else ""))
        lines.append(f"train std    {_numbers(stats.std)}")
    else:
        lines.append("mean / std   none: no training split")
    lines.append("")

    counts = {s.name: np.bincount(s.labels, minlength=len(ds.class_names)) for s in ds.splits}
    show_label = [str(i) for i in range(len(ds.class_names))] != list(ds.class_names)
    header = (["label"] if show_label else []) + ["class", *counts, "total"]
    rows = []
    for label, class_name in enumerate(ds.class_names):
        numbers = [int(n[label]) for n in counts.values()]
        rows.append(([str(label)] if show_label else []) + [class_name, *_counts([*numbers, sum(numbers)])])
    totals = [len(s) for s in ds.splits]
    rows.append(([""] if show_label else []) + ["total", *_counts([*totals, sum(totals)])])

    text_columns = 2 if show_label else 1
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            cell.ljust(width) if i == text_columns - 1 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _numbers(values) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def _counts(numbers) -> list[str]:
    return [f"{n:,}" for n in numbers]
