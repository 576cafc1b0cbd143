"""A training run on disk: data prepared once, a checkpoint and a history line per epoch, and resume.

`start_run` trains a new network on a dataset source; `resume_run` continues one from a checkpoint
(the chapter's epoch 20 -> 40). Both write into a run folder (see cnnkit.checkpoint for its layout).
"""

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnkit.atomic import atomic_write, remove_stale_temp_files
from cnnkit.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    prune_checkpoints,
    save_checkpoint,
)
from cnnkit.data import Dataset, Standardization, load_dataset
from cnnkit.device import memory_format, resolve_device, resolve_precision
from cnnkit.errors import CheckpointError
from cnnkit.model import Architecture, build_model
from cnnkit.recipes import TrainConfig
from cnnkit.training import make_optimizer, restore_optimizer, train

# How `cnnkit predict` should bring a user's image file to a model's input (see cnnkit.images).
_PREPROCESSING = {"mnist": "digit", "mnist-5k": "digit", "fashion-mnist": "object"}


@dataclass
class RunResult:
    run_dir: Path
    model: torch.nn.Module
    history: list  # dicts, one per epoch, from epoch 1
    last_checkpoint: Path | None


def default_run_dir(source: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source.split("/")[-1] if ":" in source else source).strip("-")
    return Path("runs") / f"{slug or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def preprocessing_for(source: str, image_shape) -> str:
    """The image preparation that matches how a dataset's images were made."""
    if source in _PREPROCESSING:
        return _PREPROCESSING[source]
    return "digit" if tuple(image_shape) == (1, 28, 28) and not source.startswith("folder:") else "resize"


def load_dataset_for(source: str, input_shape, checkpoint_path) -> Dataset:
    """Dataset `source` as a checkpoint's network takes it: `folder:` images brought to its input shape."""
    if source == "arrays":
        raise CheckpointError(
            f"{checkpoint_path}: trained on arrays with ConvNN, so no dataset is recorded; use "
            "ConvNN.load(...) in Python, or name one with --dataset"
        )
    if source.startswith("folder:"):  # bring the images to the network's input, as training did
        return load_dataset(source, image_size=tuple(input_shape[1:]), channels=input_shape[0])
    return load_dataset(source)


def to_tensors(split, standardization, device):
    """A Split as (images, labels) tensors on `device`: images standardized float32 (N, C, H, W)."""
    images = torch.from_numpy(standardization.apply(split.images))
    images = images.to(device).contiguous(memory_format=memory_format(device))
    return images, torch.from_numpy(split.labels).to(device, torch.int64)


def start_run(
    source: str,
    config: TrainConfig,
    run_dir=None,
    valid_size=None,
    device="auto",
    keep: int = 0,
    log=print,
    show_progress=None,
    overwrite: bool = False,
) -> RunResult:
    """Train a new network on dataset `source` (see cnnkit.data.load_dataset), checkpointing each epoch.

    A run folder that already holds checkpoints is refused unless `overwrite`, which deletes them.
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(source)
    existing = list_checkpoints(run_dir)
    if existing and not overwrite:
        raise CheckpointError(
            f"{run_dir}: already holds checkpoints; continue it with --resume {run_dir}, choose another --out, "
            "or pass --overwrite to start it afresh"
        )
    dataset = load_dataset(source).split_validation(valid_size)
    if dataset.train is None or len(dataset.train) == 0:
        raise CheckpointError(f"dataset {source!r} has no training images")
    device = resolve_device(device)
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))
    arch = Architecture(
        input_shape=dataset.image_shape,
        num_classes=len(dataset.class_names),
        dropout_rate=config.dropout_rate,
    )
    standardization = Standardization.fit(dataset.train.images)
    model = build_model(arch, config.build, seed=config.seed).to(device, memory_format=memory_format(device))
    optimizer = make_optimizer(model, config.learning_rate)
    meta = {
        "build": config.build,
        "architecture": arch.to_dict(),
        "class_names": list(dataset.class_names),
        "standardization": standardization.to_dict(),
        "preprocessing": preprocessing_for(source, dataset.image_shape),
        "dataset": source,
        "valid_size": len(dataset.valid) if dataset.valid is not None else 0,
        "hyperparameters": config.to_dict(),
    }
    log(
        f"training on {source}: {len(dataset.train):,} train / {meta['valid_size']:,} valid images "
        f"{arch.input_shape}, {arch.num_classes} classes; {config.build} build, {config.precision} on {device}; "
        f"run folder {run_dir}"
    )
    if existing:
        prune_checkpoints(run_dir, keep=0)
    return _run(
        model,
        optimizer,
        config,
        meta,
        run_dir,
        dataset,
        standardization,
        start_epoch=1,
        history=[],
        keep=keep,
        log=log,
        show_progress=show_progress,
    )


def resume_run(
    checkpoint,
    epochs: int | None = None,
    run_dir=None,
    device="auto",
    keep: int = 0,
    log=print,
    show_progress=None,
):
    """Continue training from `checkpoint` (a file or a run folder's newest) up to `epochs` in all."""
    ckpt = load_checkpoint(checkpoint)
    meta = ckpt.meta
    source_run = ckpt.path.parent.parent
    run_dir = Path(run_dir) if run_dir is not None else source_run
    newest = list_checkpoints(run_dir)
    if run_dir.resolve() == source_run.resolve() and newest and newest[-1].resolve() != ckpt.path.resolve():
        raise CheckpointError(
            f"{ckpt.path}: not the newest checkpoint of {run_dir} ({newest[-1].name} is); "
            "resume it into a new run folder with --out DIR"
        )
    planned = meta["hyperparameters"]["epochs"]
    epochs = epochs or planned
    if epochs != planned and meta["hyperparameters"].get("lr_schedule") == "one-cycle":
        raise CheckpointError(
            f"{ckpt.path}: a one-cycle run's schedule ends at epoch {planned}; it can be resumed "
            f"to finish it, not extended to {epochs}"
        )
    if epochs <= ckpt.epoch:
        raise CheckpointError(
            f"{ckpt.path}: already at epoch {ckpt.epoch}"
            + (
                f", the run's planned last; pass --epochs N with N > {ckpt.epoch}"
                if epochs == planned
                else f"; --epochs {epochs} must be more than that"
            )
        )
    device = resolve_device(device)
    config = TrainConfig(**{**meta["hyperparameters"], "epochs": epochs})
    arch = Architecture.from_dict(meta["architecture"])
    dataset = load_dataset_for(meta["dataset"], arch.input_shape, ckpt.path).split_validation(
        meta["valid_size"]
    )
    standardization = Standardization.from_dict(meta["standardization"])
    model = build_model(arch, meta["build"]).to(device, memory_format=memory_format(device))
    model.load_state_dict(ckpt.model_state)
    optimizer = make_optimizer(model, config.learning_rate)
    restore_optimizer(optimizer, load_optimizer_state(ckpt.path))
    history = list(meta["history"])
    log(f"resuming {ckpt.path} at epoch {ckpt.epoch + 1} of {epochs}; run folder {run_dir}")
    meta = {k: v for k, v in meta.items() if k not in ("epoch", "history", "format", "format_version")}
    meta["hyperparameters"] = config.to_dict()
    return _run(
        model,
        optimizer,
        config,
        meta,
        run_dir,
        dataset,
        standardization,
        start_epoch=ckpt.epoch + 1,
        history=history,
        keep=keep,
        log=log,
        show_progress=show_progress,
    )


def _run(
    model,
    optimizer,
    config,
    meta,
    run_dir,
    dataset,
    standardization,
    start_epoch,
    history,
    keep,
    log,
    show_progress,
) -> RunResult:
    """Train from `start_epoch`, writing a checkpoint and the history after every epoch."""
    device = next(model.parameters()).device
    train_data = to_tensors(dataset.train, standardization, device)
    valid_data = to_tensors(dataset.valid, standardization, device) if dataset.valid is not None else None
    remove_stale_temp_files(Path(run_dir) / "checkpoints")
    _write_history(run_dir, history)
    last = None

    def on_epoch_end(record):
        nonlocal last
        history.append(record.to_dict())
        last = save_checkpoint(
            checkpoint_path(run_dir, record.epoch),
            model,
            {**meta, "epoch": record.epoch, "history": history},
            optimizer,
        )
        _write_history(run_dir, history)
        if keep:
            prune_checkpoints(run_dir, keep)

    train(model, optimizer, train_data, valid_data, config, start_epoch, on_epoch_end, log, show_progress)
    return RunResult(run_dir=Path(run_dir), model=model, history=history, last_checkpoint=last)


def _write_history(run_dir, history):
    # Rewritten whole (and atomically) each epoch: a killed run never leaves half a line.
    with atomic_write(Path(run_dir) / "history.jsonl", "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
