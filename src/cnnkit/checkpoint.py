"""Checkpoints: safetensors files that hold a model's weights and everything needed to use it alone.

A run folder looks like this:

    RUN/
      history.jsonl                           one JSON object per finished epoch
      checkpoints/
        epoch-003.safetensors                 weights + metadata (JSON in the safetensors header)
        epoch-003.optimizer.safetensors       Adam's state, for resuming

The metadata (`Checkpoint.meta`) holds the build, architecture, class names, standardization,
preprocessing, hyperparameters, dataset, epoch, history and cnnkit version. Loading reads tensors and
JSON only; it never runs code. Every file is written atomically, optimizer first, so the newest
weights file always has its optimizer state beside it.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cnnkit import __version__
from cnnkit.atomic import atomic_write
from cnnkit.device import memory_format
from cnnkit.errors import CheckpointError
from cnnkit.model import Architecture, build_model

FORMAT = "cnnkit-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^epoch-(\d+)\.safetensors$")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the weights file's tensors and metadata."""

    path: Path
    model_state: dict
    meta: dict

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])


def checkpoint_path(run_dir, epoch: int) -> Path:
    """RUN/checkpoints/epoch-NNN.safetensors (zero-padded so names sort by epoch)."""
    return Path(run_dir) / "checkpoints" / f"epoch-{epoch:03d}.safetensors"


def optimizer_path(weights_path) -> Path:
    weights_path = Path(weights_path)
    return weights_path.with_name(weights_path.name.replace(".safetensors", ".optimizer.safetensors"))


def list_checkpoints(run_dir) -> list[Path]:
    """The weights files of a run folder, oldest epoch first."""
    folder = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("epoch-*.safetensors") if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path) -> Path:
    """A checkpoint file as given, or the newest checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(
                f"{path}: run folder has no checkpoints (expected {path}/checkpoints/epoch-NNN.safetensors)"
            )
        return found[-1]
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or run folder")
    return path


def save_checkpoint(
    path, model: torch.nn.Module, meta: dict, optimizer: torch.optim.Optimizer | None = None
) -> Path:
    """Write the model's weights and `meta` to `path` (and the optimizer's state beside it), atomically."""
    path = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "cnnkit_version": __version__, **meta}
    if optimizer is not None:
        tensors, layout = _flatten_optimizer_state(optimizer.state_dict())
        _write(optimizer_path(path), tensors, {"format": FORMAT, "optimizer": json.dumps(layout)})
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _write(path, weights, {"format": FORMAT, "cnnkit": json.dumps(meta)})
    return path


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint file (or a run folder's newest). Raises CheckpointError naming the file."""
    path = resolve_checkpoint(path)
    tensors, header = _read(path)
    if header.get("format") != FORMAT or "cnnkit" not in header:
        raise CheckpointError(f"{path}: a safetensors file, but not a cnnkit checkpoint (no cnnkit metadata)")
    try:
        meta = json.loads(header["cnnkit"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON (corrupt file?)") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta['format_version']} is newer than this cnnkit understands "
            f"({FORMAT_VERSION}); upgrade cnnkit"
        )
    return Checkpoint(path=path, model_state=tensors, meta=meta)


def load_optimizer_state(weights_path, required: bool = True) -> dict | None:
    """The optimizer state dict saved beside a checkpoint; None if absent and not `required`."""
    opt_path = optimizer_path(weights_path)
    if not opt_path.exists():
        if not required:
            return None
        raise CheckpointError(
            f"{opt_path}: optimizer state missing, so training cannot resume from {weights_path}"
        )
    tensors, header = _read(opt_path)
    try:
        return _unflatten_optimizer_state(tensors, json.loads(header["optimizer"]))
    except (KeyError, ValueError):
        raise CheckpointError(f"{opt_path}: not a cnnkit optimizer state file (corrupt?)") from None


def prune_checkpoints(run_dir, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (weights and optimizer files; keep=0 deletes all).

    Returns the weights files that went.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    found = list_checkpoints(run_dir)
    removed = found[:-keep] if keep else found
    for weights in removed:
        optimizer_path(weights).unlink(missing_ok=True)
        weights.unlink(missing_ok=True)
    return removed


def _write(path: Path, tensors: dict, metadata: dict):
    data = save_safetensors(tensors, metadata=metadata)
    with atomic_write(path) as f:
        f.write(data)


def _read(path: Path) -> tuple[dict, dict]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc.strerror})") from None
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, UnicodeDecodeError):
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint (corrupt or truncated)"
        ) from None
    return tensors, header


def _flatten_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict into tensors (for safetensors) and a JSON layout (everything else)."""
    tensors, layout = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for param_id, entries in state_dict["state"].items():
        plain = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                plain[key] = value
        layout["state"][str(param_id)] = plain
    return tensors, layout


def _unflatten_optimizer_state(tensors: dict, layout: dict) -> dict:
    state = {int(pid): dict(plain) for pid, plain in layout["state"].items()}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": layout["param_groups"]}


def load_model(path, device="cpu"):
    """Rebuild the network a checkpoint holds: returns (model in eval mode, Checkpoint).

    Raises CheckpointError when the weights do not fit the architecture the metadata describes.
    """
    ckpt = load_checkpoint(path)
    try:
        arch = Architecture.from_dict(ckpt.meta["architecture"])
        model = build_model(arch, ckpt.meta.get("build", "layers"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{ckpt.path}: checkpoint metadata does not describe a cnnkit network ({exc})"
        ) from None
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError:
        raise CheckpointError(
            f"{ckpt.path}: weights do not fit a {ckpt.meta.get('build', 'layers')} build of {arch} "
            "(a checkpoint of another architecture, or corrupt)"
        ) from None
    return model.to(device, memory_format=memory_format(torch.device(device))).eval(), ckpt
