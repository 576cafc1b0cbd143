"""Reading image files with Pillow, upright and within a pixel limit, and turning a photo of a digit or an
object into a network's input."""

import contextlib
import io
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from cnnkit.errors import FileError, one_line

# The most pixels cnnkit decodes from one image file. Decoding holds the whole image once or twice
# (4 bytes a pixel as RGBA, plus a converted copy), so reading stays near 400 MB; phone photos have
# 12 to 50 megapixels. Checked from the header, before any pixel is decoded.
MAX_IMAGE_PIXELS = 50_000_000

# The largest side of a network's input that a checkpoint's record or an .onnx file may declare.
MAX_IMAGE_SIDE = 4096

# `load_digit` and `read_image_for_model` decode a larger photo for "digit" or "object" reduced to about this
# many pixels (1400 x 1400): detail enough to find, crop and fit one digit or object into a 28 to 64
# pixel input, and a bounded cost for the float64 steps that follow.
DETAIL_PIXELS = 2_000_000

# Pillow modes that map to uint8 arrays without losing information.
_KEEP_MODES = {"L": 1, "RGB": 3, "RGBA": 4}

# EXIF orientation -> the transposition that makes the image upright, as PIL.ImageOps.exif_transpose does.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)


@dataclass(frozen=True)
class ImageBytes:
    """An image file held in memory (an upload), named `name` in error messages.

    Every function here that reads an image file (`read_image`, `image_shape`, `load_digit`,
    `read_image_for_model`) takes one in place of a path, with the same checks and the same errors.
    """

    data: bytes
    name: str = "image"

    def __str__(self) -> str:
        return self.name


def read_image(path, min_size=None) -> np.ndarray:
    """Read an image file (PNG, JPEG, ...) into a uint8 array of shape (H, W, C), upright.

    C is 1 for grayscale, 3 for RGB and 4 for RGBA, as stored in the file. Palette images become RGB
    (RGBA when the palette has transparency), gray+alpha becomes RGBA, and 16-bit grayscale is scaled
    to 8 bits. An EXIF orientation (a phone photo stored on its side) is applied, so H x W is the
    picture as it is meant to be seen.

    `min_size` (H, W), when given, lets the image be decoded smaller, as long as it stays at least that
    big: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (Pillow's draft mode), and any image at least twice
    as large as needed is reduced by a whole factor (averaging blocks of pixels). Without it the image
    comes exactly as stored.

    Raises FileError naming the file when it is missing, not an image, truncated, or over
    MAX_IMAGE_PIXELS (checked from the header, before decoding).
    """
    return read_image_and_shape(path, min_size)[0]


def read_image_and_shape(path, min_size=None) -> tuple[np.ndarray, tuple[int, int, int]]:
    """`read_image(path, min_size)` and `image_shape(path)` from one opening of the file: the pixels, and
    the full-size (H, W, C) that the header declares (upright), which a reduced decode no longer shows."""
    with _opened(path) as img:
        stored = _orientation(img, decoded=False)
        shape = _stored_shape(img, stored)
        needed = None
        if min_size is not None:
            needed = (int(min_size[0]), int(min_size[1]))
            if stored in _SWAPS_AXES:
                needed = needed[::-1]
            if img.format == "JPEG":
                img.draft(None, (needed[1], needed[0]))
        img.load()
        orientation = _orientation(img, decoded=True)
        img = _keep_mode(img)
        if needed is not None:
            factor = min(img.height // max(needed[0], 1), img.width // max(needed[1], 1))
            if factor >= 2:
                img = _reduce(img, factor)
        if orientation in _UPRIGHT:
            img = img.transpose(_UPRIGHT[orientation])
        array = np.asarray(img, dtype=np.uint8)
    return (array[..., None] if array.ndim == 2 else array), shape


def image_shape(path) -> tuple[int, int, int]:
    """(H, W, C): the shape of the array `read_image(path)` returns, read from the file's header alone.

    No pixel is decoded. Raises FileError as `read_image` does, including for an image over
    MAX_IMAGE_PIXELS.
    """
    with _opened(path) as img:
        return _stored_shape(img, _orientation(img, decoded=False))


def _stored_shape(img: Image.Image, orientation: int) -> tuple[int, int, int]:
    """(H, W, C) of an opened, not yet decoded image with EXIF `orientation` as `read_image` returns it
    at full size."""
    width, height = img.size
    if orientation in _SWAPS_AXES:
        height, width = width, height
    if img.mode in _KEEP_MODES:
        channels = _KEEP_MODES[img.mode]
    elif img.mode in ("1", "I", "I;16", "I;16B", "I;16L"):
        channels = 1
    elif img.mode in ("LA", "La", "PA") or (img.mode == "P" and "transparency" in img.info):
        channels = 4
    else:
        channels = 3
    return height, width, channels


@contextlib.contextmanager
def _opened(path):
    """An opened (not yet decoded) Pillow image within MAX_IMAGE_PIXELS; any failure as a one-line FileError.

    `path` is a file path or an ImageBytes.

    Pillow's own decompression-bomb warning is silenced and its error reworded: cnnkit's limit is lower,
    so both only come up for images cnnkit refuses anyway.
    """
    if isinstance(path, ImageBytes):
        source = io.BytesIO(path.data)
    else:
        source = os.fspath(path)  # not a Path: a folder of photos opens thousands, and each costs
        try:
            mode = os.stat(source).st_mode
        except (OSError, ValueError):
            mode = 0
        if not stat.S_ISREG(mode):  # a FIFO would wait for a writer
            what = "is a directory, not an image file" if stat.S_ISDIR(mode) else "does not exist"
            raise FileError(f"{Path(path)}: {what}")
        path = Path(path) if not isinstance(path, str) else path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise FileError(
                        f"{path}: {width}x{height} = {_megapixels(width * height)} is over "
                        f"cnnkit's limit of {_megapixels(MAX_IMAGE_PIXELS)}"
                    )
                yield img
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = _megapixels(int(found.group(1))) if found else "the image"
        raise FileError(f"{path}: {size} is over cnnkit's limit of {_megapixels(MAX_IMAGE_PIXELS)}") from None
    except UnidentifiedImageError:
        raise FileError(
            f"{path}: not an image file Pillow can read (PNG, JPEG, BMP, GIF, TIFF, ...)"
        ) from None
    except (OSError, SyntaxError, ValueError, MemoryError) as exc:
        raise FileError(f"{path}: cannot read image ({one_line(exc)}); is the file truncated?") from None


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:,.0f} megapixels"


def _orientation(img: Image.Image, decoded: bool) -> int:
    # A PNG keeps its EXIF in an eXIf chunk that may follow the pixels; asking for it before decoding
    # would decode the image, so until then only an eXIf chunk found in the header counts.
    if img.format == "PNG" and "exif" not in img.info and not decoded:
        return 1
    try:
        return int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except (OSError, SyntaxError, ValueError, TypeError):
        return 1  # unreadable EXIF: take the pixels as stored


def load_digit(path, size=28, box=20) -> np.ndarray:
    """Read an image file of one digit and prepare it like MNIST: `prepare_digit(read_image(path))`.

    Returns float32 (size, size) with values 0..255. Raises FileError for an unreadable file and
    ValueError when the image shows no digit.
    """
    return prepare_digit(_read_with_detail(path), size=size, box=box)


def prepare_digit(image: np.ndarray, size: int = 28, box: int = 20) -> np.ndarray:
    """Turn an image of one digit into an MNIST-style digit: bright ink on a black field.

    image: uint8 (H, W, C) as `read_image` returns it (C = 1, 3 or 4), or (H, W) grayscale.
    The steps follow LeCun's MNIST: grayscale (a transparent canvas is background, so a black digit on
    a transparent PNG comes out as a digit); invert when the border is lighter than the ink; cut away
    the background and faint noise (below 20% of the ink's contrast) and crop to the ink; scale to fit a
    box x box square keeping the aspect ratio (Lanczos); paste into a size x size field so the center of
    mass lands on its center (size / 2, size / 2), shifted back where the digit would fall off the edge.

    Returns float32 (size, size), background 0 and the strongest ink 255, like MNIST's raw pixels.
    Raises ValueError when the image has no visible digit (a blank or nearly uniform image).
    """
    if not (_is_int(size) and _is_int(box) and 1 <= box <= size):
        raise ValueError(f"need whole numbers 1 <= box <= size; got size={size!r}, box={box!r}")
    ink = _ink(image, "digit")
    ink[ink < _INK_THRESHOLD] = 0.0
    digit = _fit(_crop(ink, ink), (box, box))
    digit /= digit.max()  # thin strokes shrunk to gray: the strongest ink is 255 again, as in MNIST

    grid_rows, grid_cols = np.indices(digit.shape)
    total = digit.sum()
    center = ((digit * grid_rows).sum() / total, (digit * grid_cols).sum() / total)
    field = np.zeros((size, size), dtype=np.float32)
    height, width = digit.shape
    top, left = (min(max(round(size / 2 - c), 0), size - n) for c, n in zip(center, digit.shape, strict=True))
    field[top : top + height, left : left + width] = digit * 255.0
    return field


def prepare_object(image: np.ndarray, size=(28, 28)) -> np.ndarray:
    """Turn a photo of one object into a Fashion-MNIST-style image: bright object on a black field.

    As Fashion-MNIST was made: grayscale (alpha composited as in `prepare_digit`), inverted when the
    background is light, trimmed to the object (ignoring faint noise, but keeping the object's own
    faint texture), scaled so its longest side fills the field keeping the aspect ratio, centered.
    Returns float32 `size` (H, W), background 0 and the strongest value 255. Raises ValueError when
    the image is blank.
    """
    height, width = (size, size) if _is_int(size) else size
    ink = _ink(image, "object")
    obj = np.clip(_fit(_crop(ink, ink >= _INK_THRESHOLD), (height, width)), 0, 1)
    field = np.zeros((height, width), dtype=np.float32)
    top, left = (height - obj.shape[0]) // 2, (width - obj.shape[1]) // 2
    field[top : top + obj.shape[0], left : left + obj.shape[1]] = obj / max(obj.max(), 1e-12) * 255.0
    return field


def resize_image(image: np.ndarray, size, channels: int) -> np.ndarray:
    """Bring a uint8 image (H, W, C), C 1, 3 or 4, to uint8 (*size, channels) with channels 1 or 3.

    RGBA is composited over white, RGB becomes gray by ITU-R 601-2 luma, gray becomes RGB by
    repetition; resizing is bilinear and does not keep the aspect ratio.
    """
    if image.shape[2] == 4:
        rgb, alpha = image[..., :3].astype(np.float32), image[..., 3:].astype(np.float32) / 255
        image = np.round(rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)
    if channels == 1 and image.shape[2] == 3:
        image = np.asarray(Image.fromarray(image, "RGB").convert("L"))[..., None]
    elif channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[:2] != tuple(size):
        pil = Image.fromarray(image[..., 0] if channels == 1 else image)
        image = np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BILINEAR))
        image = image.reshape(*size, channels)
    return image


PREPROCESSING = ("digit", "object", "resize", "resize-dark")


def prepare_for_model(image: np.ndarray, input_shape, style: str = "digit") -> np.ndarray:
    """Bring a uint8 image (H, W, C) to a network's input: float32 (C, H, W), values 0..255.

    style "digit" prepares it as MNIST's digits were made (`prepare_digit`), "object" as Fashion-MNIST's
    images (`prepare_object`), and "resize" just converts channels and resizes (`resize_image`), as the
    `folder:` dataset source does. "resize-dark" is for gray pictures on a dark background that are not
    fitted to their frame (drawings, small shapes): grayscale, inverted when its background is light,
    resized, nothing cropped. Standardize the result with the checkpoint's statistics.

    Only "digit" and "object" invert (a dark-on-light photo becomes light-on-dark, as those datasets
    are). "resize" never does: the dataset sources choose it only for color images, where inverting
    would turn a red shirt cyan, and for gray images on a light background, which a user's photo on
    paper already matches; gray light-on-dark data always gets "digit" or "object", which invert.
    A dataset that declares "resize" (preprocessing.txt) gets its photos exactly as stored.
    """
    channels, height, width = input_shape
    if style == "digit":
        gray = prepare_digit(image)
        if gray.shape != (height, width):
            gray = np.asarray(Image.fromarray(gray).resize((width, height), Image.Resampling.BILINEAR))
    elif style == "object":
        gray = prepare_object(image, (height, width))
    elif style == "resize":
        return resize_image(image, (height, width), channels).transpose(2, 0, 1).astype(np.float32)
    elif style == "resize-dark":
        gray = _grayscale(np.asarray(image))
        if np.median(_border(gray)) > 127.5:  # dark on light: make it light on dark, as the data is
            gray = 255.0 - gray
        gray = np.asarray(
            Image.fromarray(gray.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
        )
    else:
        raise ValueError(f"style must be one of {', '.join(PREPROCESSING)}, got {style!r}")
    return np.repeat(gray[None], channels, axis=0).astype(np.float32)


def read_image_for_model(path, input_shape, style: str = "digit") -> np.ndarray:
    """Read an image file and bring it to a network's input: `prepare_for_model(read_image(path), ...)`.

    A large photo is decoded reduced (see `read_image`'s `min_size`): to the input's size for "resize",
    as the `folder:` source reads its images, and to about DETAIL_PIXELS for "digit" and "object",
    which crop. Raises FileError naming the file when it cannot be read or shows nothing (blank).
    """
    _, height, width = input_shape
    fits = style in ("resize", "resize-dark")
    image = read_image(path, min_size=(height, width)) if fits else _read_with_detail(path)
    try:
        return prepare_for_model(image, input_shape, style)
    except ValueError as exc:
        raise FileError(f"{path}: {exc}") from None


load_for_model = read_image_for_model  # its old name, kept for code that imports it


def _read_with_detail(path) -> np.ndarray:
    """`read_image(path)`, decoded reduced by a whole factor to about DETAIL_PIXELS when it is larger."""
    height, width, _ = image_shape(path)
    factor = max(1, math.isqrt(height * width // DETAIL_PIXELS))
    return read_image(path, min_size=(height // factor, width // factor))


def _ink(image: np.ndarray, what: str) -> np.ndarray:
    """Gray float64 (H, W) in 0..1: background 0, the strongest ink 1 (inverted if the background is light)."""
    gray = _grayscale(np.asarray(image))
    background = float(np.median(_border(gray)))
    if background > 127.5:  # a light background: make the ink the bright part, as in MNIST
        gray, background = 255.0 - gray, 255.0 - background
    contrast = float(gray.max()) - background
    if contrast < _MIN_CONTRAST:
        raise ValueError(
            f"image has no visible {what} (blank): its strongest ink differs from the background by "
            f"{contrast:.0f} of 255 gray levels"
        )
    return np.clip((gray - background) / contrast, 0.0, 1.0)


def _crop(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`array` cut to the bounding box of `mask`'s nonzero pixels."""
    rows, cols = np.nonzero(mask)
    return array[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _fit(ink: np.ndarray, box) -> np.ndarray:
    """Scale `ink` (values 0..1) to fit inside `box` (H, W) keeping its aspect ratio (Lanczos)."""
    scale = min(box[0] / ink.shape[0], box[1] / ink.shape[1])
    height, width = (min(max(1, round(n * scale)), b) for n, b in zip(ink.shape, box, strict=True))
    source = Image.fromarray(ink.astype(np.float32))
    fitted = np.clip(np.asarray(source.resize((width, height), Image.Resampling.LANCZOS), np.float64), 0, 1)
    if fitted.max() == 0:  # Lanczos's negative lobes cancelled a lone faint stroke; an area average cannot
        fitted = np.asarray(source.resize((width, height), Image.Resampling.BOX), np.float64)
    return fitted


# Ink weaker than this, as a fraction of the strongest ink's contrast, is noise (JPEG artefacts, paper).
_INK_THRESHOLD = 0.2
# Fewer gray levels than this between background and ink: nothing is drawn.
_MIN_CONTRAST = 24.0


def _grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) with C in 1, 2, 3, 4 -> float64 (H, W) gray 0..255, alpha composited away."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"image must have shape (H, W) or (H, W, C) with C in 1..4; got {image.shape}")
    pixels = image.astype(np.float64)
    has_alpha = pixels.shape[2] in (2, 4)
    color = pixels[..., :-1] if has_alpha else pixels
    # ITU-R 601-2 luma, the weights Pillow uses to convert RGB to L
    gray = color[..., 0] if color.shape[2] == 1 else color @ np.array([0.299, 0.587, 0.114])
    if not has_alpha:
        return gray
    alpha = pixels[..., -1] / 255.0
    if np.median(_border(alpha)) < 0.5:
        # A transparent canvas shows whatever lies behind it, which is background: pick one that the
        # (opaque) ink stands out from, e.g. white behind a black digit.
        ink = np.average(gray, weights=alpha) if alpha.sum() > 0 else 0.0
        behind = 255.0 if ink < 127.5 else 0.0
    else:
        # An opaque frame: transparent holes show the same background as the frame.
        behind = np.average(_border(gray), weights=_border(alpha))
    return alpha * gray + (1.0 - alpha) * behind


def _border(array: np.ndarray) -> np.ndarray:
    """The outermost rows and columns of a 2-D array, each pixel once."""
    return (
        np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]]) if len(array) > 1 else array[0]
    )


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _keep_mode(img: Image.Image) -> Image.Image:
    """`img` in mode L, RGB or RGBA, as `read_image` describes."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        top = 65535 if mode.startswith("I;16") or img.getextrema()[1] > 255 else 255
        gray = np.empty((img.height, img.width), dtype=np.uint8)
        for row in range(0, img.height, _STRIP_ROWS):  # in strips: a whole wide copy would be 8 bytes a pixel
            wide = np.asarray(img.crop((0, row, img.width, min(row + _STRIP_ROWS, img.height))), np.int64)
            # round(x * 255 / top) in integers (no ties occur for top 65535 = 255 * 257)
            gray[row : row + _STRIP_ROWS] = (np.clip(wide, 0, top) * 255 + top // 2) // top
        return Image.fromarray(gray, "L")
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in ("LA", "La", "PA"):
        return img.convert("RGBA")
    if mode not in _KEEP_MODES:
        return img.convert("RGB")
    return img


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """`img.reduce(factor)` a strip of rows at a time, since Pillow reduces RGBA through a premultiplied
    copy of the whole image. Strips a multiple of `factor` high give exactly the same pixels."""
    strip = factor * max(1, _STRIP_ROWS // factor)
    reduced = Image.new(img.mode, (-(-img.width // factor), -(-img.height // factor)))
    for row in range(0, img.height, strip):
        part = img.crop((0, row, img.width, min(row + strip, img.height))).reduce(factor)
        reduced.paste(part, (0, row // factor))
    return reduced


_STRIP_ROWS = 256
