"""Fetching files from a list of mirrors into a cache folder, verified against published checksums.

A download streams into a temporary file beside its destination, hashed as it arrives; only when the
whole file arrived and its checksum matched is it fsynced and renamed into place (os.replace). An
interrupted, truncated or corrupt download therefore never leaves a file that could later pass for
a good one, and the temporary file of a killed download is removed at the next start. A file
already in the cache is checked against its checksum each time it is used.

Every download is bounded: no read waits longer than `timeout` seconds, no mirror gets longer than
`deadline` seconds for the whole file, and no more than the file's published size is read.

Checksums are strings "ALGORITHM:HEXDIGEST" with any hashlib algorithm, e.g. "sha256:440fcab...".
"""

import errno
import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from cnnkit.atomic import TEMP_SUFFIX, atomic_write
from cnnkit.errors import DatasetError, FileError

DEFAULT_TIMEOUT = 30.0  # seconds one read may wait for the server
DEFAULT_DEADLINE = 600.0  # seconds one mirror may take for a whole file (MNIST's largest is 10 MB)
_CHUNK = 1 << 16

# Errors that mean the server could not be reached at all: most likely no network.
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}


class DownloadError(DatasetError):
    """No mirror delivered the file with the right checksum.

    `unreachable` is True when no mirror could even be connected to (most likely: no network);
    `timed_out` is True when some mirror was reached but did not answer in time, and none failed
    otherwise (the network or the servers are slow).
    """

    def __init__(self, message: str, unreachable: bool, timed_out: bool = False):
        super().__init__(message)
        self.unreachable = unreachable
        self.timed_out = timed_out


def fetch(
    filename: str,
    checksum: str,
    folder,
    mirrors,
    *,
    size=None,
    progress=None,
    timeout=DEFAULT_TIMEOUT,
    deadline=DEFAULT_DEADLINE,
) -> Path:
    """Return `folder/filename`, downloading it first unless it is there with the right checksum.

    `mirrors` are base URLs (http, https or file) tried in turn; the file's URL is the mirror joined
    with `filename`. A cached file that fails its checksum is deleted and downloaded again.
    `size` is the published length in bytes (None: unknown); `timeout` bounds each read and
    `deadline` each mirror's whole transfer, in seconds.
    `progress`: None draws a progress bar only on a terminal, True always, False never.
    Raises DownloadError when every mirror fails, FileError when `folder` cannot be written.
    """
    path = Path(folder) / filename
    if path.exists():
        if verify_file(path, checksum):
            return path
        path.unlink()
    return download(
        filename,
        checksum,
        folder,
        mirrors,
        size=size,
        progress=progress,
        timeout=timeout,
        deadline=deadline,
    )


def download(
    filename: str,
    checksum: str,
    folder,
    mirrors,
    *,
    size=None,
    progress=None,
    timeout=DEFAULT_TIMEOUT,
    deadline=DEFAULT_DEADLINE,
) -> Path:
    """Download `filename` from the first of `mirrors` that delivers it intact; return its path in `folder`.

    A mirror fails when it cannot be reached, answers with an HTTP error, announces a Content-Length
    other than `size`, sends more than `size` bytes, stops sending for `timeout` seconds, takes longer
    than `deadline` seconds in all, or sends bytes that do not match `checksum`. Stale temporary files
    of killed downloads in `folder` are removed first (see `remove_stale_downloads`).
    """
    folder = Path(folder)
    _parse_checksum(checksum)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileError(f"{folder}: cannot create the cache folder ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK):
        raise FileError(f"{folder}: cannot write to the cache folder (permission denied)")
    remove_stale_downloads(folder, timeout)
    failures, kinds = [], set()
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        started = time.monotonic()
        try:
            response = urllib.request.urlopen(url, timeout=min(timeout, deadline))
        except urllib.error.HTTPError as exc:
            exc.close()
            failures.append(f"{url}: HTTP {exc.code} {exc.reason}")
            kinds.add("failed")
            continue
        except (OSError, http.client.HTTPException, ValueError) as exc:
            kind = _failure_kind(exc)
            failures.append(f"{url}: {_reason(exc, timeout)}")
            kinds.add(kind)
            continue
        try:
            with response:
                return _save(response, folder / filename, checksum, size, progress, started + deadline)
        except _BadDownload as exc:
            failures.append(f"{url}: {exc}")
            kinds.add(exc.kind)
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"{url}: {_reason(exc, timeout)}")
            kinds.add("timeout" if _failure_kind(exc) == "timeout" else "failed")
    if not failures:
        raise DownloadError(f"cannot download {filename}: no mirrors given", unreachable=True)
    summary = "; ".join(failures)
    if kinds == {"unreachable"}:
        raise DownloadError(
            f"cannot download {filename}: no mirror could be reached, no network? ({summary})", True
        )
    if kinds <= {"unreachable", "timeout"}:
        raise DownloadError(
            f"cannot download {filename}: the server did not answer in time; the network or the "
            f"mirrors are slow, try again later ({summary})",
            unreachable=False,
            timed_out=True,
        )
    raise DownloadError(f"cannot download {filename}: {summary}", False)


def remove_stale_downloads(folder, timeout=DEFAULT_TIMEOUT) -> list[Path]:
    """Delete the temporary files of killed downloads in `folder`; returns what went.

    A live download writes its temporary file at least once every `timeout` seconds (or gives up and
    removes it), so one untouched for twice that, and at least a minute, belongs to no live download:
    another process downloading into the same cache keeps its file.
    """
    stale_after = max(2 * timeout, 60.0)
    now = time.time()
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        try:
            if now - tmp.stat().st_mtime > stale_after:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:
            pass  # another process removed it first
    return removed


def verify_file(path, checksum: str) -> bool:
    """True when the file's digest matches `checksum` ("ALGORITHM:HEXDIGEST")."""
    algorithm, expected = _parse_checksum(checksum)
    return file_digest(path, algorithm) == expected


def file_digest(path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


class _BadDownload(Exception):
    def __init__(self, message: str, kind: str = "failed"):
        super().__init__(message)
        self.kind = kind


def _save(response, path: Path, checksum: str, size, progress, deadline_at: float) -> Path:
    algorithm, expected = _parse_checksum(checksum)
    hasher = hashlib.new(algorithm)
    length = response.headers.get("Content-Length")
    announced = int(length) if length and length.isdigit() else None
    if size is not None and announced is not None and announced != size:
        raise _BadDownload(f"announces {announced:,} bytes but the published file has {size:,}")
    total = size if size is not None else announced
    # disable=None: tqdm draws only on a terminal
    bar = tqdm(
        total=total,
        desc=path.name,
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable={None: None, True: False, False: True}[progress],
    )
    # Raising inside atomic_write removes the temporary file and leaves `path` as it was.
    with atomic_write(path) as out, bar:
        received = 0
        while True:
            if time.monotonic() > deadline_at:
                raise _BadDownload(
                    f"did not finish in time ({received:,} of {total or '?':,} bytes arrived)", "timeout"
                )
            # read1 returns what has arrived (a trickle cannot hold one read open for long); asking for
            # one byte past the published size tells an over-long file from a complete one.
            want = _CHUNK if size is None else min(_CHUNK, size - received + 1)
            chunk = response.read1(want)
            if not chunk:
                break
            received += len(chunk)
            if size is not None and received > size:
                raise _BadDownload(f"sent more than the published {size:,} bytes")
            hasher.update(chunk)
            _write(out, chunk, path)
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


def _failure_kind(exc: BaseException) -> str:
    """ "unreachable" (no connection: refused, no route, name not resolved), "timeout", or "failed"."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, socket.gaierror) or getattr(exc, "errno", None) in _UNREACHABLE_ERRNOS:
        return "unreachable"
    return "failed"


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason
        if isinstance(exc, str):
            return exc
    if isinstance(exc, TimeoutError):
        return f"timed out: the server did not answer within {timeout:g} s"
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(text.split()) or type(exc).__name__
