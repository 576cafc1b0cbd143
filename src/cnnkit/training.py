"""The training loop: plain code you can read, one epoch at a time, with callbacks at each epoch's end.

Everything random is derived from (seed, epoch): the mini-batch order and the dropout masks of epoch k
depend on nothing else, so a run resumed from a checkpoint of epoch k-1 (weights, Adam's state and the
callbacks' state) continues exactly as if it had never stopped.

Under torchrun (see cnnkit.distributed) the same loop runs on every rank: the network is wrapped in
DDP, each rank takes its slice of every global mini-batch of epoch k's (seed, k) order and draws its
dropout masks and augmentations from (seed, k, rank), and only rank 0 validates and calls the callbacks.

A callback is any object with `on_epoch_end(record) -> bool | None`; returning True stops training
after that epoch. Callbacks with state to carry across a resume also have a `name`, `state_dict()`
and `load_state_dict(d)`. `EarlyStopping`, `BestEpoch` and `EpochLogger` live here; the run folder's
checkpointing and history files are callbacks in cnnkit.runs.
"""

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit import distributed
from cnnkit.augment import augment, epoch_generator
from cnnkit.data import minibatch_indices
from cnnkit.device import autocast
from cnnkit.errors import CnnkitError
from cnnkit.inference import evaluate
from cnnkit.kernels import extension
from cnnkit.kernels.cpu import keep_freed_memory
from cnnkit.kernels.master_weights import bf16_weights
from cnnkit.recipes import RECIPES, TrainConfig, learning_rate_at


class TrainingDiverged(CnnkitError):
    """The training loss became NaN or infinite; the epoch it happened in was not saved."""

    exit_code = 1


@dataclass
class EpochRecord:
    """What one epoch of training measured; the run's history is a list of these."""

    epoch: int
    train_loss: float
    valid_loss: float | None
    valid_accuracy: float | None
    learning_rate: float  # at the epoch's last step
    images_per_s: float
    epoch_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def log_line(self, epochs: int) -> str:
        width = len(str(epochs))
        line = f"epoch {self.epoch:0{width}d}/{epochs}  loss {self.train_loss:.4f}"
        if self.valid_loss is not None:
            line += f"  valid_loss {self.valid_loss:.4f}  valid_acc {self.valid_accuracy:.4f}"
        return (
            line + f"  lr {self.learning_rate:.3g}  {self.images_per_s:,.0f} img/s  {self.epoch_seconds:.1f}s"
        )


# --- callbacks ---


class EpochLogger:
    """Hands one line per epoch to `log` (the CLI's log flushes each line as it is written)."""

    def __init__(self, log, epochs: int):
        self.log, self.epochs = log, epochs

    def on_epoch_end(self, record: EpochRecord):
        self.log(record.log_line(self.epochs))


class BestEpoch:
    """Tracks the epoch with the best validation accuracy (ties: the earlier epoch), for `--checkpoint best`."""

    name = "best"

    def __init__(self):
        self.epoch, self.valid_accuracy = None, None

    def on_epoch_end(self, record: EpochRecord):
        acc = record.valid_accuracy
        if acc is not None and (self.valid_accuracy is None or acc > self.valid_accuracy):
            self.epoch, self.valid_accuracy = record.epoch, acc

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "valid_accuracy": self.valid_accuracy}

    def load_state_dict(self, state: dict):
        self.epoch, self.valid_accuracy = state.get("epoch"), state.get("valid_accuracy")


class EarlyStopping:
    """Stops training after `patience` epochs without a lower validation loss (Keras's EarlyStopping).

    `reason` says why it stopped (None while it has not).
    """

    name = "early_stopping"

    def __init__(self, patience: int):
        self.patience = patience
        self.best_loss, self.wait, self.best_epoch = None, 0, None
        self.reason = None

    def on_epoch_end(self, record: EpochRecord) -> bool:
        loss = record.valid_loss
        if loss is None:
            return False
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.wait, self.best_epoch = loss, 0, record.epoch
            return False
        self.wait += 1
        if self.wait < self.patience:
            return False
        self.reason = (
            f"early stop after epoch {record.epoch}: no lower valid_loss for {self.wait} epochs "
            f"(best {self.best_loss:.4f} at epoch {self.best_epoch})"
        )
        return True

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "wait": self.wait, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict):
        self.best_loss, self.wait, self.best_epoch = (
            state.get("best_loss"),
            state.get("wait", 0),
            state.get("best_epoch"),
        )


# --- the loop ---


def make_optimizer(
    model, learning_rate: float, optimizer: str = "adam", weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Adam, as the chapter, with PyTorch's fused kernel: one pass over each tensor instead of about six
    (measured 0.8 ms a step here against 2.2 ms for the foreach version); or ("sgd") SGD with Nesterov
    momentum 0.9. weight_decay: L2, added to the gradients (Adam's weight_decay, not AdamW's)."""
    if optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    if weight_decay:
        return torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay, fused=True)
    return FusedAdam(model.parameters(), lr=learning_rate)


class FusedAdam(torch.optim.Adam):
    """torch.optim.Adam(fused=True) whose steps call the fused kernel directly: the same kernel and
    arguments, so the same bits and the same state_dict, without Optimizer.step's wrapper and
    grouping (measured: about 0.3 ms of a 10 ms training step on an AMD EPYC, 3%). The kernel,
    torch._fused_adam_, is private to PyTorch: where a torch lacks it, every step is Adam.step's (a
    test checks both give the same bits). Anything unusual (a closure, the first step, which creates
    the state, a parameter without a gradient) goes through Adam.step itself too."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr, fused=True)

    @torch.no_grad()
    def step(self, closure=None):
        fused_adam = _fused_adam_kernel()
        states = [self.state.get(p) for group in self.param_groups for p in group["params"]]
        if fused_adam is None or closure is not None or len(self.param_groups) != 1 or not all(states):
            return super().step(closure)
        group, params = self.param_groups[0], self.param_groups[0]["params"]
        grads = [p.grad for p in params]
        if any(g is None for g in grads) or group["amsgrad"] or group["maximize"] or group["weight_decay"]:
            return super().step(closure)
        steps = [state["step"] for state in states]
        for step in steps:
            step.add_(1)
        beta1, beta2 = group["betas"]
        fused_adam(
            params,
            grads,
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=group["eps"],
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )
        return None


def _fused_adam_kernel():
    """torch._fused_adam_, private to PyTorch, or None where this torch has no such function."""
    return getattr(torch, "_fused_adam_", None)


def restore_optimizer(optimizer, saved: dict | None):
    """Load the optimizer's state (Adam's moments, SGD's momentum; as `cnnkit.checkpoint.load_optimizer_state`
    validated it) into `optimizer`,
    giving each moment tensor its parameter's memory layout.

    Saved tensors come back contiguous while channels_last parameters are not, and PyTorch's fused CPU
    Adam walks a parameter and its moments as flat buffers: with mismatched layouts it silently
    computes wrong updates (seen with torch 2.13), so a resumed run would diverge.
    """
    if not saved:
        return
    state_dict = optimizer.state_dict()
    state_dict["state"] = saved["state"]
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = torch.empty_like(param).copy_(value)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The torch seed for epoch `epoch`'s dropout masks: a function of (seed, epoch) alone, and of the
    rank in a distributed run (rank 0's is the single process's)."""
    entropy = [seed, epoch, 0xD80] + ([rank] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def train_epoch(
    model,
    optimizer,
    images,
    labels,
    batches,
    precision="fp32",
    progress=None,
    learning_rates=None,
    label_smoothing=0.0,
    transform=None,
) -> float:
    """One pass over `batches` (index arrays into images/labels); returns the mean loss per image.

    images (N, C, H, W) float32 and labels (N,) int64 are tensors already on the model's device.
    `learning_rates`, if given, holds the learning rate of each step; `progress` is a tqdm bar;
    `transform`, if given, maps each batch of images to the images trained on (augmentation).
    Losses are summed on the device, so no step waits for the host (the bar's running loss is read
    every 20 steps). Raises TrainingDiverged naming the first step whose loss was not finite.
    In a distributed run `model` is the DDP wrapper and `batches` the global mini-batches: this rank
    trains on its shard of each, and the loss returned is the mean over every rank's images. In bf16 on
    the CPU the model holds bf16 copies of its weights while the epoch runs (cnnkit.master_weights).
    """
    device = images.device
    keep_freed_memory()
    rank, world = distributed.rank(), distributed.world_size()
    model.train()
    shards = [distributed.shard(batch, rank, world) for batch in batches]
    # What each step's mean loss counts for: its images, or for a short last batch split unequally among
    # the ranks, its share of the global batch. The losses stay on the device until the epoch ends.
    weights = [
        len(shard) if len(shard) * world == len(batch) else len(batch) / world
        for shard, batch in zip(shards, batches, strict=True)
    ]
    weights = torch.tensor(weights, dtype=torch.float64, device=device)
    losses = torch.zeros(len(batches), dtype=torch.float64, device=device)
    seen = 0
    with bf16_weights(model, optimizer, precision) as optimizer_step:
        for step, (batch, shard) in enumerate(zip(batches, shards, strict=True), 1):
            if learning_rates is not None:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rates[step - 1]
            idx = torch.from_numpy(shard).to(device)
            x, y = images.index_select(0, idx), labels.index_select(0, idx)
            if transform is not None:
                x = transform(x)
            with autocast(device, precision):
                if len(shard) * world == len(batch):
                    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
                else:  # a short last batch split unequally: weigh each rank's share by its images, as one
                    # process would (DDP averages the ranks' gradients); a rank may have no images at all
                    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing, reduction="sum")
                    loss = loss * (world / len(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer_step()
            losses[step - 1] = loss.detach()
            seen += len(shard)
            if progress is not None:
                progress.update(1)
                if step % 20 == 0:
                    progress.set_postfix_str(f"loss {float(losses[:step] @ weights[:step]) / seen:.4f}")
    total = losses @ weights
    bad_steps = torch.nonzero(~torch.isfinite(losses))
    first_bad = bad_steps[0, 0] + 1 if len(bad_steps) else torch.tensor(-1, device=device)
    if world > 1:  # every rank's images, and the first step at which any rank's loss stopped being finite
        counts = torch.stack([total, torch.tensor(seen, dtype=torch.float64, device=device)])
        counts = distributed.sum_over_ranks(counts)
        total, seen = counts[0], int(counts[1])
        never = torch.iinfo(torch.int64).max
        first_bad = distributed.min_over_ranks(torch.where(first_bad < 0, never, first_bad))
        first_bad = torch.where(first_bad == never, -1, first_bad)
    if int(first_bad) >= 0:
        raise TrainingDiverged(f"step {int(first_bad)}: the training loss became {float(total):.0f}")
    return float(total) / max(seen, 1)


def train(
    model,
    optimizer,
    train_data,
    valid_data=None,
    config: TrainConfig = RECIPES["chapter"],
    start_epoch: int = 1,
    callbacks=(),
    show_progress=None,
) -> list[EpochRecord]:
    """Train `model` from `start_epoch` through `config.epochs`; returns the new epochs' records.

    train_data and valid_data are (images, labels) tensor pairs on the model's device, images
    standardized. After each epoch, validation loss and accuracy are measured on valid_data (in eval
    mode, no dropout) and every callback's `on_epoch_end(record)` is called in order; one returning
    True stops training there. `show_progress` draws a tqdm bar per epoch (default: on a terminal).
    Raises TrainingDiverged (epoch and step named) when the loss stops being finite.

    In a distributed run every rank calls this with the same arguments, except that valid_data and
    callbacks are given to rank 0 only: the others wait each epoch for rank 0's verdict (stop or go).
    """
    distributed.check_batch_size(config.batch_size, distributed.world_size())
    show_progress = sys.stderr.isatty() if show_progress is None else show_progress
    show_progress = show_progress and distributed.is_main()  # one bar: rank 0's
    network = distributed.wrap(model)  # DDP in a distributed run, else `model` itself
    extension.load()  # a first build of the C++ kernels (about 20 s) is not counted in epoch 1's time
    warm_up(model, train_data, config)
    try:
        return _train_epochs(
            model, network, optimizer, train_data, valid_data, config, start_epoch, callbacks, show_progress
        )
    finally:
        del network  # before the process group goes (see cnnkit.distributed.process_group)


def warm_up(model, train_data, config: TrainConfig):
    """One forward and backward pass of a copy of `model` on a batch of the training images, in the
    run's precision, before epoch 1's clock starts: oneDNN compiles its kernels for each new shape on
    first use (measured on a fresh process, the chapter's network on mnist-5k, Sapphire Rapids, bf16:
    epoch 1 at 78% of epoch 2's images/s without this). Nothing of the run changes: not the model, not
    its optimizer, not the random generators."""
    images, labels = train_data
    if len(labels) == 0:
        return
    replica = copy.deepcopy(model).train()
    batch = min(config.batch_size, len(labels))
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast(images.device, config.precision):
        F.cross_entropy(replica(images[:batch]), labels[:batch]).backward()


def _train_epochs(
    model, network, optimizer, train_data, valid_data, config, start_epoch, callbacks, show_progress
) -> list[EpochRecord]:
    images, labels = train_data
    rank = distributed.rank()
    records = []
    for epoch in range(start_epoch, config.epochs + 1):
        batches = minibatch_indices(len(labels), config.batch_size, config.shuffle, config.seed, epoch)
        first_step, total_steps = (epoch - 1) * len(batches), config.epochs * len(batches)
        learning_rates = [learning_rate_at(config, first_step + i, total_steps) for i in range(len(batches))]
        bar = _progress_bar(len(batches), f"epoch {epoch}/{config.epochs}") if show_progress else None
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
                torch.manual_seed(epoch_seed(config.seed, epoch, rank))
                train_loss = train_epoch(
                    network,
                    optimizer,
                    images,
                    labels,
                    batches,
                    config.precision,
                    bar,
                    learning_rates,
                    config.label_smoothing,
                    _augmentation(config, epoch, images.device, rank),
                )
        except TrainingDiverged as exc:
            raise TrainingDiverged(f"epoch {epoch}, {exc}; try a lower --lr") from None
        finally:
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - start
        valid_loss = valid_accuracy = None
        if valid_data is not None and len(valid_data[1]) > 0:
            result = evaluate(model, *valid_data, precision=config.precision)
            valid_loss, valid_accuracy = result.loss, result.accuracy
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            valid_loss=valid_loss if valid_loss is None or math.isfinite(valid_loss) else None,
            valid_accuracy=valid_accuracy,
            learning_rate=learning_rates[-1] if learning_rates else config.learning_rate,
            images_per_s=len(labels) / train_seconds,
            epoch_seconds=time.perf_counter() - start,
        )
        records.append(record)
        stop = False
        for callback in callbacks:
            stop = bool(callback.on_epoch_end(record)) or stop
        if distributed.rank_zero_says(stop, images.device):
            break
    return records


def _augmentation(config: TrainConfig, epoch: int, device, rank: int = 0):
    """Epoch `epoch`'s batch transform (None without augmentation), drawn from (seed, epoch) alone,
    and the rank in a distributed run (rank 0's is the single process's)."""
    if not config.augments:
        return None
    generator = epoch_generator(config.seed, epoch, rank)
    return lambda images: augment(images, config, generator)


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, mininterval=0.2)
