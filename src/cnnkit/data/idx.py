"""IDX files, the format of MNIST and Fashion-MNIST (`*-idx3-ubyte` images, `*-idx1-ubyte` labels).

An IDX file is a magic number (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the values in C order. cnnkit reads the unsigned-byte type (0x08), the one
these datasets use. A file may be gzipped; that is detected from its first bytes, not its name.
"""

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from cnnkit.errors import FileError

UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
IMAGES_MAGIC = "00000803"
LABELS_MAGIC = "00000801"


def read_idx(path) -> np.ndarray:
    """Read an unsigned-byte IDX file, gzipped or raw, into a uint8 array shaped by the file's dimensions.

    An images file (magic 0x00000803) gives (N, H, W), a labels file (0x00000801) gives (N,).
    Raises FileError naming the file when it is missing, not IDX, truncated, or longer than its
    header says.
    """
    path = Path(path)
    data = _read_bytes(path)
    magic = data[:4].hex()
    if len(data) < 4 or data[:2] != b"\0\0":
        raise FileError(
            f"{path}: not an IDX file (magic number {magic or 'missing'}; expected "
            f"{IMAGES_MAGIC} for images or {LABELS_MAGIC} for labels)"
        )
    type_code, ndim = data[2], data[3]
    if type_code != UBYTE:
        raise FileError(
            f"{path}: IDX type code 0x{type_code:02x} is not supported; cnnkit reads unsigned bytes (0x08)"
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise FileError(f"{path}: IDX header for {ndim} dimensions is incomplete; is the file truncated?")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected, found = math.prod(dims), len(data) - header
    if found != expected:
        hint = "; is the file truncated?" if found < expected else ""
        raise FileError(
            f"{path}: IDX dimensions {' x '.join(map(str, dims))} need {expected:,} bytes of data "
            f"but the file has {found:,}{hint}"
        )
    # A copy, so the array is writable and does not keep the file's bytes alive.
    return np.frombuffer(data, np.uint8, count=expected, offset=header).reshape(dims).copy()


def read_idx_pair(images_path, labels_path) -> tuple[np.ndarray, np.ndarray]:
    """Read an images file and its labels file: (images (N, 1, H, W) uint8, labels (N,) int64).

    Raises FileError when the first is not N x H x W images, the second not N labels, or the counts differ.
    """
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise FileError(
            f"{images_path}: expected images (IDX magic {IMAGES_MAGIC}, N x H x W) "
            f"but the file has {images.ndim} dimension(s)"
        )
    if labels.ndim != 1:
        raise FileError(
            f"{labels_path}: expected labels (IDX magic {LABELS_MAGIC}, N) "
            f"but the file has {labels.ndim} dimensions"
        )
    if len(images) != len(labels):
        raise FileError(
            f"{images_path} holds {len(images):,} images but {labels_path} holds {len(labels):,} labels"
        )
    return images[:, None], labels.astype(np.int64)


def write_idx(path, array) -> None:
    """Write a uint8 array as an IDX file; gzipped when `path` ends in ".gz" (reproducibly: no timestamp)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim == 0:
        raise ValueError(
            f"write_idx writes uint8 arrays with at least one dimension, got {array.dtype} {array.shape}"
        )
    data = bytes([0, 0, UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    Path(path).write_bytes(data)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileError(f"{path}: does not exist") from None
    except OSError as exc:
        raise FileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:
        raise FileError(f"{path}: corrupt or truncated gzip file ({exc})") from None
