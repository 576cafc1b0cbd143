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
    "network": (1500, 340),
}


GRID_WIDTH = 1200


# At most this many characters of a class name are drawn (the rest as "…"; report.json holds them
# whole): Pillow refuses a text of a million characters, and matplotlib takes minutes to lay one out.
NAME_CHARS = 40


# Pillow colours
INK, MUTED, BACKGROUND = (20, 20, 20), (100, 100, 100), (255, 255, 255)


WRONG, RIGHT = (180, 30, 30), (20, 110, 40)


NEGATIVE, POSITIVE = np.array([33, 102, 172]), np.array([178, 24, 43])  # ColorBrewer RdBu ends


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
