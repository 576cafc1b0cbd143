"""The training loop: plain code you can read, one epoch at a time.

Everything random is derived from (seed, epoch): the mini-batch order and the dropout masks of epoch k
depend on nothing else, so a run resumed from a checkpoint of epoch k-1 (weights plus Adam's state)
continues exactly as if it had never stopped.
"""

import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.data import minibatch_indices
from cnnkit.device import autocast
from cnnkit.inference import evaluate
from cnnkit.progress import ProgressBar
from cnnkit.recipes import RECIPES, TrainConfig, learning_rate_at


@dataclass
class EpochRecord:
    """What one epoch of training measured; the run's history is a list of these."""

    epoch: int
    train_loss: float
    valid_loss: float | None
    valid_accuracy: float | None
    images_per_s: float
    epoch_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def log_line(self, epochs: int) -> str:
        width = len(str(epochs))
        line = f"epoch {self.epoch:0{width}d}/{epochs}  loss {self.train_loss:.4f}"
        if self.valid_loss is not None:
            line += f"  valid_loss {self.valid_loss:.4f}  valid_acc {self.valid_accuracy:.4f}"
        return line + f"  {self.images_per_s:,.0f} img/s  {self.epoch_seconds:.1f}s"


def make_optimizer(model, learning_rate: float) -> torch.optim.Adam:
    """Adam, as the chapter, with PyTorch's fused kernel: one pass over each tensor instead of about six
    (measured 0.8 ms a step here against 2.2 ms for the foreach version)."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate, fused=True)


def restore_optimizer(optimizer, state_dict: dict):
    """Load a saved optimizer state, giving each moment tensor its parameter's memory layout.

    Saved tensors come back contiguous while channels_last parameters are not, and PyTorch's fused CPU
    Adam walks a parameter and its moments as flat buffers: with mismatched layouts it silently
    computes wrong updates (seen with torch 2.13), so a resumed run would diverge.
    """
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    state[key] = torch.empty_like(param).copy_(value)


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed for epoch `epoch`'s dropout masks: a function of (seed, epoch) alone."""
    return int(np.random.SeedSequence([seed, epoch, 0xD80]).generate_state(1, np.uint64)[0] >> 1)


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
) -> float:
    """One pass over `batches` (index arrays into images/labels); returns the mean loss per image.

    images (N, C, H, W) float32 and labels (N,) int64 are tensors already on the model's device.
    `learning_rates`, if given, holds the learning rate of each step. Losses are summed on the
    device, so no step waits for the host.
    """
    device = images.device
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for step, idx in enumerate(batches, 1):
        if learning_rates is not None:
            for group in optimizer.param_groups:
                group["lr"] = learning_rates[step - 1]
        idx = torch.from_numpy(idx).to(device)
        x, y = images.index_select(0, idx), labels.index_select(0, idx)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
        seen += len(idx)
        if progress is not None:
            progress.update(1, suffix=f"loss {total.item() / seen:.4f}" if step % 50 == 0 else None)
    return float(total) / max(seen, 1)


def train(
    model,
    optimizer,
    train_data,
    valid_data=None,
    config: TrainConfig = RECIPES["chapter"],
    start_epoch: int = 1,
    on_epoch_end=None,
    log=None,
    show_progress=None,
) -> list[EpochRecord]:
    """Train `model` from `start_epoch` through `config.epochs`; returns the new epochs' records.

    train_data and valid_data are (images, labels) tensor pairs on the model's device, images
    standardized. After each epoch, validation loss and accuracy are measured on valid_data (in eval
    mode, no dropout), and `on_epoch_end(record)` is called (the run saves its checkpoint there).
    `log` receives one line per epoch; `show_progress` draws a bar per epoch (default: on a terminal).
    """
    images, labels = train_data
    show_progress = sys.stderr.isatty() if show_progress is None else show_progress
    records = []
    for epoch in range(start_epoch, config.epochs + 1):
        batches = minibatch_indices(len(labels), config.batch_size, config.shuffle, config.seed, epoch)
        first_step, total_steps = (epoch - 1) * len(batches), config.epochs * len(batches)
        learning_rates = [learning_rate_at(config, first_step + i, total_steps) for i in range(len(batches))]
        bar = (
            ProgressBar(len(batches), enabled=True, desc=f"epoch {epoch}/{config.epochs}", unit="batches")
            if show_progress
            else None
        )
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
            torch.manual_seed(epoch_seed(config.seed, epoch))
            train_loss = train_epoch(
                model,
                optimizer,
                images,
                labels,
                batches,
                config.precision,
                bar,
                learning_rates,
                config.label_smoothing,
            )
        train_seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        valid_loss = valid_accuracy = None
        if valid_data is not None and len(valid_data[1]) > 0:
            result = evaluate(model, *valid_data, precision=config.precision)
            valid_loss, valid_accuracy = result.loss, result.accuracy
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            valid_loss=valid_loss,
            valid_accuracy=valid_accuracy,
            images_per_s=len(labels) / train_seconds,
            epoch_seconds=time.perf_counter() - start,
        )
        records.append(record)
        if log is not None:
            log(record.log_line(config.epochs))
        if on_epoch_end is not None:
            on_epoch_end(record)
    return records
