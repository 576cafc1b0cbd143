"""Reading image files with Pillow, exactly as stored."""

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
        raise FileError(f"{path}: not an image file Pillow can read (PNG, JPEG, BMP, GIF, TIFF, ...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise FileError(f"{path}: cannot read image ({_one_line(exc)}); is the file truncated?") from None


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
