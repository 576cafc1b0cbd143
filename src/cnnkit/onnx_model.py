"""Running an exported model: an .onnx file in onnxruntime, with NumPy and no torch.

`cnnkit export` (cnnkit.export) writes one self-contained file. Its graph takes raw pixels: float32
(N, C, H, W), the values the training images had (0-255 for image files), any N; it standardizes
them with the checkpoint's statistics itself, and returns `logits` and `probabilities` (N, K). Its
metadata_props (`OnnxMetadata`, string keys and values) say what the model is: class names,
preprocessing style, input shape, precision, the cnnkit version and the SHA-256 of the checkpoint it
came from. `load_onnx` opens a file, checks its metadata and its graph's inputs and outputs against
each other, and returns an `OnnxClassifier`; a corrupt or foreign file is one CheckpointError naming
it. This module imports only NumPy, onnxruntime (when a file is loaded) and cnnkit's torch-free
modules, so `cnnkit predict FILE.onnx` and `cnnkit evaluate FILE.onnx` never load PyTorch.
"""

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.data.dataset import MAX_CLASSES, shape_text
from cnnkit.errors import CheckpointError, CnnkitError, one_line
from cnnkit.images import MAX_IMAGE_SIDE, PREPROCESSING

FORMAT = "cnnkit-onnx"
FORMAT_VERSION = 1
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probabilities")
PRECISIONS = ("fp32", "int8")
INSTALL_HINT = 'pip install "cnnkit[onnx]"'
MAX_ONNX_BYTES = 2**31  # protobuf's own limit for one file
# Images per onnxruntime call: as for PyTorch on a CPU, batches of a few hundred beat 1,000 (see the
# README's Export section).
DEFAULT_BATCH = 256


def is_onnx_path(path) -> bool:
    """Whether the command line should treat `path` as an exported model (a name ending in .onnx)."""
    return str(path).lower().endswith(".onnx")


@dataclass(frozen=True)
class OnnxMetadata:
    """What an exported model is, as its metadata_props hold it (one string per key).

    class_names      one name per output, in output order
    preprocessing    how `predict` brings an image file to the input (see cnnkit.images)
    input_shape      (C, H, W) of one image; the batch dimension is free
    precision        "fp32" or "int8" (onnxruntime's static QDQ quantization)
    checkpoint_sha256  SHA-256 of the checkpoint file it was exported from
    cnnkit_version   the cnnkit that exported it
    epoch            epochs the checkpoint had trained
    dataset          the dataset source it was trained on (None: arrays, with ConvNN)
    valid_size       validation images at the end of its training split (for --split valid)
    calibration      int8 only: which images set the activation ranges
    """

    class_names: tuple[str, ...]
    preprocessing: str
    input_shape: tuple[int, int, int]
    precision: str
    checkpoint_sha256: str
    cnnkit_version: str
    epoch: int = 0
    dataset: str | None = None
    valid_size: int = 0
    calibration: str | None = None

    def to_props(self) -> dict[str, str]:
        """The metadata_props of the .onnx file: strings, JSON for lists and numbers."""
        props = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "class_names": json.dumps(list(self.class_names), ensure_ascii=False),
            "preprocessing": self.preprocessing,
            "input_shape": json.dumps(list(self.input_shape)),
            "precision": self.precision,
            "checkpoint_sha256": self.checkpoint_sha256,
            "cnnkit_version": self.cnnkit_version,
            "epoch": str(self.epoch),
            "valid_size": str(self.valid_size),
        }
        if self.dataset is not None:
            props["dataset"] = self.dataset
        if self.calibration is not None:
            props["calibration"] = self.calibration
        return props

    @classmethod
    def from_props(cls, props: dict, path) -> "OnnxMetadata":
        """Validate metadata_props into OnnxMetadata; a CheckpointError names `path` and the key."""
        if props.get("format") != FORMAT:
            raise CheckpointError(
                f"{path}: an ONNX model, but not one exported by cnnkit (no cnnkit metadata); "
                "make one with `cnnkit export`"
            )
        try:
            return _parse(props, str(path))
        except _KeyError as exc:
            raise CheckpointError(f"{path}: ONNX metadata {exc}") from None


class OnnxClassifier:
    """An exported model in an onnxruntime session: raw pixels in, logits and probabilities out."""

    def __init__(self, path: Path, session, metadata: OnnxMetadata):
        self.path = path
        self.session = session
        self.metadata = metadata

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.metadata.class_names

    def predict_logits(self, pixels, batch_size: int | None = None) -> np.ndarray:
        """Logits (N, K) float32 for raw images (N, C, H, W), `batch_size` (default 256) per call."""
        return self._run("logits", pixels, batch_size)

    def predict_proba(self, pixels, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities (N, K), each row summing to 1 (the graph's softmax)."""
        return self._run("probabilities", pixels, batch_size)

    def _run(self, output: str, pixels, batch_size) -> np.ndarray:
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != self.metadata.input_shape:
            raise CnnkitError(
                f"{self.path} takes images of shape N x {shape_text(self.metadata.input_shape)}, "
                f"got {shape_text(pixels.shape)}"
            )
        batch_size = batch_size or DEFAULT_BATCH
        outputs = [
            self.session.run([output], {INPUT_NAME: pixels[start : start + batch_size].astype(np.float32)})[0]
            for start in range(0, len(pixels), batch_size)
        ]
        if not outputs:
            return np.empty((0, len(self.class_names)), np.float32)
        return np.concatenate(outputs)


def load_onnx(path, threads: int | None = None) -> OnnxClassifier:
    """Open an exported model in onnxruntime on the CPU, with `threads` threads (default: its own choice).

    Checks that `path` is a regular file of at most 2 GiB, that onnxruntime can load it, that its
    metadata is cnnkit's (`OnnxMetadata.from_props`) and that its input and outputs fit that
    metadata. Raises CheckpointError naming the file, or CnnkitError naming the extra to install
    when onnxruntime is missing.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a folder, pipe or device cannot be a model)")
    if info.st_size > MAX_ONNX_BYTES:
        raise CheckpointError(
            f"{path}: {info.st_size / 2**30:,.1f} GiB is over the 2 GiB an .onnx file can hold"
        )
    ort = _onnxruntime(path)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, said once by cnnkit
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception classes (InvalidProtobuf, Fail, ...)
        reason = re.sub(
            r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from .* failed:)?", "", one_line(exc)
        )
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({reason.strip().rstrip('.') or 'corrupt'})"
        ) from None
    metadata = OnnxMetadata.from_props(session.get_modelmeta().custom_metadata_map, path)
    _check_signature(session, metadata, path)
    return OnnxClassifier(path, session, metadata)


def _onnxruntime(path):
    try:
        import onnxruntime
    except ImportError:
        raise CnnkitError(f"{path}: running an .onnx model needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


def _check_signature(session, metadata: OnnxMetadata, path):
    """The graph's input is `pixels` float (batch, C, H, W); its outputs are logits and probabilities (batch, K)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected_in = f"one input {INPUT_NAME!r}, float N x {shape_text(metadata.input_shape)}"
    if (
        len(inputs) != 1
        or inputs[0].name != INPUT_NAME
        or inputs[0].type != "tensor(float)"
        or len(inputs[0].shape) != 4
        or tuple(inputs[0].shape[1:]) != metadata.input_shape
    ):
        raise CheckpointError(f"{path}: the graph's inputs do not fit its metadata (expected {expected_in})")
    k = len(metadata.class_names)
    if [o.name for o in outputs] != list(OUTPUT_NAMES) or any(
        len(o.shape) != 2 or o.shape[1] != k for o in outputs
    ):
        raise CheckpointError(
            f"{path}: the graph's outputs do not fit its metadata (expected logits and probabilities, N x {k})"
        )


# --- validation: each check names the key it reads ---


class _KeyError(Exception):
    def __init__(self, key: str, problem: str):
        super().__init__(f"{key} {problem}")


def _parse(props: dict, path: str) -> OnnxMetadata:
    version = _int(props, "format_version", 1)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: exported by a newer cnnkit (ONNX metadata format {version}, this cnnkit reads "
            f"{FORMAT_VERSION}); upgrade cnnkit"
        )
    names = _json(props, "class_names")
    if not (
        isinstance(names, list) and 2 <= len(names) <= MAX_CLASSES and all(isinstance(n, str) for n in names)
    ):
        raise _KeyError("class_names", f"must be a JSON list of 2..{MAX_CLASSES:,} strings")
    preprocessing = _text(props, "preprocessing")
    if preprocessing not in PREPROCESSING:
        raise _KeyError("preprocessing", f"must be one of {', '.join(PREPROCESSING)}, got {preprocessing!r}")
    shape = _json(props, "input_shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
        and shape[0] in (1, 3)
        and all(1 <= v <= MAX_IMAGE_SIDE for v in shape[1:])
    ):
        raise _KeyError(
            "input_shape", f"must be [C, H, W] with 1 or 3 channels and sides 1..{MAX_IMAGE_SIDE}"
        )
    precision = _text(props, "precision")
    if precision not in PRECISIONS:
        raise _KeyError("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    sha = _text(props, "checkpoint_sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _KeyError("checkpoint_sha256", "must be 64 hexadecimal digits")
    dataset = props.get("dataset")
    if dataset is not None and not dataset:
        raise _KeyError("dataset", "must be a dataset source, or absent")
    return OnnxMetadata(
        class_names=tuple(names),
        preprocessing=preprocessing,
        input_shape=tuple(shape),
        precision=precision,
        checkpoint_sha256=sha,
        cnnkit_version=_text(props, "cnnkit_version"),
        epoch=_int(props, "epoch"),
        dataset=dataset,
        valid_size=_int(props, "valid_size"),
        calibration=props.get("calibration"),
    )


def _text(props: dict, key: str) -> str:
    if key not in props:
        raise _KeyError(key, "is missing")
    return props[key]


def _json(props: dict, key: str):
    try:
        return json.loads(_text(props, key))
    except (ValueError, RecursionError):
        raise _KeyError(key, "is not valid JSON") from None


def _int(props: dict, key: str, default: int | None = None) -> int:
    text = props.get(key) if default is not None else _text(props, key)
    if text is None:
        return default
    if not re.fullmatch(r"\d{1,18}", text):
        raise _KeyError(key, f"must be a whole number >= 0, got {text[:40]!r}")
    return int(text)
