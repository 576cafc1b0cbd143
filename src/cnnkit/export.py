"""Exporting a trained model to ONNX: one self-contained .onnx file that onnxruntime runs without PyTorch.

The exported graph is `Deployable`: raw pixels (float32, N x C x H x W, any N) -> the checkpoint's
standardization -> the network (either build) -> `logits` and `probabilities`. It is written by
`torch.onnx.export(..., dynamo=True)` (which needs onnxscript) with its weights inside the file, and
its metadata_props come from the checkpoint's record (`export_metadata`; read back by
cnnkit.onnx_model). `--precision int8` quantizes that graph with onnxruntime's static quantization:
QDQ format, weights int8 per output channel, activations uint8 per tensor, their ranges observed
(min/max) on the first CALIBRATION_IMAGES (512) images of the training split of the model's
dataset, the images that `cnnkit evaluate --precision int8` calibrates on too.
"""

import contextlib
import copy
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit import __version__
from cnnkit.atomic import atomic_write
from cnnkit.checkpoint import load_network
from cnnkit.data import Standardization, load_dataset_for_model, resolve_source
from cnnkit.data.download import file_digest
from cnnkit.errors import (
    ArgumentError,
    CheckpointError,
    DatasetError,
    DependencyError,
    no_dataset_recorded,
)
from cnnkit.inference import predict_logits
from cnnkit.layer_outputs import reference_network
from cnnkit.model import StandardizedNetwork
from cnnkit.onnx_model import INPUT_NAME, INSTALL_HINT, OUTPUT_NAMES, OnnxMetadata, is_onnx_path, load_onnx
from cnnkit.recipes import CALIBRATION_IMAGES
from cnnkit.record import ModelRecord

PARITY_IMAGES = 64  # images on which every export is compared with PyTorch


class Deployable(StandardizedNetwork):
    """The graph an export holds: raw pixels (N, C, H, W) -> (logits, probabilities), each (N, K)."""

    def __init__(self, network: nn.Module, standardization: Standardization):
        super().__init__(network, standardization.mean, standardization.std)

    def forward(self, pixels):
        logits = super().forward(pixels)
        return logits, torch.softmax(logits, dim=1)


@dataclass
class ExportResult:
    """What `export_onnx` wrote and measured.

    max_logit_difference  max |logit difference| of the fp32 graph in onnxruntime against PyTorch, on
                          `parity_images` images drawn with the training images' mean and std
    agreement             int8: the fraction of the test split's images given the same label as the
                          fp32 graph (None without a test split or for fp32), on `agreement_images`
    """

    path: Path
    checkpoint: Path
    metadata: OnnxMetadata
    max_logit_difference: float
    parity_images: int
    agreement: float | None = None
    agreement_images: int = 0


def export_metadata(
    record: ModelRecord, checkpoint_sha256: str, precision: str = "fp32", calibration: str | None = None
) -> OnnxMetadata:
    """The metadata an .onnx file carries, derived from the checkpoint's record (the one place that does)."""
    return OnnxMetadata(
        class_names=tuple(record.class_names),
        preprocessing=record.preprocessing,
        input_shape=tuple(record.architecture.input_shape),
        precision=precision,
        checkpoint_sha256=checkpoint_sha256,
        cnnkit_version=__version__,
        epoch=record.epoch,
        dataset=record.dataset,
        valid_size=record.valid_size,
        calibration=calibration,
    )


def export_onnx(
    checkpoint, out, which=None, precision: str = "fp32", dataset: str | None = None
) -> ExportResult:
    """Write the model of `checkpoint` (a file, or a run folder's checkpoint `which`) to `out` (.onnx).

    precision "fp32", or "int8" calibrated on the first CALIBRATION_IMAGES training images of
    `dataset` (a source; default: the one the model was trained on), whose test split then measures
    int8's agreement with fp32. The file is written atomically, then reopened with cnnkit.onnx_model
    (its metadata and graph checked) and compared with PyTorch. Raises CnnkitError naming the problem,
    e.g. weights that are not finite.
    """
    onnx = _require_onnx()
    out = Path(out)
    if not is_onnx_path(out):
        raise ArgumentError(f"{out}: an exported model's name must end in .onnx")
    if precision not in ("fp32", "int8"):
        raise ArgumentError(f"precision must be fp32 or int8, got {precision!r}")
    if dataset is not None and precision != "int8":
        raise ArgumentError("--dataset names int8's calibration images; it applies to --precision int8 only")
    model, ckpt = load_network(checkpoint, which)
    _check_finite(model, ckpt.path)
    record = ckpt.record
    graph = Deployable(_pool_before_relu(reference_network(model)), record.standardization).eval()
    if precision == "int8":
        source = resolve_source(dataset) if dataset else record.dataset
        if source is None:
            raise no_dataset_recorded(ckpt.path)  # int8 calibrates on its training images
        data = load_dataset_for_model(source, record.architecture.input_shape, record.class_names)
        if data.train is None or len(data.train) == 0:
            raise DatasetError(f"dataset {source!r} has no training images to calibrate int8 on")
    sha256 = file_digest(ckpt.path)
    with tempfile.TemporaryDirectory(prefix="cnnkit-export-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        _torch_export(graph, record.architecture.input_shape, fp32_path)
        fp32_bytes = _with_metadata(onnx, fp32_path, export_metadata(record, sha256))
        fp32_path.write_bytes(fp32_bytes)
        exported_bytes = fp32_bytes
        if precision == "int8":
            images = data.train.images[:CALIBRATION_IMAGES]
            calibration = f"the first {len(images):,} training images of {source}"
            int8_path = Path(tmp) / "int8.onnx"
            _quantize_int8(fp32_path, int8_path, images, Path(tmp))
            exported_bytes = _with_metadata(
                onnx, int8_path, export_metadata(record, sha256, "int8", calibration)
            )
        with atomic_write(out) as f:
            f.write(exported_bytes)
        fp32 = load_onnx(fp32_path)
        exported = load_onnx(out)
        pixels = _parity_pixels(record.standardization, record.architecture.input_shape)
        reference = predict_logits(model, record.standardization.apply(pixels)).numpy()
        difference = float(np.abs(fp32.predict_logits(pixels) - reference).max())
        result = ExportResult(out, ckpt.path, exported.metadata, difference, len(pixels))
        if precision == "int8" and data.test is not None and len(data.test) > 0:
            test = data.test.images
            same = exported.predict_logits(test).argmax(1) == fp32.predict_logits(test).argmax(1)
            result.agreement, result.agreement_images = float(same.mean()), len(test)
    return result


def _check_finite(model: nn.Module, path: Path):
    """Refuse weights holding NaN or infinity (a diverged run): their export would answer NaN for every image."""
    for name, tensor in model.state_dict().items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{path}: weight {name} holds NaN or infinite values (did training diverge?); "
                "an export of it would answer NaN for every image, so none was written"
            )


def _require_onnx():
    """The onnx package, after checking that onnxscript and onnxruntime are there too."""
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise DependencyError(
            f"cnnkit export needs {exc.name or 'onnx'} (the onnx extra): {INSTALL_HINT}"
        ) from None
    return onnx


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's and the quantizer's progress lines and notices (a failure still raises)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "root")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _torch_export(graph: nn.Module, input_shape, path: Path):
    # An example batch of 2: torch.export specializes a dimension of size 1 to a constant.
    example = torch.zeros(2, *input_shape)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        program.save(str(path), external_data=False)


def _pool_before_relu(network: nn.Module) -> nn.Module:
    """A copy of `network` in which each ReLU followed by a max-pool in an nn.Sequential runs after it: the
    same values (max and ReLU commute), and it lets onnxruntime keep int8 from a quantized convolution
    through the pooling. With ReLU first, its int8 graph converted the first convolution's whole output
    back to float: 1,000 images on 2 cores of a Xeon with AMX, 16,500 images/s int8 against 24,300
    fp32; pooled first, 26,800 against 23,600 (fp32 unchanged within noise)."""
    network = copy.deepcopy(network)
    for sequential in network.modules():
        if isinstance(sequential, nn.Sequential):
            for i in range(len(sequential) - 1):
                if type(sequential[i]) is nn.ReLU and type(sequential[i + 1]) is nn.MaxPool2d:
                    sequential[i], sequential[i + 1] = sequential[i + 1], sequential[i]
    return network


def _quantize_int8(fp32_path: Path, int8_path: Path, images: np.ndarray, tmp: Path):
    """onnxruntime static quantization (QDQ, per channel) of the fp32 file, calibrated on `images` (raw pixels)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                [{INPUT_NAME: images[i : i + 64].astype(np.float32)} for i in range(0, len(images), 64)]
            )

        def get_next(self):
            return next(self.batches, None)

    prepared = tmp / "prepared.onnx"
    with _quiet():
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(int8_path),
            Batches(),
            quant_format=QuantFormat.QDQ,
            # Conv and the dense products only: with MaxPool and Relu quantized as well, onnxruntime ran
            # the int8 graph slower than the fp32 one (1,000 digits on 2 cores of a Xeon with AMX: 34,700
            # images/s against 40,000-54,000); with these alone, 59,000-60,500 (Conv and ReLU fuse). The
            # softmax stays float.
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )


def _with_metadata(onnx, path: Path, metadata: OnnxMetadata) -> bytes:
    """The .onnx file at `path` with its metadata_props replaced by `metadata`'s, serialized."""
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def _parity_pixels(standardization: Standardization, input_shape) -> np.ndarray:
    """PARITY_IMAGES images of raw pixels with the training images' per-channel mean and std (seeded)."""
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((PARITY_IMAGES, *input_shape)).astype(np.float32)
    mean = np.array(standardization.mean, np.float32)[:, None, None]
    std = np.array(standardization.std, np.float32)[:, None, None]
    return noise * std + mean
