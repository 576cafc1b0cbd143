"""IDX files, the format of MNIST and Fashion-MNIST (`*-idx3-ubyte` images, `*-idx1-ubyte` labels).

An IDX file is a magic number (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the values in C order. cnnkit reads the unsigned-byte type (0x08), the one
these datasets use. A file may be gzipped; that is detected from its first bytes, not its name.

The header is a promise checked before anything is allocated: at most MAX_ARRAY_BYTES of data, within
the data memory budget (cnnkit.data.budget), and a gzipped file is decompressed as a stream that stops
as soon as it holds more than the header says, so a small file cannot make cnnkit decompress gigabytes.
"""

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from cnnkit.data.budget import MemoryBudget
from cnnkit.data.dataset import MAX_ARRAY_BYTES, MAX_ARRAY_TEXT, shape_text
from cnnkit.errors import FileError, one_line

UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
IMAGES_MAGIC = "00000803"
LABELS_MAGIC = "00000801"
_CHUNK = 1 << 20


def read_idx(path, budget: MemoryBudget | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file, gzipped or raw, into a uint8 array shaped by the file's dimensions.

    An images file (magic 0x00000803) gives (N, H, W), a labels file (0x00000801) gives (N,).
    Raises FileError naming the file when it is missing, not IDX, truncated, longer than its header
    says, or declares more than MAX_ARRAY_BYTES of data; DatasetError when the data does not fit
    `budget` (default: a fresh MemoryBudget), where it is reserved before it is allocated.
    """
    path = Path(path)
    budget = budget if budget is not None else MemoryBudget()
    try:
        with open(path, "rb") as raw:
            if raw.read(2) != GZIP_MAGIC:
                raw.seek(0)
                return _read(raw, path, budget, gzipped=False)
            raw.seek(0)
            try:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _read(stream, path, budget, gzipped=True)
            except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise FileError(f"{path}: corrupt or truncated gzip file ({one_line(exc)})") from None
    except FileNotFoundError:
        raise FileError(f"{path}: does not exist") from None
    except OSError as exc:
        raise FileError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read(f, path: Path, budget: MemoryBudget, gzipped: bool) -> np.ndarray:
    magic = f.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0":
        raise FileError(
            f"{path}: not an IDX file (magic number {magic.hex() or 'missing'}; expected "
            f"{IMAGES_MAGIC} for images or {LABELS_MAGIC} for labels)"
        )
    type_code, ndim = magic[2], magic[3]
    if type_code != UBYTE:
        raise FileError(
            f"{path}: IDX type code 0x{type_code:02x} is not supported; cnnkit reads unsigned bytes (0x08)"
        )
    dims_bytes = f.read(4 * ndim)
    if ndim == 0 or len(dims_bytes) < 4 * ndim:
        raise FileError(f"{path}: IDX header for {ndim} dimensions is incomplete; is the file truncated?")
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    expected = math.prod(dims)
    # An empty array (a zero dimension) still needs a shape NumPy can hold: the other sizes count too.
    declared = max(expected, math.prod(d for d in dims if d))
    shape = " x ".join(map(str, dims))
    if declared > MAX_ARRAY_BYTES:
        raise FileError(
            f"{path}: IDX dimensions {shape} declare {declared:,} bytes, over cnnkit's limit of "
            f"{MAX_ARRAY_TEXT} for one array"
        )
    if not gzipped:  # a raw file's length is known before reading it
        found = path.stat().st_size - 4 - 4 * ndim
        if found != expected:
            hint = "; is the file truncated?" if found < expected else ""
            raise FileError(
                f"{path}: IDX dimensions {shape} need {expected:,} bytes of data but the file has {found:,}{hint}"
            )
    budget.reserve(expected, f"{path}: IDX data ({shape_text(dims)} uint8)")
    data = np.empty(expected, dtype=np.uint8)
    view, found = memoryview(data), 0
    while found < expected and (n := f.readinto(view[found : found + _CHUNK])):
        found += n
    if found < expected:
        raise FileError(
            f"{path}: IDX dimensions {shape} need {expected:,} bytes of data but the file has {found:,}; "
            "is the file truncated?"
        )
    if gzipped and f.read(1):
        raise FileError(
            f"{path}: decompresses to more than the {expected:,} bytes of data its IDX header declares "
            f"({shape}); not a valid IDX file"
        )
    return data.reshape(dims)


def read_idx_pair(
    images_path, labels_path, budget: MemoryBudget | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read an images file and its labels file: (images (N, 1, H, W) uint8, labels (N,) int64).

    Raises FileError when the first is not N x H x W images, the second not N labels, or the counts
    differ; DatasetError when they do not fit `budget` (default: a fresh MemoryBudget).
    """
    budget = budget if budget is not None else MemoryBudget()
    images, labels = read_idx(images_path, budget), read_idx(labels_path, budget)
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
    budget.reserve(8 * len(labels), f"{labels_path}: {len(labels):,} int64 labels")
    labels64 = labels.astype(np.int64)
    budget.release(labels.nbytes)
    return images[:, None], labels64


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
