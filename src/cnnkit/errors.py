"""The errors cnnkit raises for things a user can fix.

The CLI prints a `CnnkitError` as one line (`cnnkit: error: ...`) and exits with code 2. Each message
names the file or argument at fault and says what was expected.
"""

import math
import os


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's text on one line (whitespace collapsed, at most `limit` characters), to quote in
    a cnnkit message; its type name when it has no text."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class CnnkitError(Exception):
    """Base class: an error caused by input the user controls (a file, an argument, a dataset)."""


class FileError(CnnkitError):
    """A file is missing, unreadable, truncated, or not in the expected format."""


class DatasetError(CnnkitError):
    """A dataset source is unknown, malformed, or cannot be obtained (e.g. no network for a download)."""


class CheckpointError(CnnkitError):
    """A checkpoint is missing, corrupt, or does not fit the model or data it is used with."""


class ArgumentError(CnnkitError, ValueError):
    """An argument has a value that cannot work (an unknown choice, a device that is not there)."""


class DependencyError(CnnkitError):
    """A package a command needs is not installed (onnx, onnxruntime, PyTorch in a deployment)."""


def no_dataset_recorded(checkpoint) -> CheckpointError:
    """The error for a checkpoint of a ConvNN trained on arrays, where a command needs its dataset."""
    return CheckpointError(
        f"{checkpoint}: trained on arrays with ConvNN, so no dataset is recorded; name one with --dataset "
        "(in Python: the dataset argument), or use ConvNN.load(...)"
    )


def positive_number_from_env(name: str, unit: str, error=None) -> float | None:
    """The positive finite number environment variable `name` holds, or None when it is unset or empty;
    anything else raises `error` (default ArgumentError) saying "NAME='...': expected a positive number
    of UNIT"."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise (error or ArgumentError)(f"{name}={text!r}: expected a positive number of {unit}")
    return value
