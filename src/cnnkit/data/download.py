"""Fetching files from a list of mirrors into a cache folder, verified against published checksums.

A download streams into a temporary file beside its destination, hashed as it arrives; only when the
whole file arrived and its checksum matched is it fsynced and renamed into place (os.replace). An
interrupted, truncated or corrupt download therefore never leaves a file that could later pass for
a good one. A file already in the cache is checked against its checksum each time it is used.

Checksums are strings "ALGORITHM:HEXDIGEST" with any hashlib algorithm, e.g. "sha256:440fcab...".
"""

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from cnnkit.atomic import atomic_write
from cnnkit.errors import DatasetError, FileError
from cnnkit.progress import ProgressBar

DEFAULT_TIMEOUT = 30.0
_CHUNK = 1 << 16


class DownloadError(DatasetError):
    """No mirror delivered the file with the right checksum.

    `unreachable` is True when no mirror could even be connected to (most likely: no network).
    """

    def __init__(self, message: str, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable


def fetch(filename: str, checksum: str, folder, mirrors, *, progress=None, timeout=DEFAULT_TIMEOUT) -> Path:
    """Return `folder/filename`, downloading it first unless it is there with the right checksum.

    `mirrors` are base URLs (http, https or file) tried in turn; the file's URL is the mirror joined
    with `filename`. A cached file that fails its checksum is deleted and downloaded again.
    `progress`: None draws a progress bar only on a terminal, True always, False never.
    Raises DownloadError when every mirror fails, FileError when `folder` cannot be written.
    """
    path = Path(folder) / filename
    if path.exists():
        if verify_file(path, checksum):
            return path
        path.unlink()
    return download(filename, checksum, folder, mirrors, progress=progress, timeout=timeout)


def download(
    filename: str, checksum: str, folder, mirrors, *, progress=None, timeout=DEFAULT_TIMEOUT
) -> Path:
    """Download `filename` from the first of `mirrors` that delivers it intact; return its path in `folder`."""
    folder = Path(folder)
    _parse_checksum(checksum)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileError(f"{folder}: cannot create the cache folder ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK):
        raise FileError(f"{folder}: cannot write to the cache folder (permission denied)")
    failures, unreachable = [], True
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
            unreachable = False
            continue
        except (OSError, http.client.HTTPException, ValueError) as exc:
            failures.append(f"{url}: {_reason(exc)}")
            continue
        unreachable = False
        try:
            with response:
                return _save(response, folder / filename, checksum, progress)
        except _BadDownload as exc:
            failures.append(f"{url}: {exc}")
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"{url}: {_reason(exc)}")
    if not failures:
        raise DownloadError(f"cannot download {filename}: no mirrors given", unreachable=True)
    summary = "; ".join(failures)
    if unreachable:
        raise DownloadError(
            f"cannot download {filename}: no mirror could be reached, no network? ({summary})", True
        )
    raise DownloadError(f"cannot download {filename}: {summary}", False)


def verify_file(path, checksum: str) -> bool:
    """True when the file's digest matches `checksum` ("ALGORITHM:HEXDIGEST")."""
    algorithm, expected = _parse_checksum(checksum)
    return file_digest(path, algorithm) == expected


def file_digest(path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


class _BadDownload(Exception):
    pass


def _save(response, path: Path, checksum: str, progress) -> Path:
    algorithm, expected = _parse_checksum(checksum)
    hasher = hashlib.new(algorithm)
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    # Raising inside atomic_write removes the temporary file and leaves `path` as it was.
    bar = ProgressBar(total, desc=path.name, unit="MB", scale=1e6, enabled=progress)
    with atomic_write(path) as out, bar:
        received = 0
        while chunk := response.read(_CHUNK):
            hasher.update(chunk)
            _write(out, chunk, path)
            received += len(chunk)
            bar.update(len(chunk))
        if total is not None and received != total:
            raise _BadDownload(f"connection closed after {received:,} of {total:,} bytes")
        if hasher.hexdigest() != expected:
            raise _BadDownload(f"checksum mismatch ({algorithm} {hasher.hexdigest()}, expected {expected})")
    return path


def _write(out, chunk: bytes, path: Path):
    try:
        out.write(chunk)
    except OSError as exc:
        raise FileError(f"{path.parent}: cannot write to the cache folder ({exc.strerror or exc})") from None


def _parse_checksum(checksum: str) -> tuple[str, str]:
    algorithm, _, digest = checksum.partition(":")
    if not digest or algorithm not in hashlib.algorithms_available:
        raise ValueError(f"checksum {checksum!r} is not 'ALGORITHM:HEXDIGEST' with a hashlib algorithm")
    return algorithm, digest.lower()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason
        if isinstance(exc, str):
            return exc
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(text.split()) or type(exc).__name__
