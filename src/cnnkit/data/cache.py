"""Decoded images kept on disk between commands, so that a folder of photos is decoded once.

Each entry is one file in CACHE_DIR/folders (`cache_folder()`: $CNNKIT_CACHE_DIR, else ~/.cache/cnnkit,
as for the compiled kernels), named by the SHA-256 of everything its contents depend on (the caller's
key: for `folder:DIR`, every file's path, size and modification time, the image size and the channels):
`KEY.npy` holds an array (uint8 images, N x C x H x W), `KEY.json` a small JSON object. A changed file
gives another key, so an entry is never stale; entries nobody asks for any more age out.

Entries are written atomically (`cnnkit.atomic.atomic_write`: a temporary file, then a rename), so
two processes writing the same entry at once both leave a complete one, and a reader sees the old
file, the new one or none, never half of one. A reader checks an entry's header and length against
what it expects, and anything else (truncated, corrupt, another shape, unreadable) counts as absent:
the caller decodes again and writes it afresh. Writing is best effort: a full disk or a read-only
cache leaves the command working, uncached.

The folder is bounded: $CNNKIT_CACHE_MB megabytes when set (0 turns the cache off), else the smaller
of DEFAULT_MAX_BYTES and half of the free disk space beside what the cache already holds. After each
write the least recently used entries (reading one touches its modification time) are removed until
the rest fit.
"""

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from cnnkit.atomic import TEMP_SUFFIX, atomic_write
from cnnkit.errors import CnnkitError, DatasetError, positive_number_from_env

CACHE_DIR_ENV = "CNNKIT_CACHE_DIR"
LIMIT_ENV = "CNNKIT_CACHE_MB"
DEFAULT_MAX_BYTES = 4 * 1024**3
MB = 1024**2

# A temporary file older than this was left by a writer that was killed; eviction removes it.
STALE_TEMP_SECONDS = 3600

# The .npy header of an entry is at most this long (NumPy writes 64 to 128 bytes for these arrays).
MAX_HEADER_BYTES = 4096


def cache_folder() -> Path:
    """CACHE_DIR/folders: $CNNKIT_CACHE_DIR/folders, else ~/.cache/cnnkit/folders."""
    root = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "cnnkit"
    return Path(root).expanduser() / "folders"


def cache_limit() -> int:
    """The most bytes the cache may hold: $CNNKIT_CACHE_MB MiB (0: no cache), else
    min(DEFAULT_MAX_BYTES, half of the free space plus what the cache holds). DatasetError for a bad value."""
    with contextlib.suppress(ValueError):
        if float(os.environ.get(LIMIT_ENV, "").strip()) == 0:
            return 0
    value = positive_number_from_env(LIMIT_ENV, "megabytes, e.g. 4096, or 0 for no cache", DatasetError)
    if value is not None:
        return int(value * MB)
    folder = cache_folder()
    try:
        free = shutil.disk_usage(folder if folder.is_dir() else _existing_parent(folder)).free
    except OSError:
        return 0
    return min(DEFAULT_MAX_BYTES, (free + _held_bytes(folder)) // 2)


def enabled() -> bool:
    """Whether the cache is on ($CNNKIT_CACHE_MB is not 0)."""
    return cache_limit() > 0


def key(*parts) -> str:
    """The SHA-256 (hex) of `parts`, each a str, bytes or something with a stable repr (ints, tuples)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogateescape")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def read_images(entry: str, out: np.ndarray) -> bool:
    """Fill `out` (a uint8 array of the expected shape) from entry `entry`.npy; False when the entry is
    absent or does not hold exactly such an array (then `out` is left half-filled: decode into it)."""
    path = cache_folder() / f"{entry}.npy"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                return False
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_HEADER_BYTES)
            if tuple(shape) != out.shape or dtype != out.dtype or fortran or size != f.tell() + out.nbytes:
                return False
            view = memoryview(out.reshape(-1)).cast("B") if out.size else memoryview(b"")
            read = 0
            while read < out.nbytes:  # readinto may return less than asked
                n = f.readinto(view[read:])
                if not n:
                    return False
                read += n
    except (OSError, ValueError, SyntaxError, TypeError, EOFError):
        return False  # absent, unreadable or malformed: decode instead
    _touch(path)
    return True


def write_images(entry: str, images: np.ndarray) -> None:
    """Write `images` as entry `entry`.npy (atomically), then evict the least recently used entries
    over the limit. Does nothing when the cache is off or the array alone is over the limit; a file
    that cannot be written is skipped silently."""
    limit = cache_limit()
    if images.nbytes > limit:
        return
    path = cache_folder() / f"{entry}.npy"
    with contextlib.suppress(CnnkitError, OSError):
        with atomic_write(path) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(images), allow_pickle=False)
        evict(limit)


def read_json(entry: str) -> dict | None:
    """The object in entry `entry`.json, or None when it is absent or not a JSON object."""
    path = cache_folder() / f"{entry}.json"
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read(MAX_HEADER_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    _touch(path)
    return value


def write_json(entry: str, value: dict) -> None:
    """Write `value` (a JSON object) as entry `entry`.json, atomically and best effort."""
    if not enabled():
        return
    data = json.dumps(value, allow_nan=False).encode()
    if len(data) > MAX_HEADER_BYTES:
        return
    with contextlib.suppress(CnnkitError, OSError), atomic_write(cache_folder() / f"{entry}.json") as f:
        f.write(data)


def evict(limit: int | None = None) -> list[Path]:
    """Remove the least recently used entries until the cache holds at most `limit` bytes (default:
    `cache_limit()`), and temporary files older than STALE_TEMP_SECONDS; returns what went. Entries
    another process removes meanwhile are skipped."""
    folder = cache_folder()
    limit = cache_limit() if limit is None else limit
    entries, removed, now = [], [], time.time()
    try:
        listing = list(os.scandir(folder))
    except OSError:
        return removed
    for item in listing:
        try:
            info = item.stat(follow_symlinks=False)
        except OSError:
            continue
        if item.name.endswith(TEMP_SUFFIX):
            if now - info.st_mtime > STALE_TEMP_SECONDS:
                removed.append(Path(item.path))
            continue
        if item.name.endswith((".npy", ".json")) and item.is_file(follow_symlinks=False):
            entries.append((info.st_mtime_ns, info.st_size, Path(item.path)))
    held = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if held <= limit:
            break
        removed.append(path)
        held -= size
    for path in removed:
        with contextlib.suppress(OSError):
            path.unlink()
    return removed


def _touch(path: Path) -> None:
    # The modification time says when an entry was last used: eviction removes the oldest first.
    with contextlib.suppress(OSError):
        os.utime(path)


def _held_bytes(folder: Path) -> int:
    try:
        return sum(item.stat(follow_symlinks=False).st_size for item in os.scandir(folder))
    except OSError:
        return 0


def _existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.is_dir():
            return parent
    return Path("/")
