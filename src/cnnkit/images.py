"""Reading image files with Pillow, exactly as stored, and turning a photo of a digit into an MNIST digit."""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnkit.errors import FileError

# Pillow modes that map to uint8 arrays without losing information.
_KEEP_MODES = {"L": 1, "RGB": 3, "RGBA": 4}


def read_image(path) -> np.ndarray:
    """Read an image file (PNG, JPEG, ...) into a uint8 array of shape (H, W, C).

    C is 1 for grayscale, 3 for RGB and 4 for RGBA, as stored in the file. Palette images become RGB
    (RGBA when the palette has transparency), gray+alpha becomes RGBA, and 16-bit grayscale is scaled
    to 8 bits.

    Raises FileError naming the file when it is missing, not an image, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an image file" if path.is_dir() else "does not exist"
        raise FileError(f"{path}: {what}")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_array(img)
    except UnidentifiedImageError:
        raise FileError(
            f"{path}: not an image file Pillow can read (PNG, JPEG, BMP, GIF, TIFF, ...)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise FileError(f"{path}: cannot read image ({_one_line(exc)}); is the file truncated?") from None


def load_digit(path, size=28, box=20) -> np.ndarray:
    """Read an image file of one digit and prepare it like MNIST: `prepare_digit(read_image(path))`.

    Returns float32 (size, size) with values 0..255. Raises FileError for an unreadable file and
    ValueError when the image shows no digit.
    """
    return prepare_digit(read_image(path), size=size, box=box)


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


PREPROCESSING = ("digit", "object", "resize")


def prepare_for_model(image: np.ndarray, input_shape, style: str = "digit") -> np.ndarray:
    """Bring a uint8 image (H, W, C) to a network's input: float32 (C, H, W), values 0..255.

    style "digit" prepares it as MNIST's digits were made (`prepare_digit`), "object" as Fashion-MNIST's
    images (`prepare_object`), and "resize" just converts channels and resizes (`resize_image`), as the
    `folder:` dataset source does. Standardize the result with the checkpoint's statistics.
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
    else:
        raise ValueError(f"style must be one of {', '.join(PREPROCESSING)}, got {style!r}")
    return np.repeat(gray[None], channels, axis=0).astype(np.float32)


def load_for_model(path, input_shape, style: str = "digit") -> np.ndarray:
    """Read an image file and bring it to a network's input: `prepare_for_model(read_image(path), ...)`.

    Raises FileError naming the file when it cannot be read or shows nothing (blank).
    """
    image = read_image(path)
    try:
        return prepare_for_model(image, input_shape, style)
    except ValueError as exc:
        raise FileError(f"{path}: {exc}") from None


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


def _to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or wide.max() > 255 else 255.0
        return np.round(np.clip(wide, 0, top) * (255.0 / top)).astype(np.uint8)[..., None]
    if mode == "1":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    elif mode not in _KEEP_MODES:
        img = img.convert("RGB")
    array = np.asarray(img, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
