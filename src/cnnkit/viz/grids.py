"""Grids of small images drawn with Pillow (about 100 times faster than one matplotlib axes per image):
the most confident mistakes, filters, and every layer's feature maps for one image."""

import math

import numpy as np
from PIL import Image, ImageDraw

from cnnkit.viz.style import (
    BACKGROUND,
    GRID_WIDTH,
    MUTED,
    NEGATIVE,
    POSITIVE,
    RIGHT,
    WRONG,
    clip_text,
    draw_text,
    drawn_names,
    load_font,
    wrap_text,
)


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
    class_names = drawn_names(class_names)
    chosen = most_confident_mistakes(labels, probabilities, count)
    n_wrong = int((probabilities.argmax(axis=1) != labels).sum())
    columns, cell_w, picture = 8, GRID_WIDTH // 8, 104
    cell_h = picture + 50
    header = 64
    rows = max(1, math.ceil(len(chosen) / columns))
    canvas = Image.new("RGB", (GRID_WIDTH, header + rows * cell_h + 10), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    title = f"The {len(chosen)} most confident mistakes" if len(chosen) else "No mistakes"
    draw_text(draw, (12, 8), title, 20, bold=True)
    draw_text(
        draw,
        (12, 36),
        f"{n_wrong:,} of {len(labels):,} {split} images are misclassified ({100 * n_wrong / max(len(labels), 1):.2f}%); "
        "under each: the true class, and the network's answer with its probability",
        14,
        MUTED,
    )
    if not len(chosen):
        draw_text(draw, (12, header + 20), "Every image is classified correctly.", 16)
    predicted = probabilities.argmax(axis=1)
    for slot, index in enumerate(chosen):
        x0 = (slot % columns) * cell_w
        y0 = header + (slot // columns) * cell_h
        tile = _fit(_display(np.asarray(images[index])), picture)
        canvas.paste(tile, (x0 + (cell_w - tile.width) // 2, y0))
        p = int(predicted[index])
        draw_text(
            draw,
            (x0 + 6, y0 + picture + 4),
            clip_text(draw, f"true: {class_names[labels[index]]}", 14, cell_w - 10),
            14,
            RIGHT,
        )
        answer = f"said: {class_names[p]}"
        confidence = f" {probabilities[index, p]:.0%}"
        answer = clip_text(draw, answer, 14, cell_w - 10 - draw.textlength(confidence, font=load_font(14)))
        draw_text(draw, (x0 + 6, y0 + picture + 22), answer + confidence, 14, WRONG)
    return canvas


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
    canvas = Image.new("RGB", (GRID_WIDTH, header + rows * cell + 10), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw_text(
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
    draw_text(draw, (12, 38), legend, 14, MUTED)
    for i, tile in enumerate(tiles):
        x0, y0 = (i % columns) * cell, header + (i // columns) * cell
        picture = Image.fromarray(tile).resize((size, size), Image.Resampling.NEAREST)
        canvas.paste(picture, (x0 + (cell - size) // 2, y0))
        draw.rectangle(
            (x0 + (cell - size) // 2 - 1, y0 - 1, x0 + (cell + size) // 2, y0 + size), outline=(160, 160, 160)
        )
        draw_text(draw, (x0 + cell // 2, y0 + size + 3), str(i + 1), 11, MUTED, anchor="ma")
    return canvas


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
    canvas = Image.new("RGB", (GRID_WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    probabilities = activations["probabilities"][index]
    predicted = int(np.argmax(probabilities))
    names = drawn_names(class_names or range(len(probabilities)))
    draw_text(draw, (12, 8), title or "What each layer sees", 20, bold=True)
    verdict = f"the network says {names[predicted]} ({probabilities[predicted]:.1%})"
    if label is not None:
        verdict = f"true class {names[label]}; " + verdict + ("" if label == predicted else "  (wrong)")
    draw_text(draw, (12, 38), verdict, 15, RIGHT if label is None or label == predicted else WRONG)
    y = header
    for name, shape, tiles, (tile_w, tile_h), per_row, block_h in blocks:
        draw.line((10, y - 6, GRID_WIDTH - 10, y - 6), fill=(225, 225, 225))
        draw_text(draw, (12, y), name, 16, bold=True)
        count = f"{shape[0]} map{'s' * (shape[0] > 1)} of {shape[1]} x {shape[2]}"
        draw_text(draw, (12 + draw.textlength(name, font=load_font(16, True)) + 10, y + 1), count, 14)
        draw_text(draw, (12, y + 22), wrap_text(DESCRIPTIONS[name], 44), 12, MUTED)
        for i, tile in enumerate(tiles):
            x0 = label_width + (i % per_row) * (tile_w + gap)
            y0 = y + (i // per_row) * (tile_h + gap)
            canvas.paste(Image.fromarray(tile).resize((tile_w, tile_h), Image.Resampling.NEAREST), (x0, y0))
        y += block_h + 12
    top3 = np.argsort(-probabilities)[:3]
    draw_text(
        draw,
        (12, y),
        "output: " + ",  ".join(f"{names[i]} {probabilities[i]:.1%}" for i in top3),
        15,
        bold=True,
    )
    draw_text(
        draw,
        (12, y + 24),
        "convolution maps: red positive, blue negative, white 0; ReLU and pooling maps: black 0, white "
        "strong (one scale per layer: its 99th percentile of non-zero values and above)",
        13,
        MUTED,
    )
    return canvas


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
    rgb = np.where(v >= 0, white + v * (POSITIVE - white), white + (-v) * (NEGATIVE - white))
    return rgb.round().astype(np.uint8)
