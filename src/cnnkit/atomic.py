"""Writing files so that a crash at any moment leaves either the old file or the complete new one."""

import contextlib
import os
import tempfile
from pathlib import Path

from cnnkit.errors import FileError

TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside `path`; on a clean exit, flush, fsync and rename it onto `path`.

    If the block raises (or the process dies), `path` is untouched and the temporary file is removed
    (or, after kill -9, left as a `.tmp` file that no reader mistakes for the real one). An OSError
    (a full disk, a read-only folder, a path under a file) becomes a FileError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise FileError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise FileError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
    _fsync_dir(path.parent)


def remove_stale_temp_files(folder) -> list[Path]:
    """Delete temporary files that a killed writer left in `folder`; returns what went."""
    stale = list(Path(folder).glob(f".*{TEMP_SUFFIX}")) if Path(folder).is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path):
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
