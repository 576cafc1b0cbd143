"""Checkpoints: safetensors files that hold a model's weights and its `ModelRecord`.

A run folder looks like this:

    RUN/
      history.jsonl, metrics.csv              one line per finished epoch
      checkpoints/
        epoch-003.safetensors                 weights + the record (JSON in the safetensors header)
        epoch-003.optimizer.safetensors       Adam's state, for resuming

Reading is bounded and never runs code: only regular files are opened, the header is read first
(at most 16 MB) and the record validated, every tensor's name, dtype and shape is checked against
the network the record describes and the file's length before any tensor is read, and the tensors
are then read one at a time from a memory map and checked against the SHA-256 stored at save.
Every file is written atomically, optimizer first, so the newest weights file always has its
optimizer state beside it.
"""

import hashlib
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from cnnkit.atomic import atomic_write
from cnnkit.device import memory_format
from cnnkit.errors import CheckpointError
from cnnkit.model import StandardizedNetwork, build_model
from cnnkit.record import FORMAT, FORMAT_VERSION, ModelRecord

MAX_HEADER_BYTES = 16 * 2**20
logger = logging.getLogger("cnnkit")
_NAME = re.compile(r"^epoch-(\d+)\.safetensors$")
# The state each optimizer keeps per parameter: a tensor of the parameter's shape, or a scalar ([]).
_OPTIMIZER_STATE = {
    "adam": {"exp_avg": "shape", "exp_avg_sq": "shape", "step": []},
    "sgd": {"momentum_buffer": "shape"},
}


@dataclass
class Checkpoint:
    """A loaded checkpoint: where it is, its record, and its weights (name -> tensor)."""

    path: Path
    record: ModelRecord
    model_state: dict

    @property
    def epoch(self) -> int:
        return self.record.epoch


def checkpoint_path(run_dir, epoch: int) -> Path:
    """RUN/checkpoints/epoch-NNN.safetensors (zero-padded so names sort by epoch)."""
    return Path(run_dir) / "checkpoints" / f"epoch-{epoch:03d}.safetensors"


def optimizer_path(weights_path) -> Path:
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name.replace(".safetensors", ".optimizer.safetensors"))


def list_checkpoints(run_dir) -> list[Path]:
    """The weights files of a run folder, oldest epoch first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.glob("epoch-*.safetensors") if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path, which: str | None = None) -> Path:
    """The checkpoint file meant by `path` and `which` (the CLI's RUN_OR_CHECKPOINT and --checkpoint).

    `path` is a checkpoint file or a run folder. For a run folder, `which` is None or "newest" (the
    newest epoch), "best" (the epoch with the best validation accuracy), or an epoch number "N".
    """
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint file or run folder")
        if which not in (None, "newest"):
            raise CheckpointError(f"{path}: --checkpoint {which} needs a run folder, not a checkpoint file")
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"{path}: run folder has no checkpoints (expected {path}/checkpoints/epoch-NNN.safetensors)"
        )
    if which in (None, "newest"):
        return found[-1]
    if which == "best":
        best = read_record(found[-1]).best_epoch
        if best is None:
            raise CheckpointError(
                f"{path}: trained without a validation split, so no epoch is best; "
                "use --checkpoint N for epoch N, or leave it out for the newest"
            )
        which = str(best)
    if not which.isdigit():
        raise CheckpointError(f"--checkpoint {which!r}: expected best, newest or an epoch number")
    wanted = checkpoint_path(path, int(which))
    if not wanted.is_file():
        kept = ", ".join(str(int(_NAME.match(p.name).group(1))) for p in found)
        raise CheckpointError(f"{wanted}: epoch {int(which)} is not kept in {path} (kept: {kept})")
    return wanted


def save_checkpoint(path, model: torch.nn.Module, record: ModelRecord, optimizer=None) -> Path:
    """Write the model's weights and `record` to `path` (and the optimizer's state beside it), atomically."""
    path = Path(path)
    if optimizer is not None:
        tensors, layout = _flatten_optimizer_state(optimizer.state_dict())
        _write(optimizer_path(path), tensors, {"format": FORMAT, "optimizer": json.dumps(layout)})
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _write(path, weights, {"format": FORMAT, "cnnkit": json.dumps(record.to_dict(), allow_nan=False)})
    return path


def read_record(path) -> ModelRecord:
    """The validated record of a checkpoint file, without reading its tensors."""
    path = Path(path)
    header = _read_header(path)
    return _record_from(path, header)


def load_checkpoint(path, which: str | None = None) -> Checkpoint:
    """Read a checkpoint file (or a run folder's checkpoint `which`, see resolve_checkpoint).

    The weights are checked against the network the record describes and their stored SHA-256.
    Raises CheckpointError naming the file.
    """
    path = resolve_checkpoint(path, which)
    header = _read_header(path)
    record = _record_from(path, header)
    expected = _expected_shapes(record)
    _check_tensors(path, header, expected)
    tensors = _read_tensors(path, header, _format_version(header))
    return Checkpoint(path=path, record=record, model_state=tensors)


def load_model(path, which: str | None = None, device="cpu"):
    """The model a checkpoint holds, ready for images as a dataset stores them: returns (model in eval
    mode, Checkpoint), the model a `cnnkit.model.StandardizedNetwork` (pixels (N, C, H, W) in, logits
    out; its standardization the record's). `which` picks a run folder's checkpoint (best, newest, N)."""
    network, ckpt = load_network(path, which, device)
    std = ckpt.record.standardization
    return StandardizedNetwork(network, std.mean, std.std).to(device).eval(), ckpt


def load_network(path, which: str | None = None, device="cpu"):
    """Rebuild the network a checkpoint holds: returns (network in eval mode, Checkpoint). The network
    takes standardized images (`ckpt.record.standardization.apply`); `load_model` wraps that in."""
    ckpt = load_checkpoint(path, which)
    model = build_model(ckpt.record.architecture, ckpt.record.build)
    model.load_state_dict(ckpt.model_state)
    return model.to(device, memory_format=memory_format(torch.device(device))).eval(), ckpt


def load_optimizer_state(
    weights_path, model: torch.nn.Module, required: bool = True, kind: str = "adam"
) -> dict | None:
    """The optimizer state (`kind` "adam" or "sgd") saved beside a checkpoint, validated against `model`'s
    parameters.

    For Adam every parameter needs `step` (a finite count), `exp_avg` and `exp_avg_sq`; for SGD its
    `momentum_buffer`: float32, the parameter's shape, finite. PyTorch's fused Adam trusts these sizes,
    so nothing else may reach it. The saved hyperparameters are not used (the recipe sets them).
    Returns None if the file is absent and not `required`.
    """
    keys = _OPTIMIZER_STATE[kind]
    opt_path = optimizer_path(weights_path)
    if not opt_path.exists():
        if not required:
            return None
        raise CheckpointError(
            f"{opt_path}: optimizer state missing, so training cannot resume from {weights_path}"
        )
    header = _read_header(opt_path)
    try:
        layout = json.loads(header["__metadata__"]["optimizer"])
        saved = layout["state"]
        if not isinstance(saved, dict):
            raise TypeError
    except (KeyError, TypeError, ValueError, RecursionError):
        raise CheckpointError(f"{opt_path}: not a cnnkit optimizer state file (corrupt?)") from None
    params = list(model.parameters())
    expected = {}
    for i, param in enumerate(params):
        for key, shape in keys.items():
            expected[f"state.{i}.{key}"] = ("F32", list(param.shape) if shape == "shape" else shape)
    if not saved and all(name.startswith("__") for name in header):
        return None  # saved before the first step: nothing to restore
    if set(saved) != {str(i) for i in range(len(params))}:
        raise CheckpointError(
            f"{opt_path}: optimizer state is for {len(saved)} parameters but the network has {len(params)}"
        )
    _check_tensors(opt_path, header, expected)
    tensors = _read_tensors(opt_path, header, _format_version(_read_header(Path(weights_path))))
    state = {}
    for i in range(len(params)):
        entries = {key: tensors[f"state.{i}.{key}"] for key in keys}
        step = float(entries.get("step", 0))
        if not (step >= 0 and step == int(step) and step < 2**53):
            raise CheckpointError(f"{opt_path}: optimizer step count {step} of parameter {i} is not a count")
        if not all(torch.isfinite(entries[k]).all() for k, shape in keys.items() if shape == "shape"):
            raise CheckpointError(f"{opt_path}: optimizer moments of parameter {i} are not finite (corrupt?)")
        state[i] = entries
    return {"state": state}


def prune_checkpoints(run_dir, keep: int, spare: int | None = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints and epoch `spare` (weights and optimizer files;
    keep=0 deletes all). Returns the weights files that went."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    found = list_checkpoints(run_dir)
    removed = [
        p for p in (found[:-keep] if keep else found) if spare is None or p != checkpoint_path(run_dir, spare)
    ]
    for weights in removed:
        optimizer_path(weights).unlink(missing_ok=True)
        weights.unlink(missing_ok=True)
    return removed


def tensors_sha256(tensors: dict) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order (stored at save)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# --- the file format ---


def _write(path: Path, tensors: dict, metadata: dict):
    metadata = {**metadata, "sha256": tensors_sha256(tensors)}
    data = save_safetensors(tensors, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)


def _read_header(path: Path) -> dict:
    """The safetensors header (tensor entries and `__metadata__`) of a regular file, bounded in size."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(
                f"{path}: not a regular file (a folder, pipe or device cannot be a checkpoint)"
            )
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 2 <= length <= info.st_size - 8:
                raise CheckpointError(f"{path}: not a readable safetensors checkpoint (corrupt or truncated)")
            if length > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: checkpoint header of {length / 2**20:,.0f} MB is over cnnkit's limit of "
                    f"{MAX_HEADER_BYTES // 2**20} MB (corrupt, or not a cnnkit checkpoint)"
                )
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (corrupt header)") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (corrupt header)")
    header["__data_start__"] = 8 + length
    header["__file_size__"] = info.st_size
    return header


def _record_from(path: Path, header: dict) -> ModelRecord:
    metadata = header.get("__metadata__", {})
    if metadata.get("format") != FORMAT or "cnnkit" not in metadata:
        if "optimizer" in metadata:
            raise CheckpointError(
                f"{path}: an optimizer state file, not a checkpoint; give the weights file beside it"
            )
        raise CheckpointError(f"{path}: a safetensors file, but not a cnnkit checkpoint (no cnnkit metadata)")
    try:
        meta = json.loads(metadata["cnnkit"])
    except (TypeError, ValueError, RecursionError):
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON (corrupt file?)") from None
    return ModelRecord.from_dict(meta, path)


def _expected_shapes(record: ModelRecord) -> dict:
    """name -> (dtype, shape) of the tensors of the network `record` describes, allocating nothing:
    float32 weights, and the int64 batch counters of batch norm (the ResNet's)."""
    with torch.device("meta"):
        model = build_model(record.architecture, record.build)
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    return {name: (dtypes[t.dtype], list(t.shape)) for name, t in model.state_dict().items()}


_DTYPE_BYTES = {"F32": 4, "I64": 8}


def _check_tensors(path: Path, header: dict, expected: dict):
    """Names, dtypes and shapes as `expected`, and offsets that tile the file's data exactly."""
    entries = {k: v for k, v in header.items() if not k.startswith("__")}
    missing, extra = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or extra:
        what = f"lacks {', '.join(missing[:3])}" if missing else f"has unexpected {', '.join(extra[:3])}"
        raise CheckpointError(f"{path}: tensors do not fit the network its metadata describes ({what})")
    spans = []
    for name, (dtype, shape) in expected.items():
        entry = entries[name]
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != shape:
            raise CheckpointError(
                f"{path}: tensor {name} is {entry.get('dtype') if isinstance(entry, dict) else '?'} "
                f"{entry.get('shape') if isinstance(entry, dict) else '?'}, expected {dtype} {shape}"
            )
        size = _DTYPE_BYTES[dtype] * math.prod(shape)
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] - offsets[0] == size):
            raise CheckpointError(f"{path}: tensor {name} has corrupt data offsets")
        spans.append(tuple(offsets))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise CheckpointError(f"{path}: tensor data overlaps or has gaps (corrupt file)")
        end = stop
    if header["__data_start__"] + end != header["__file_size__"]:
        raise CheckpointError(
            f"{path}: file is {header['__file_size__']:,} bytes but its tensors need "
            f"{header['__data_start__'] + end:,} (truncated or corrupt)"
        )


def _format_version(weights_header: dict) -> int:
    """The checkpoint format a weights file was written in (its record's format_version; 1 where it has none)."""
    try:
        version = json.loads(weights_header["__metadata__"]["cnnkit"]).get("format_version", 1)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
        return FORMAT_VERSION  # not a record cnnkit read: held to the current format
    return version if isinstance(version, int) else FORMAT_VERSION


def _read_tensors(path: Path, header: dict, format_version: int) -> dict:
    """The tensors of a file of a checkpoint of format `format_version`, checked against their stored SHA-256.

    Every file of format 2 on was written with one, so a file without it is refused; format 1 (cnnkit
    0.1.0) had none, and its files load with a notice on the "cnnkit" logger.
    """
    stored = header.get("__metadata__", {}).get("sha256")
    if stored is None and format_version >= 2:
        raise CheckpointError(
            f"{path}: no SHA-256 of its tensors, which every checkpoint of format {format_version} carries "
            "(the file was altered or damaged)"
        )
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read tensors ({' '.join(str(exc).split())})") from None
    if stored is None:
        logger.warning(
            "%s: written by cnnkit 0.1.0 (checkpoint format 1) without a SHA-256 of its tensors; loaded unchecked",
            path,
        )
    elif tensors_sha256(tensors) != stored:
        raise CheckpointError(f"{path}: tensor data does not match its SHA-256 (the file is corrupt)")
    return tensors


def _flatten_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and a JSON layout (everything else)."""
    tensors, layout = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for param_id, entries in state_dict["state"].items():
        plain = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
            else:
                plain[key] = value
        layout["state"][str(param_id)] = plain
    return tensors, layout
