"""Running an exported model: an .onnx file in onnxruntime, with NumPy and no torch.

`cnnkit export` (cnnkit.export) writes one self-contained file. Its graph takes raw pixels: float32
(N, C, H, W), the values the training images had (0-255 for image files), any N; it standardizes
them with the checkpoint's statistics itself, and returns `logits` and `probabilities` (N, K). Its
metadata_props (`OnnxMetadata`, string keys and values) say what the model is: class names,
preprocessing style, input shape, precision, the cnnkit version and the SHA-256 of the checkpoint it
came from. `load_onnx` reads a file, checks its metadata and its graph with the onnx package before
onnxruntime sees it (`check_graph`: only the operators `cnnkit export` writes, no subgraphs, every
tensor's size bounded), then its inputs and outputs against the metadata, and returns an
`OnnxClassifier`; a corrupt, foreign or hostile file is one CheckpointError naming it. This module
imports only NumPy, onnx and onnxruntime (when a file is loaded) and cnnkit's torch-free modules, so
`cnnkit predict FILE.onnx` and `cnnkit evaluate FILE.onnx` never load PyTorch.
"""

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.data.dataset import MAX_CLASSES, shape_text
from cnnkit.errors import ArgumentError, CheckpointError, DependencyError, one_line
from cnnkit.images import MAX_IMAGE_SIDE, PREPROCESSING

FORMAT = "cnnkit-onnx"
FORMAT_VERSION = 1
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("logits", "probabilities")
PRECISIONS = ("fp32", "int8")
INSTALL_HINT = 'pip install "cnnkit[onnx]"'
MAX_ONNX_BYTES = 2**31  # protobuf's own limit for one file
# The operators `cnnkit export` writes, all in ONNX's default domain (tests/test_hostile_onnx.py checks
# that its exports use exactly these). A graph with any other is refused before onnxruntime reads it:
# a Loop can run for ever, a ConstantOfShape can ask for any size, a custom operator can be anything.
OPERATORS = frozenset(
    {
        *("Sub", "Div"),  # the standardization
        *(
            "Conv",
            "Relu",
            "MaxPool",
            "Reshape",
            "Gemm",
            "Softmax",
        ),  # the network (exported as the layer build)
        "Transpose",  # written by exports of the low-level build before export took the layer build of it
        *(
            "Add",
            "ReduceMean",
        ),  # the ResNet's residual sums and global average (batch norm is folded into Conv)
        *("QuantizeLinear", "DequantizeLinear"),  # int8
    }
)
MAX_ELEMENTS = 2**29  # a tensor that does not grow with the images: 2 GiB of float32, a file's limit
MAX_ELEMENTS_PER_IMAGE = 2**26  # a tensor computed from the images: 256 MiB of float32 for each
_SMALL_TENSOR = 64  # initializers (shapes for Reshape) whose values shape inference reads
# Images per onnxruntime call: as for PyTorch on a CPU, batches of a few hundred beat 1,000 (see
# docs/onnx.md).
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
            raise ArgumentError(
                f"{self.path} takes images of shape N x {shape_text(self.metadata.input_shape)}, "
                f"got {shape_text(pixels.shape)}"
            )
        batch_size = batch_size or DEFAULT_BATCH
        try:
            outputs = [
                self.session.run(
                    [output], {INPUT_NAME: pixels[start : start + batch_size].astype(np.float32)}
                )[0]
                for start in range(0, len(pixels), batch_size)
            ]
        except Exception as exc:  # onnxruntime's own exception classes: what the file asked for failed
            raise CheckpointError(
                f"{self.path}: onnxruntime could not run the model ({one_line(exc)})"
            ) from None
        if not outputs:
            return np.empty((0, len(self.class_names)), np.float32)
        return np.concatenate(outputs)


def load_onnx(path, threads: int | None = None) -> OnnxClassifier:
    """Open an exported model in onnxruntime on the CPU, with `threads` threads (default: its own choice).

    Checks that `path` is a regular file of at most 2 GiB holding an ONNX model, that its metadata is
    cnnkit's (`OnnxMetadata.from_props`) and its graph one that cnnkit's exports could be
    (`check_graph`), all before onnxruntime reads it; then that onnxruntime can load it and that its
    input and outputs fit the metadata. Raises CheckpointError naming the file, or CnnkitError naming
    the extra to install when onnx or onnxruntime is missing.
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
    onnx, ort = _runtime(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError, onnx's own errors
        raise CheckpointError(f"{path}: not a readable ONNX model ({one_line(exc)})") from None
    if not model.HasField("graph"):
        raise CheckpointError(f"{path}: not a readable ONNX model (it holds no graph)")
    metadata = OnnxMetadata.from_props({prop.key: prop.value for prop in model.metadata_props}, path)
    check_graph(model, path)
    del model
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, said once by cnnkit
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])  # the bytes checked
    except Exception as exc:  # onnxruntime's own exception classes (InvalidProtobuf, Fail, ...)
        reason = re.sub(
            r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from .* failed:)?", "", one_line(exc)
        )
        raise CheckpointError(
            f"{path}: not a readable ONNX model ({reason.strip().rstrip('.') or 'corrupt'})"
        ) from None
    _check_signature(session, metadata, path)
    return OnnxClassifier(path, session, metadata)


def _runtime(path):
    """The onnx package (which checks a graph) and onnxruntime (which runs it)."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise DependencyError(
            f"{path}: running an .onnx model needs {exc.name or 'onnx and onnxruntime'}: {INSTALL_HINT}"
        ) from None
    return onnx, onnxruntime


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


# --- the graph: only what `cnnkit export` writes, every tensor of bounded size ---


def check_graph(model, path):
    """Refuse a graph (an onnx ModelProto) that no `cnnkit export` could have written.

    That is: an operator outside OPERATORS, a subgraph, a function of its own, sparse tensors or
    weights in another file, or a tensor of more than MAX_ELEMENTS elements, as the graph declares,
    stores or (by onnx's shape inference) computes it; a tensor that grows with the images must have
    them as its first dimension and at most MAX_ELEMENTS_PER_IMAGE elements for each. Raises
    CheckpointError naming `path` and the operator or tensor.
    """
    from onnx import AttributeProto, TensorProto

    graph = model.graph
    if model.functions:
        raise CheckpointError(
            f"{path}: the model defines functions of its own ({model.functions[0].name}); cnnkit's exports have none"
        )
    if graph.sparse_initializer:
        raise CheckpointError(f"{path}: the graph holds sparse tensors; cnnkit's exports have none")
    for i, node in enumerate(graph.node):
        where = f"node {node.name!r}" if node.name else f"node {i}"
        if any(
            a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) or a.HasField("g") or a.graphs
            for a in node.attribute
        ):
            raise CheckpointError(
                f"{path}: {where} ({node.op_type}) holds a subgraph; cnnkit's exports have none"
            )
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPERATORS:
            operator = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
            raise CheckpointError(
                f"{path}: operator {operator} ({where}) is not one that `cnnkit export` writes; "
                f"cnnkit runs graphs of {', '.join(sorted(OPERATORS))} only"
            )
    for tensor in graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} is kept in another file; cnnkit's exports hold their weights inside"
            )
        _check_size(path, tensor.name, list(tensor.dims), MAX_ELEMENTS)
    for value in (*graph.input, *graph.output, *graph.value_info):
        _check_size(path, value.name, _declared_dims(value, path), MAX_ELEMENTS)
    _check_computed_sizes(model, path)


def _declared_dims(value, path) -> list:
    """The dimensions a graph's input, output or value_info declares: numbers, or names (the batch's)."""
    kind = value.type.WhichOneof("value")
    if kind not in (None, "tensor_type"):
        raise CheckpointError(
            f"{path}: {value.name!r} is a {kind}, not a tensor; cnnkit's exports hold tensors only"
        )
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


def _check_size(path, name: str, dims: list, limit: int, per: str = ""):
    numbers = [d for d in dims if isinstance(d, int)]
    if any(d < 0 for d in numbers):
        raise CheckpointError(
            f"{path}: tensor {name!r} is {shape_text(dims)}: a dimension cannot be negative"
        )
    if math.prod(numbers) > limit:
        raise CheckpointError(
            f"{path}: tensor {name!r} is {shape_text(dims)}, over cnnkit's limit of {limit:,} elements{per}"
        )


def _check_computed_sizes(model, path):
    """Every tensor the nodes compute, as onnx infers it for 1 and for 2 images: of fixed dimensions, or
    the images first and fixed ones after (as in cnnkit's exports), so that the limits bound any batch."""
    one, two = (_inferred_shapes(model, images, path) for images in (1, 2))
    for name in (output for node in model.graph.node for output in node.output if output):
        shape, other = one.get(name), two.get(name)
        if shape is None or other is None:
            raise CheckpointError(
                f"{path}: the size of tensor {name!r} cannot be told from the graph; in cnnkit's exports "
                "every size is known but the number of images"
            )
        if shape == other:
            _check_size(path, name, list(shape), MAX_ELEMENTS)
        elif len(shape) == len(other) > 0 and shape[1:] == other[1:] and (shape[0], other[0]) == (1, 2):
            _check_size(path, name, list(shape), MAX_ELEMENTS_PER_IMAGE, " for one image")
        else:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {shape_text(shape)} for one image and {shape_text(other)} for two; "
                "in cnnkit's exports only the first dimension grows, with the number of images"
            )


def _inferred_shapes(model, images: int, path) -> dict:
    """name -> dimensions (a tuple of numbers, or None where one is unknown) of the tensors of `model`'s
    graph with `images` images in, by onnx's shape inference on a copy whose initializers larger than
    _SMALL_TENSOR are inputs of their shape instead (so that a large file is not copied)."""
    from onnx import ValueInfoProto, helper, shape_inference

    graph = model.graph
    stored = {tensor.name for tensor in graph.initializer}
    inputs = []
    for value in graph.input:
        if value.name not in stored:
            fixed = ValueInfoProto()
            fixed.CopyFrom(value)
            if fixed.type.tensor_type.shape.dim:
                fixed.type.tensor_type.shape.dim[0].dim_value = images
            inputs.append(fixed)
    small = [tensor for tensor in graph.initializer if math.prod(tensor.dims) <= _SMALL_TENSOR]
    inputs += [
        helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        for tensor in graph.initializer
        if math.prod(tensor.dims) > _SMALL_TENSOR
    ]
    outputs = [
        helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, None) for v in graph.output
    ]
    skeleton = helper.make_model(
        helper.make_graph(graph.node, "shapes", inputs, outputs, small),
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
    )
    try:
        inferred = shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True)
    except Exception as exc:  # onnx's InferenceError and ValidationError
        raise CheckpointError(f"{path}: the graph's shapes do not check ({one_line(exc)})") from None
    shapes = {}
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        shapes[value.name] = dims if tensor.HasField("shape") and None not in dims else None
    return shapes


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
