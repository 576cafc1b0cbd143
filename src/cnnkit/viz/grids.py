"""Grids of small images drawn with Pillow (about 100 times faster than one matplotlib axes per image):
the most confident mistakes, filters, and every layer's feature maps for one image."""

import math

import numpy as np
from PIL import Image, ImageDraw

from cnnkit.viz.style import (
    BACKGROUND,
    GRID_WIDTH,
    INK,
    MUTED,
    RIGHT,
    WRONG,
    draw_text,
    drawn_names,
    layer_scale,
    load_font,
    scale_text,
    shorten,
    value_colours,
)


def most_confident_mistakes(labels, probabilities, count: int = 16) -> np.ndarray:
    """Indices of the wrongly classified images, the most confident wrong answer first (at most `count`)."""
    probabilities = np.asarray(probabilities)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != np.asarray(labels))
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:count]


def runner_up(probabilities) -> np.ndarray:
    """Each row's second most probable class (N,), for probabilities (N, K) with K >= 2."""
    return np.argsort(-np.asarray(probabilities), axis=1, kind="stable")[:, 1]


def probability_text(p: float) -> str:
    """A probability as a share that never rounds a wrong answer to 100% or a possible one to 0%."""
    p = float(p)
    if p >= 0.995 and p < 1:
        return f"{100 * p:.1f}%" if p < 0.9995 else ">99.9%"
    if p >= 0.095 or p in (0.0, 1.0):
        return f"{100 * p:.0f}%"
    return f"{100 * p:.1f}%" if p >= 0.001 else "<0.1%"


def mistakes_image(
    images, labels, probabilities, class_names, count: int = 16, split: str = "test"
) -> Image.Image:
    """A grid of the `count` most confident mistakes: each image with its true class and that class's
    probability, the network's answer with its probability, and the runner-up (the second most probable
    class). Class names are drawn whole (up to NAME_CHARS characters), wrapped. images (N, C, H, W) as
    stored (uint8 or float), labels (N,), probabilities (N, K). GRID_WIDTH pixels wide, 8 images a row."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    class_names = drawn_names(class_names)
    chosen = most_confident_mistakes(labels, probabilities, count)
    n_wrong = int((probabilities.argmax(axis=1) != labels).sum())
    columns, picture, text_size, line = 8, 104, 13, 17
    cell_w = GRID_WIDTH // columns
    header = 64
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cells = []
    for index in chosen:
        true, said = int(labels[index]), int(probabilities[index].argmax())
        second = int(runner_up(probabilities[index][None])[0])
        p = probabilities[index]
        lines = [
            (text, RIGHT)
            for text in wrap_pixels(
                measure, f"true: {class_names[true]} {probability_text(p[true])}", text_size, cell_w - 12
            )
        ]
        lines += [
            (text, WRONG)
            for text in wrap_pixels(
                measure, f"said: {class_names[said]} {probability_text(p[said])}", text_size, cell_w - 12
            )
        ]
        next_best = (
            "the true class" if second == true else f"{class_names[second]} {probability_text(p[second])}"
        )
        lines += [(text, MUTED) for text in wrap_pixels(measure, f"2nd: {next_best}", text_size, cell_w - 12)]
        cells.append((index, lines))
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)] or [[]]
    tiles = {index: _fit(_display(np.asarray(images[index])), picture) for index in chosen}
    picture = max((tile.height for tile in tiles.values()), default=picture)  # the text right under them
    heights = [picture + 8 + max((len(lines) for _, lines in row), default=2) * line + 12 for row in rows]
    canvas = Image.new("RGB", (GRID_WIDTH, header + sum(heights) + 10), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    title = f"The {len(chosen)} most confident mistakes" if len(chosen) else "No mistakes"
    draw_text(draw, (12, 8), title, 20, bold=True)
    draw_text(
        draw,
        (12, 36),
        f"{n_wrong:,} of {len(labels):,} {split} images are misclassified ({100 * n_wrong / max(len(labels), 1):.2f}%); "
        "under each: the true class and its probability, the network's answer, and the runner-up (2nd)",
        14,
        MUTED,
    )
    if not len(chosen):
        draw_text(draw, (12, header + 20), "Every image is classified correctly.", 16)
    y0 = header
    for row, height in zip(rows, heights, strict=True):
        for slot, (index, lines) in enumerate(row):
            x0 = slot * cell_w
            tile = tiles[index]
            canvas.paste(tile, (x0 + (cell_w - tile.width) // 2, y0))
            for n, (text, colour) in enumerate(lines):
                draw_text(draw, (x0 + 6, y0 + picture + 6 + n * line), text, text_size, colour)
        y0 += height
    return canvas


def filters_image(kernels, title: str | None = None) -> Image.Image:
    """Filters (F, C, k, k) as a grid, 16 a row, GRID_WIDTH pixels wide, numbered from 1 as the maps they
    make (`feature_maps_image`). `title` defaults to "The first layer's F filters ...".

    One channel: the palette's diverging map (style.value_colours) on one scale for all filters, stated on
    a colour bar. Three channels: each filter shown as a colour picture, scaled to 0..1 on its own.
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
    title = title or f"The first layer's {count} filters"
    draw_text(
        draw, (12, 8), f"{title} ({kh} x {kw}, {channels} channel{'s' * (channels > 1)})", 20, bold=True
    )
    if channels == 1:
        legend = "each filter's weights on one scale for all: orange to yellow positive (the filter answers to light there), blue negative, black 0"
        scale = layer_scale(kernels)
        tiles = [value_colours(k[0], scale) for k in kernels]
        colour_bar(draw, canvas, (GRID_WIDTH - 250, 12), 230, scale, signed=True)
    else:
        legend = (
            "each filter as a colour picture (its weights scaled to 0..1): the colours and edges it looks for"
        )
        tiles = [_stretch(k).transpose(1, 2, 0) for k in kernels]
    draw_text(draw, (12, 40), legend, 14, MUTED)
    for i, tile in enumerate(tiles):
        x0, y0 = (i % columns) * cell, header + (i // columns) * cell
        picture = Image.fromarray(np.ascontiguousarray(tile)).resize((size, size), Image.Resampling.NEAREST)
        canvas.paste(picture, (x0 + (cell - size) // 2, y0))
        draw.rectangle(
            (x0 + (cell - size) // 2 - 1, y0 - 1, x0 + (cell + size) // 2, y0 + size), outline=(160, 160, 160)
        )
        draw_text(draw, (x0 + cell // 2, y0 + size + 3), str(i + 1), 12, MUTED, anchor="ma")
    return canvas


# The chapter's layers that hold maps, in order (feature_maps_image draws whichever layers it is given).
MAP_LAYERS = ("input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2")

OUTPUT = "probabilities"  # the last layer: written as text under the maps, not drawn


def feature_maps_image(
    activations, index: int = 0, class_names=None, label=None, title: str = "", descriptions=None, scales=None
) -> Image.Image:
    """What each layer makes of one image: every layer of `activations`, in its order, as it gives them.

    `activations` is `cnnkit.layer_outputs.activations(model, images)` ({layer: (N, ...) array}); `index`
    picks the image; `label` is its true class (optional). Maps (N, C, H, W) are drawn as a grid of C
    numbered tiles (map j is made by filter j); vectors (N, units) as a strip of cells (labelled by class
    when there is one value per class); "probabilities" as the output line. Each layer has one colour scale
    for all its maps (`scales` {layer: value}, default: the largest |value| of the layer over all N
    images, so that figures of the same activations compare), stated on its colour bar. `descriptions`
    {layer: text} defaults to cnnkit.layer_outputs.DESCRIPTIONS. GRID_WIDTH wide.
    """
    from cnnkit.layer_outputs import DESCRIPTIONS

    descriptions = DESCRIPTIONS if descriptions is None else descriptions
    scales = scales or {}
    probabilities = np.asarray(activations[OUTPUT][index])
    names = drawn_names(class_names if class_names is not None else range(len(probabilities)))
    label_width, gap = 330, 2
    content = GRID_WIDTH - label_width - 10
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    blocks = []
    for position, (name, layer) in enumerate(activations.items()):
        if name == OUTPUT:
            continue
        layer = np.asarray(layer)
        values = np.asarray(layer[index], dtype=np.float64)
        picture = position == 0 and values.ndim == 3 and len(values) == 3  # an RGB input: its colours
        signed = bool((layer < 0).any())
        scale = float(scales.get(name) or layer_scale(layer))
        if values.ndim == 3:
            block = _map_block(values, scale, content, gap, picture, first=position == 0)
        else:
            block = _vector_block(values.ravel(), scale, content, names)
        description = descriptions.get(name, "")
        if picture:
            description += "; drawn as a colour picture, stretched to its own range"
        text = wrap_pixels(measure, description, 12, label_width - 30)
        label_h = 24 + 15 * len(text) + (0 if picture else 44)
        blocks.append(
            (name, values.shape, text, signed, scale, picture, block, max(block["height"], label_h))
        )
    header, footer = 74, 84
    height = header + sum(b[-1] + 16 for b in blocks) + footer
    canvas = Image.new("RGB", (GRID_WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    predicted = int(np.argmax(probabilities))
    draw_text(draw, (12, 8), title or "What each layer sees", 20, bold=True)
    verdict = f"the network says {names[predicted]} ({probabilities[predicted]:.1%})"
    if label is not None:
        verdict = f"true class {names[label]}; " + verdict + ("" if label == predicted else "  (wrong)")
    draw_text(draw, (12, 38), verdict, 15, RIGHT if label is None or label == predicted else WRONG)
    y = header
    images = len(next(iter(activations.values())))
    for name, shape, text, signed, scale, picture, block, block_h in blocks:
        draw.line((10, y - 8, GRID_WIDTH - 10, y - 8), fill=(225, 225, 225))
        draw_text(draw, (12, y), name, 16, bold=True)
        size = (
            f"{shape[0]} map{'s' * (shape[0] > 1)} of {shape[1]} x {shape[2]}"
            if len(shape) == 3
            else f"{shape[0]:,} value{'s' * (shape[0] > 1)}"
        )
        draw_text(draw, (12 + draw.textlength(name, font=load_font(16, True)) + 10, y + 1), size, 14)
        for n, row in enumerate(text):
            draw_text(draw, (12, y + 24 + 15 * n), row, 12, MUTED)
        if not picture:
            colour_bar(draw, canvas, (14, y + 28 + 15 * len(text)), 220, scale, signed)
        for tile, (x0, y0), number, size_xy in block["tiles"]:
            canvas.paste(
                Image.fromarray(np.ascontiguousarray(tile)).resize(size_xy, Image.Resampling.NEAREST),
                (label_width + x0, y + y0),
            )
            if number:
                draw_text(draw, (label_width + x0 + size_xy[0] // 2, y + y0 + size_xy[1] + 1), number, 11, MUTED,
                          anchor="ma")  # fmt: skip
        y += block_h + 16
    top3 = np.argsort(-probabilities)[:3]
    draw_text(
        draw,
        (12, y),
        "output: " + ",  ".join(f"{names[i]} {probabilities[i]:.1%}" for i in top3),
        15,
        bold=True,
    )
    over = "this image" if images == 1 else f"the {images:,} images drawn"
    notes = (
        "Colours: black is 0; values above 0 run from purple through orange to pale yellow at the layer's scale, "
        "values below 0 from dark to pale blue.",
        f"One scale per layer, the same for all its maps: its largest |value| over {over}, stated on its bar. "
        "Map j is made by filter j.",
    )
    for n, note in enumerate(notes):
        draw_text(draw, (12, y + 26 + 18 * n), note, 13, MUTED)
    return canvas


def _map_block(maps, scale, content, gap, picture, first) -> dict:
    """The tiles of C maps (C, H, W): (tile RGB or gray, (x, y) in the block, number text, (w, h))."""
    count, h, w = maps.shape
    side = max(h, w)
    zoom = max(1, (112 if first else 48 if count <= 64 else 32) // side)  # more maps: smaller tiles
    tile_w, tile_h = w * zoom, h * zoom
    if side * zoom > 96:  # large images: shrink the tiles
        tile_w, tile_h = max(1, round(w * 96 / side)), max(1, round(h * 96 / side))
    tiles = [_stretch(maps).transpose(1, 2, 0)] if picture else [value_colours(m, scale) for m in maps]
    numbered = len(tiles) > 1
    row_h = tile_h + gap + (14 if numbered else 0)
    per_row = max(1, content // (tile_w + gap))
    if per_row > 16:  # 32 or 64 maps in whole rows
        per_row = 16 * (per_row // 16)
    placed = [
        (
            tile,
            ((i % per_row) * (tile_w + gap), (i // per_row) * row_h),
            str(i + 1) if numbered else "",
            (tile_w, tile_h),
        )
        for i, tile in enumerate(tiles)
    ]
    return {"tiles": placed, "height": math.ceil(len(tiles) / per_row) * row_h}


def _vector_block(values, scale, content, class_names) -> dict:
    """A vector (units,) as a strip of cells, 64 a row; one value per class: larger cells named by class."""
    n = len(values)
    if n == len(class_names) and n <= 12:
        cell_w = min(content // n, 84)
        tile = value_colours(values[None], scale)
        placed = [
            (
                tile[:, i : i + 1],
                (i * cell_w, 0),
                shorten(class_names[i], max(3, cell_w // 7)),
                (cell_w - 2, 24),
            )
            for i in range(n)
        ]
        return {"tiles": placed, "height": 24 + 16}
    per_row = min(n, 64)
    rows = math.ceil(n / per_row)
    cell = max(2, min(content // per_row, 24))
    grid = np.zeros(rows * per_row)
    grid[:n] = values
    tile = value_colours(grid.reshape(rows, per_row), scale)
    if rows * per_row > n:  # cells past the end: the background
        tile.reshape(-1, 3)[n:] = BACKGROUND
    return {"tiles": [(tile, (0, 0), "", (per_row * cell, rows * cell))], "height": rows * cell}


def colour_bar(draw, canvas, xy, width, scale, signed, height=10):
    """The palette from -scale (signed) or 0 to +scale as a bar at xy, its ends and 0 labelled beneath."""
    x, y = xy
    ramp = np.linspace(-scale if signed else 0, scale, width)
    bar = Image.fromarray(np.repeat(value_colours(ramp, scale)[None], height, axis=0))
    canvas.paste(bar, (x, y))
    draw.rectangle((x - 1, y - 1, x + width, y + height), outline=(150, 150, 150))
    labels = [(0, "0")] if not signed else [(0, f"-{scale_text(scale)}"), (width // 2, "0")]
    labels.append((width, f"{'+' if signed else ''}{scale_text(scale)}"))
    for at, text in labels:
        anchor = "la" if at == 0 else "ra" if at == width else "ma"
        draw_text(draw, (x + at, y + height + 3), text, 12, INK, anchor=anchor)


def wrap_pixels(draw, text: str, size: int, width: float) -> list[str]:
    """`text` broken into lines of at most `width` pixels at font `size` (at spaces, or inside a word
    too long for a line)."""
    font = load_font(size)
    lines, current = [], ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current or not lines:
        lines.append(current)
    return lines


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
