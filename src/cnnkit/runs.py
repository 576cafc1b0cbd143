"""A training run on disk: one writer, a checkpoint and history lines each epoch, and resume.

`start_run` trains a new network on a dataset source; `resume_run` continues one from a checkpoint
(the chapter's epoch 20 -> 40). Both hold the run folder's lock (RUN/.lock) while they write, and both
describe the model with one `ModelRecord` (see cnnkit.record). `dataset_for_model` brings a dataset to
a trained model: its input shape, and its labels matched to the model's classes by name.
"""

import contextlib
import csv
import dataclasses
import errno
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnkit import distributed
from cnnkit.atomic import atomic_write, remove_stale_temp_files
from cnnkit.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    prune_checkpoints,
    save_checkpoint,
)
from cnnkit.data import Dataset, Standardization, load_dataset, load_dataset_for_model, resolve_source
from cnnkit.data.budget import MemoryBudget
from cnnkit.data.dataset import shape_text
from cnnkit.device import describe_path, memory_format, resolve_device, resolve_precision
from cnnkit.errors import (
    ArgumentError,
    CheckpointError,
    CnnkitError,
    DatasetError,
    FileError,
    no_dataset_recorded,
)
from cnnkit.kernels import extension
from cnnkit.model import ARCHITECTURES, build_model, summary
from cnnkit.recipes import TrainConfig, default_valid_size, describe_augmentation, for_dataset, with_network
from cnnkit.record import ModelRecord
from cnnkit.training import (
    BestEpoch,
    EarlyStopping,
    EpochLogger,
    TrainingDiverged,
    make_optimizer,
    restore_optimizer,
    train,
)

HISTORY_FILE, METRICS_FILE, LOCK_FILE = "history.jsonl", "metrics.csv", ".lock"
LARGE_WEIGHTS_BYTES = 100 * 2**20


class Interrupted(CnnkitError):
    """Training was stopped by SIGINT or SIGTERM; the message says which checkpoint is on disk."""

    exit_code = 130


@dataclass
class RunResult:
    run_dir: Path
    model: torch.nn.Module
    history: list  # dicts, one per epoch, from epoch 1
    last_checkpoint: Path | None


def default_run_dir(source: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source.split("/")[-1] if ":" in source else source).strip("-")
    return Path("runs") / f"{slug or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def run_folder_lock(run_dir):
    """Hold RUN/.lock (an fcntl lock, so the kernel releases it when the process dies, even by kill -9).

    A second writer gets one CnnkitError naming the holder's pid.
    """
    import fcntl

    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FileError(
            f"{exc.filename or run_dir}: cannot use as a run folder ({exc.strerror or exc})"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise FileError(
                f"{run_dir}: another cnnkit process (pid {holder}) is writing to this run folder; "
                "wait for it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _check_not_in_checkpoints(run_dir: Path):
    """Refuse a run folder in (or inside) another run's `checkpoints` folder, where its files would mix
    with that run's epochs."""
    resolved = run_dir.expanduser().resolve()
    for folder in (resolved, *resolved.parents):
        run = folder.parent
        if folder.name == "checkpoints" and (
            list_checkpoints(run) or (run / HISTORY_FILE).is_file() or (run / LOCK_FILE).is_file()
        ):
            raise FileError(
                f"{run_dir}: inside {folder}, the checkpoints folder of the run {run}; "
                "choose another --out (a run folder of its own, e.g. beside that run)"
            )


def _writer_lock(run_dir):
    """The run folder's lock, held by the one process that writes it: rank 0 of a distributed run."""
    return run_folder_lock(run_dir) if distributed.is_main() else contextlib.nullcontext()


def start_run(
    source: str,
    config: TrainConfig,
    run_dir=None,
    *,
    valid_size=None,
    image_size=None,
    architecture: dict | None = None,
    device="auto",
    log=print,
    show_progress=None,
    overwrite: bool = False,
    dataset_defaults=(),
) -> RunResult:
    """Train a new network on dataset `source` (see cnnkit.data.load_dataset), checkpointing each epoch.

    valid_size: a count, a fraction or 0 (default: the recipe's, see recipes.default_valid_size).
    image_size: (H, W) for sources whose images are resized (folder:). architecture: overrides of
    Architecture's layer sizes (conv_channels, hidden_units, kernel_size), e.g. a tiny network for tests.
    dataset_defaults: settings of `config` that its recipe may choose for the dataset (see
    recipes.for_dataset; the command line passes those the user did not set). A run folder that already holds checkpoints is refused unless `overwrite`, which deletes them.
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(source)
    source = resolve_source(source)
    log = log if distributed.is_main() else _silent
    _check_not_in_checkpoints(run_dir)
    with _writer_lock(run_dir), _interrupted_says("No epoch finished, so no checkpoint was written"):
        existing = list_checkpoints(run_dir)
        if existing and not overwrite:
            raise CheckpointError(
                f"{run_dir}: already holds checkpoints; continue it with --resume {run_dir}, choose another --out, "
                "or pass --overwrite to start it afresh"
            )
        extension.start_loading(log)  # a first build of the C++ kernels overlaps loading the data
        dataset = load_dataset(source, image_size=image_size, splits=("train",), progress=show_progress)
        if dataset.train is None or len(dataset.train) == 0:
            raise DatasetError(f"dataset {source!r} has no training images")
        asked = config
        config = with_network(config, dataset.image_shape[0], dataset_defaults)
        if valid_size is None:
            valid_size = default_valid_size(config.recipe, len(dataset.train))
        dataset = dataset.split_validation(valid_size)
        config = for_dataset(config, dataset.preprocessing, len(dataset.train), dataset_defaults)
        device = resolve_device(device)
        requested = config.precision
        config = dataclasses.replace(config, precision=resolve_precision(requested, device))
        arch = _architecture_for(dataset, config, architecture or {})
        record = ModelRecord(
            architecture=arch,
            class_names=tuple(dataset.class_names),
            standardization=Standardization.fit(dataset.train.images),
            preprocessing=dataset.preprocessing,
            config=config,
            dataset=source,
            valid_size=len(dataset.valid) if dataset.valid is not None else 0,
            test_files=dataset.test_files,
        )
        log(
            f"training on {source}: {len(dataset.train):,} train / {record.valid_size:,} valid images "
            f"{shape_text(arch.input_shape)}, {arch.num_classes} classes; {_network_words(asked, config)}, "
            f"{config.precision} on {device}; run folder {run_dir}"
        )
        log(f"path: {describe_path(requested, config.precision, device)}")
        log(
            f"recipe {config.recipe}: {config.epochs} epochs, batch {config.batch_size}, lr {config.learning_rate:g} "
            f"({config.lr_schedule}), augmentation {describe_augmentation(config)}"
        )
        for note in dataset.notes:
            log(note)
        _log_summary(arch, config.build, log)
        if existing and distributed.is_main():
            prune_checkpoints(run_dir, keep=0)
        model = build_model(arch, config.build, seed=config.seed).to(
            device, memory_format=memory_format(device)
        )
        note = distributed.batch_norm_note(model, device)
        if note:
            log(note)
        optimizer = make_optimizer(model, config.learning_rate, config.optimizer, config.weight_decay)
        return _run(model, optimizer, record, run_dir, dataset, log, show_progress)


def resume_run(
    checkpoint,
    epochs: int | None = None,
    run_dir=None,
    *,
    dataset: str | None = None,
    keep: int | None = None,
    device="auto",
    log=print,
    show_progress=None,
    overwrite: bool = False,
) -> RunResult:
    """Continue training from `checkpoint` (a file or a run folder's newest) up to `epochs` in all.

    The checkpoint's recipe is kept; `keep` (default: the run's own) and `dataset` (default: the one
    recorded; give it when the data moved, or for a ConvNN checkpoint) may change. Writing into a
    folder other than the checkpoint's own that holds checkpoints is refused unless `overwrite`.
    """
    ckpt = load_checkpoint(checkpoint)
    record = ckpt.record
    source_run = ckpt.path.parent.parent
    run_dir = Path(run_dir) if run_dir is not None else source_run
    log = log if distributed.is_main() else _silent
    _check_not_in_checkpoints(run_dir)
    with _writer_lock(run_dir), _interrupted_says(f"No new epoch finished; {ckpt.path} is as it was"):
        newest = list_checkpoints(run_dir)
        own_folder = ckpt.path.parent.resolve() == (run_dir / "checkpoints").resolve()
        if own_folder and newest and newest[-1].resolve() != ckpt.path.resolve():
            raise CheckpointError(
                f"{ckpt.path}: not the newest checkpoint of {run_dir} ({newest[-1].name} is); "
                "resume it into a new run folder with --out DIR"
            )
        if not own_folder and newest and not overwrite:
            raise CheckpointError(
                f"{run_dir}: already holds checkpoints of another run; choose another --out, "
                "or pass --overwrite to replace them"
            )
        planned = record.config.epochs
        epochs = epochs or planned
        if epochs != planned and record.config.lr_schedule == "one-cycle":
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
        config = dataclasses.replace(
            record.config, epochs=epochs, keep=record.config.keep if keep is None else keep
        )
        source = resolve_source(dataset) if dataset else record.dataset
        extension.start_loading(log)
        same = source == record.dataset  # its own folder keeps its test images out of training
        test_files = (record.test_files or ()) if same else None
        data = dataset_for_model(
            record, source, ckpt.path, splits=("train",), test_files=test_files, progress=show_progress
        ).split_validation(record.valid_size)
        model = build_model(record.architecture, record.build)
        model.load_state_dict(ckpt.model_state)
        model = model.to(device, memory_format=memory_format(device))
        optimizer = make_optimizer(model, config.learning_rate, config.optimizer, config.weight_decay)
        restore_optimizer(optimizer, load_optimizer_state(ckpt.path, model, kind=record.config.optimizer))
        record = record.replace(
            config=config, dataset=source, test_files=record.test_files if same else data.test_files
        )
        log(f"resuming {ckpt.path} at epoch {ckpt.epoch + 1} of {epochs}; run folder {run_dir}")
        log(f"path: {describe_path(config.precision, config.precision, device)}")
        if not own_folder and newest and distributed.is_main():
            prune_checkpoints(run_dir, keep=0)
        return _run(model, optimizer, record, run_dir, data, log, show_progress)


def dataset_for_model(record: ModelRecord, source: str | None, checkpoint_path=None, **options) -> Dataset:
    """Dataset `source` as the model of `record` takes it (see cnnkit.data.load_dataset_for_model): folder
    images brought to its input shape, and labels re-indexed to the model's classes by class name.
    `options` (splits, test_files, progress) are load_dataset_for_model's."""
    if source is None:
        raise no_dataset_recorded(checkpoint_path)
    return load_dataset_for_model(source, record.architecture.input_shape, record.class_names, **options)


def to_tensors(split, standardization, device, budget: MemoryBudget | None = None, source: str = "dataset"):
    """A Split as (images, labels) tensors on `device`: images standardized float32 (N, C, H, W).

    The images are standardized a chunk at a time into one tensor in the device's layout, which on the
    CPU is first reserved in `budget` (holding the dataset `source`'s arrays; default: a budget holding
    this split): no second full copy.
    """
    budget = budget or MemoryBudget(held=split.images.nbytes)
    shape = split.images.shape
    if device.type == "cpu":
        what = f"{source}: the {split.name} images standardized as float32 ({shape_text(shape)})"
        budget.reserve(4 * split.images.size, what)
    images = torch.empty(shape, dtype=torch.float32, device=device, memory_format=memory_format(device))
    step = max(1, 2**22 // max(1, split.images[0].size)) if len(split) else 1
    for start in range(0, len(split), step):
        images[start : start + step] = torch.from_numpy(
            standardization.apply(split.images[start : start + step])
        )
    return images, torch.from_numpy(split.labels).to(device, torch.int64)


# --- the run itself ---


class HistoryFiles:
    """Callback: rewrites RUN/history.jsonl and RUN/metrics.csv (Keras's CSVLogger columns) from the run's
    history each epoch. It comes after the Checkpointer, which adds the epoch to the history once its
    checkpoint is saved, so the files never list an epoch whose checkpoint is not on disk; a run that
    starts or resumes writes them afresh from the checkpoint's record."""

    def __init__(self, run_dir, history: list):
        self.run_dir, self.history = Path(run_dir), history
        self.write()

    def on_epoch_end(self, record):
        self.write()

    def write(self):
        # Rewritten whole (and atomically) each epoch: a killed run never leaves half a line.
        with atomic_write(self.run_dir / HISTORY_FILE, "w") as f:
            f.writelines(json.dumps(h, allow_nan=False) + "\n" for h in self.history)
        with atomic_write(self.run_dir / METRICS_FILE, "w") as f:
            writer = csv.writer(f, lineterminator="\n")  # None (no validation) is written as an empty cell
            writer.writerow(["epoch", "loss", "val_loss", "val_accuracy", "lr", "seconds"])
            writer.writerows(
                [
                    h["epoch"],
                    h.get("train_loss"),
                    h.get("valid_loss"),
                    h.get("valid_accuracy"),
                    h.get("learning_rate"),
                    h.get("epoch_seconds"),
                ]
                for h in self.history
            )


class Checkpointer:
    """Callback: saves a checkpoint each epoch, with the record (the epoch added to `history`) and every
    stateful callback's state, then keeps the newest `keep` (0: all) and always the best epoch."""

    def __init__(
        self, run_dir, model, optimizer, record: ModelRecord, history: list, stateful, best: BestEpoch
    ):
        self.run_dir, self.model, self.optimizer = run_dir, model, optimizer
        self.record, self.history, self.stateful, self.best = record, history, stateful, best
        self.last = None

    def on_epoch_end(self, epoch_record):
        self.history.append(epoch_record.to_dict())
        self.record = self.record.replace(
            epoch=epoch_record.epoch,
            history=tuple(self.history),
            trainer_state={cb.name: cb.state_dict() for cb in self.stateful},
        )
        self.last = save_checkpoint(
            checkpoint_path(self.run_dir, epoch_record.epoch), self.model, self.record, self.optimizer
        )
        distributed.report_to_launcher(on_disk=_on_disk(self.last, self.record))
        if self.record.config.keep:
            prune_checkpoints(self.run_dir, self.record.config.keep, spare=self.best.epoch)


def _run(model, optimizer, record: ModelRecord, run_dir, dataset: Dataset, log, show_progress) -> RunResult:
    """Train from the epoch after `record.epoch`, writing a checkpoint and the history after every epoch."""
    config = record.config
    device = next(model.parameters()).device
    main, world = distributed.is_main(), distributed.world_size()
    budget = MemoryBudget(held=dataset.nbytes)  # the float32 copies count beside the dataset's arrays
    train_data = to_tensors(dataset.train, record.standardization, device, budget, dataset.name)
    valid_data = (  # in a distributed run rank 0 validates, and the others wait for it
        to_tensors(dataset.valid, record.standardization, device, budget, dataset.name)
        if dataset.valid is not None and main
        else None
    )
    if world > 1:
        log(f"{world} processes, each training on {config.batch_size // world} images of every batch")
    best, stopping = BestEpoch(), EarlyStopping(config.patience)
    for callback in (best, stopping):
        callback.load_state_dict(record.trainer_state.get(callback.name, {}))
    history = list(record.history)
    checkpointer = Checkpointer(run_dir, model, optimizer, record, history, (best, stopping), best)
    callbacks = []  # ranks other than 0 write nothing
    if main:
        distributed.report_to_launcher(on_disk=_on_disk(None, record))
        remove_stale_temp_files(Path(run_dir) / "checkpoints")
        remove_stale_temp_files(run_dir)
        # In this order: an epoch's checkpoint holds every state, and it is on disk before the history
        # files list the epoch and its line is logged.
        callbacks = [best, checkpointer, HistoryFiles(run_dir, history), EpochLogger(log, config.epochs)]
        if config.patience:
            callbacks.insert(1, stopping)
    try:
        # A first build of the kernels is waited for here, so that no epoch's time counts it.
        extension.finish_loading(
            log, show_progress=(sys.stderr.isatty() if show_progress is None else show_progress)
        )
        train(model, optimizer, train_data, valid_data, config, record.epoch + 1, callbacks, show_progress)
    except TrainingDiverged as exc:
        raise TrainingDiverged(f"{exc}. {_on_disk(checkpointer.last, record, main)}") from None
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted. {_on_disk(checkpointer.last, record, main)}") from None
    except Exception as exc:  # another rank died: say what is on disk
        lost = distributed.peer_lost(exc, _on_disk(checkpointer.last, record, main))
        if lost is None:
            raise
        raise lost from None
    if stopping.reason:
        log(stopping.reason)
    return RunResult(run_dir=Path(run_dir), model=model, history=history, last_checkpoint=checkpointer.last)


@contextlib.contextmanager
def _interrupted_says(what_is_on_disk: str):
    """Ctrl-C or SIGTERM before training began: say so, and what is on disk."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted. {what_is_on_disk}") from None


def _on_disk(last: Path | None, record: ModelRecord, main: bool = True) -> str:
    if not main:
        return "Rank 0 says which checkpoint is on disk"
    if last is not None:
        return f"The newest checkpoint is {last} (the last finished epoch)"
    if record.epoch:
        return f"No new epoch finished; the run is still at epoch {record.epoch}"
    return "No epoch finished, so no checkpoint was written"


def _architecture_for(dataset: Dataset, config: TrainConfig, overrides: dict):
    """The architecture of `config.arch` (resolved) for the dataset's images and classes."""
    if len(dataset.class_names) < 2:
        raise DatasetError(
            f"dataset {dataset.name!r} has {len(dataset.class_names)} class; training needs at least 2"
        )
    kind = ARCHITECTURES[config.arch]
    if config.build not in kind.builds:
        raise ArgumentError(
            f"--build {config.build}: the {config.arch} network has only the {' and '.join(kind.builds)} build"
        )
    try:
        return kind(
            input_shape=dataset.image_shape,
            num_classes=len(dataset.class_names),
            dropout_rate=config.dropout_rate,
            **overrides,
        )
    except ValueError as exc:
        raise DatasetError(f"dataset {dataset.name!r}: {exc}") from None


def _network_words(asked: TrainConfig, config: TrainConfig) -> str:
    """The network and, when cnnkit chose it, why: "network resnet (chosen for color images; --arch
    chapter for the chapter's CNN) with the photos recipe"."""
    words = f"network {config.arch}" + (f" ({config.build} build)" if config.arch == "chapter" else "")
    if asked.arch == "auto":
        other = (
            "--arch chapter for the chapter's CNN" if config.arch == "resnet" else "--arch resnet for photos"
        )
        kind = "color" if config.arch == "resnet" else "grayscale"
        words += f" (chosen for {kind} images; {other})"
    if config.recipe != asked.recipe:
        words += f" with the {config.recipe} recipe"
    return words


def _silent(line: str):
    """The log of ranks other than 0: one rank speaks for a distributed run."""


def _log_summary(arch, build: str, log):
    for line in summary(arch, build).splitlines():
        log(line)
    weights = 4 * arch.num_parameters
    if weights > LARGE_WEIGHTS_BYTES:
        log(
            f"warning: the weights take {weights / 2**20:,.0f} MB per checkpoint (plus twice that of Adam state); "
            "smaller images (--image-size) make a smaller network"
        )
