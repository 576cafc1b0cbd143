"""What `cnnkit serve` loads on demand, each kept within a bound: a run's other checkpoints (the page's
epoch slider) and the split of the dataset a model was trained on (a report's test image, by index).

A checkpoint is loaded by `checkpoint.load_network` as the served one was, the least recently used
dropped while the weights held together (the network and its unfused copy for `cnnkit.arithmetic`)
pass MAX_LOADED_BYTES; the served checkpoints themselves are always kept. A split comes from
`evaluation.evaluation_split`, as `cnnkit evaluate` and `cnnkit report` read it, so image i is their
image i; at most MAX_SPLITS are kept.
"""

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnkit.checkpoint import list_checkpoints, load_network
from cnnkit.errors import CheckpointError
from cnnkit.layer_outputs import reference_network

MAX_LOADED_BYTES = 512 * 2**20
MAX_SPLITS = 2
_EPOCH = re.compile(r"^epoch-(\d+)\.safetensors$")


@dataclass
class Loaded:
    """One checkpoint's network (as `load_network` builds it) and record, and its unfused copy for
    `cnnkit.arithmetic`, made at first use. `tracing` is held while hooks are on that copy: one trace at
    a time, so that no request's hooks record another's forward pass."""

    network: torch.nn.Module
    record: object
    path: Path
    tracing: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _reference: torch.nn.Module | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def epoch(self) -> int:
        return self.record.epoch

    def reference(self) -> torch.nn.Module:
        with self._lock:
            if self._reference is None:
                self._reference = reference_network(self.network)
            return self._reference

    def nbytes(self) -> int:
        """The bytes its weights hold, its unfused copy counted as if made."""
        return 2 * sum(t.numel() * t.element_size() for t in self.network.state_dict().values())


def run_folder(path: Path) -> Path | None:
    """RUN for a checkpoint RUN/checkpoints/epoch-NNN.safetensors, else None."""
    return path.parent.parent if path.parent.name == "checkpoints" else None


def kept_epochs(path: Path) -> dict[int, Path]:
    """{epoch: weights file} of the run folder that holds checkpoint `path`, oldest first, read afresh
    (a run still training adds one each epoch); `path`'s own epoch alone outside a run folder."""
    run = run_folder(path)
    found = list_checkpoints(run) if run is not None else []
    return {int(_EPOCH.match(p.name).group(1)): p for p in found}


class LoadedCheckpoints:
    """Networks of checkpoints by path: the pinned ones (the models served) and at most `max_bytes` of
    others, the least recently used dropped first. Safe to use from the worker threads; a checkpoint is
    loaded by one thread at a time, so a burst of requests for it loads it once."""

    def __init__(self, max_bytes: int = MAX_LOADED_BYTES):
        self.max_bytes, self.held = max_bytes, 0
        self.pinned: dict[Path, Loaded] = {}
        self.recent: OrderedDict[Path, Loaded] = OrderedDict()
        self.lock = threading.Lock()
        self.loading = threading.Lock()

    def pin(self, network, record, path: Path) -> Loaded:
        loaded = Loaded(network, record, Path(path))
        with self.lock:
            self.pinned[loaded.path] = loaded
        return loaded

    def get(self, path: Path) -> Loaded:
        """The checkpoint at `path`, loaded now if it is not held. Raises CnnkitError (a bad file)."""
        path = Path(path)
        found = self._held(path)
        if found is not None:
            return found
        with self.loading:
            found = self._held(path)  # another thread may have loaded it meanwhile
            if found is not None:
                return found
            network, ckpt = load_network(path)
            loaded = Loaded(network, ckpt.record, path)
            with self.lock:
                self.recent[path] = loaded
                self.held += loaded.nbytes()
                while self.held > self.max_bytes and len(self.recent) > 1:
                    _, dropped = self.recent.popitem(last=False)
                    self.held -= dropped.nbytes()
            return loaded

    def _held(self, path: Path) -> Loaded | None:
        with self.lock:
            if path in self.pinned:
                return self.pinned[path]
            if path in self.recent:
                self.recent.move_to_end(path)
                return self.recent[path]
        return None


def checkpoint_of(served_path: Path, served_record, epoch: int | None) -> Path:
    """The weights file of epoch `epoch` of the run that holds `served_path` (None: `served_path`).
    Raises CheckpointError saying which epochs are kept when `epoch` is not one of them."""
    if epoch is None or epoch == served_record.epoch:
        return served_path
    epochs = kept_epochs(served_path)
    if epoch not in epochs:
        kept = ", ".join(map(str, epochs)) or str(served_record.epoch)
        where = (
            f"the run {run_folder(served_path)}"
            if run_folder(served_path)
            else f"{served_path} (not in a run folder)"
        )
        raise CheckpointError(f"checkpoint {epoch}: no such epoch is kept in {where}; kept: {kept}")
    return epochs[epoch]


def same_network(served_record, record, path: Path):
    """Raise CheckpointError unless checkpoint `record` (at `path`) has the served model's network and
    classes, so that the page's panels and bars mean the same at every epoch."""
    if record.architecture != served_record.architecture or list(record.class_names) != list(
        served_record.class_names
    ):
        raise CheckpointError(f"{path}: another network or other classes than the model served; not shown")


@dataclass
class SplitImages:
    """A dataset split as `cnnkit evaluate` reads it for the model: images (N, C, H, W) as stored, labels."""

    source: str
    name: str
    images: np.ndarray
    labels: np.ndarray


class LoadedSplits:
    """Dataset splits by (source, split, input shape, classes): at most `most`, one loaded at a time."""

    def __init__(self, most: int = MAX_SPLITS):
        self.most = most
        self.recent: OrderedDict[tuple, SplitImages] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, record, checkpoint_path: Path, split: str) -> SplitImages:
        """Split `split` of the dataset `record` was trained on. Raises CnnkitError (no dataset recorded,
        the dataset cannot be read, no such split)."""
        from cnnkit.evaluation import evaluation_split

        key = (record.dataset, split, tuple(record.architecture.input_shape), tuple(record.class_names))
        with self.lock:
            if key in self.recent:
                self.recent.move_to_end(key)
                return self.recent[key]
            source, _, chosen = evaluation_split(record, checkpoint_path, None, split)
            images = SplitImages(source, split, chosen.images, chosen.labels)
            self.recent[key] = images
            while len(self.recent) > self.most:
                self.recent.popitem(last=False)
            return images
