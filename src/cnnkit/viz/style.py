"""What every picture shares: sizes, colours, text, the matplotlib figure of a size, and saving."""

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont

DPI = 100


# Pixel sizes (width, height) of the matplotlib figures; the image grids are GRID_WIDTH wide.
SIZES = {
    "history": (1500, 450),
    "confusion_matrix": (1500, 700),
    "per_class_accuracy": (1000, 550),
    "projection": (1000, 800),
    "network": (1500, 480),
}


GRID_WIDTH = 1200


# At most this many characters of a class name are drawn (the rest as "…"; report.json holds them
# whole): Pillow refuses a text of a million characters, and matplotlib takes minutes to lay one out.
NAME_CHARS = 40


# Pillow colours
INK, MUTED, BACKGROUND = (20, 20, 20), (100, 100, 100), (255, 255, 255)


# --- The palette: the report, cnnkit.plots and the web page draw with these (serve/static/colours.js
# mirrors them by the same names; tests/test_plots.py checks that the two agree). ---

# Values of a layer, on one scale per layer: 0 is black. Values >= 0 (after ReLU, after pooling) run
# along magma to pale yellow at the scale: a sequential map. Signed values (convolutions before ReLU,
# filters, the standardized input) add a blue ramp of the same lightness for the negative side: a
# diverging map whose positive half is that same magma, so a ReLU map is its convolution's map with the
# blue turned black. Stops are RGB, evenly spaced from 0 to the scale (linear between them).
POSITIVE_STOPS = ((0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164))  # magma
NEGATIVE_STOPS = ((0, 0, 4), (18, 44, 118), (30, 104, 200), (95, 172, 240), (200, 230, 255))

# Lines: the same quantity in the same colour everywhere.
TRAINING = "#e07b00"  # training loss
VALIDATION = "#2b6cb0"  # validation loss
ACCURACY = "#2f855a"  # validation accuracy
LEARNING_RATE = "#6b46c1"

# Right and wrong answers (text, the confusion matrix's diagonal and its errors).
RIGHT_HEX, WRONG_HEX = "#146e28", "#b41e1e"

SHARED_WITH_PAGE = {
    "POSITIVE_STOPS": POSITIVE_STOPS,
    "NEGATIVE_STOPS": NEGATIVE_STOPS,
    "TRAINING": TRAINING,
    "VALIDATION": VALIDATION,
    "ACCURACY": ACCURACY,
    "LEARNING_RATE": LEARNING_RATE,
    "RIGHT": RIGHT_HEX,
    "WRONG": WRONG_HEX,
}


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


WRONG, RIGHT = rgb(WRONG_HEX), rgb(RIGHT_HEX)


def ramp(stops) -> np.ndarray:
    """A (256, 3) uint8 table from `stops`, as colours.js's `ramp` builds it (the same arithmetic)."""
    stops = np.asarray(stops, dtype=np.float64)
    t = np.arange(256) / 255 * (len(stops) - 1)
    k = np.minimum(np.floor(t).astype(int), len(stops) - 2)
    f = (t - k)[:, None]
    return np.clip(np.round(stops[k] + (stops[k + 1] - stops[k]) * f), 0, 255).astype(np.uint8)


POSITIVE_LUT, NEGATIVE_LUT = ramp(POSITIVE_STOPS), ramp(NEGATIVE_STOPS)


def value_colours(values, scale: float) -> np.ndarray:
    """Values (any shape) as RGB uint8 (shape + (3,)) on the palette's scale: |value| / scale (at most 1)
    picks the colour, magma for values >= 0 and blue below 0; black is 0. colours.js's `colour` per value."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    t = np.clip(np.abs(values) / scale, 0, 1) if scale > 0 else np.zeros(values.shape)
    index = np.floor(t * 255 + 0.5).astype(int)  # Math.round
    return np.where((values < 0)[..., None], NEGATIVE_LUT[index], POSITIVE_LUT[index])


def layer_scale(values) -> float:
    """A layer's colour scale: its largest |value| (the page's rule), 1 where all are 0."""
    values = np.abs(np.nan_to_num(np.asarray(values, dtype=np.float64)))
    top = float(values.max()) if values.size else 0.0
    return top if top > 0 else 1.0


def scale_text(value: float) -> str:
    """A scale's end as a figure states it: 3 significant digits."""
    return f"{value:.3g}"


def colormap(signed: bool):
    """The palette as a matplotlib colormap: from -scale to +scale (`signed`), or from 0 to the scale."""
    from matplotlib.colors import ListedColormap

    table = np.concatenate([NEGATIVE_LUT[::-1], POSITIVE_LUT[1:]]) if signed else POSITIVE_LUT
    return ListedColormap(table / 255.0)


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


def sized_figure(name: str, left=0, right=0, top=0, bottom=0):
    """A Figure of SIZES[name] pixels whose subplots leave these margins (pixels) for labels and titles.

    (Fixed margins: matplotlib's constrained layout took a third of the report's drawing time.)
    """
    width, height = SIZES[name]
    fig = plain_figure(width / DPI, height / DPI)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height
    )
    return fig


def names_width(class_names) -> float:
    """About how many pixels the longest class name takes as a tick label (at most 18 characters, 9 pt)."""
    return 7.0 * min(max((len(name) for name in class_names), default=1), 18)


def plain_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI)


def image_figure(image: Image.Image):
    fig = plain_figure(image.width / DPI, image.height / DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.asarray(image), interpolation="nearest")
    ax.set_axis_off()
    return fig


def add_note(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.4")


def percent_text(value) -> str:
    return (
        "-"
        if not np.isfinite(value)
        else f"{value:.1f}%"
        if value < 99.95 or value == 100
        else f"{value:.2f}%"
    )


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def drawn_names(class_names, limit: int = NAME_CHARS) -> list[str]:
    """The class names as a figure draws them: at most `limit` characters each, cut with an ellipsis."""
    return [shorten(str(name), limit) for name in class_names]


def wrap_text(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def numbers_text(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in np.ravel(values)) + "]"


@functools.cache
def load_font(size: int, bold: bool = False):
    """DejaVu Sans (shipped with matplotlib; many scripts), found without importing matplotlib; else Pillow's own."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        path = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf" / name
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def draw_text(draw, xy, text, size, fill=INK, bold=False, anchor=None):
    draw.text(xy, text, font=load_font(size, bold), fill=fill, anchor=anchor)


def clip_text(draw, text: str, size: int, width: float) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    font = load_font(size)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
