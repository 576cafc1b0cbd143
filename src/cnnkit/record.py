"""The one record of a trained classifier: what it is, what it was trained on, and how to use it.

A `ModelRecord` travels in every checkpoint's metadata (see cnnkit.checkpoint) and is the only way
cnnkit reads what a trained model is: train, resume, evaluate, predict, summary and `ConvNN` all go
through `ModelRecord.from_dict`, which validates every field and raises one CheckpointError naming
the file and the field. Checkpoints of format 1 (cnnkit 0.1.0) are read too.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from cnnkit import __version__
from cnnkit.data import Standardization
from cnnkit.data.dataset import MAX_CLASSES
from cnnkit.errors import CheckpointError, CnnkitError
from cnnkit.images import MAX_IMAGE_SIDE, PREPROCESSING
from cnnkit.model import ARCHITECTURES, Architecture, ResNetArchitecture, architecture_from_dict
from cnnkit.recipes import SETTINGS, TrainConfig, check_setting

FORMAT = "cnnkit-checkpoint"
FORMAT_VERSION = 2

# Sanity limits checked before anything is allocated: a checkpoint describing more is refused.
MAX_CHANNELS = 4096  # convolution filters per layer
MAX_HIDDEN_UNITS = 65_536
MAX_KERNEL_SIZE = 31
MAX_PARAMETERS = 2_000_000_000
MAX_HISTORY = 100_000  # epochs
MAX_TEST_FILES = 1_000_000  # held-out test images of a folder (cnnkit holds out at most 10,000)


@dataclass(frozen=True)
class ModelRecord:
    """Everything about a trained network except its weights.

    architecture  the shapes (input (C, H, W), classes, layer sizes): rebuilds the network
    class_names   one name per output, in output order
    classes       ConvNN only: the label values y held (ints or strings), in output order
    standardization  per-channel mean and std of the training images
    preprocessing how to bring a user's image file to the input ("digit", "object" or "resize")
    config        the full training configuration (recipe, schedule, seed, precision, patience, keep)
    dataset       the dataset source with absolute paths (None when trained on arrays by ConvNN)
    valid_size    images held out for validation from the end of the training split
    epoch         epochs trained; history holds one dict per epoch
    trainer_state the callbacks' state (best epoch, early-stopping counter), for exact resume
    test_files    the images a folder:DIR without train/ and test/ held out as its test split (paths
                  relative to DIR; stored grouped by folder, {"cat": ["1.png", ...]}), else None
    """

    architecture: Architecture | ResNetArchitecture
    class_names: tuple[str, ...]
    standardization: Standardization
    preprocessing: str
    config: TrainConfig
    dataset: str | None = None
    valid_size: int = 0
    classes: tuple | None = None
    epoch: int = 0
    history: tuple[dict, ...] = ()
    trainer_state: dict = field(default_factory=dict)
    test_files: tuple[str, ...] | None = None
    cnnkit_version: str = __version__

    def __post_init__(self):
        if self.config.arch == "auto":  # the record says which network it is
            object.__setattr__(
                self, "config", dataclasses.replace(self.config, arch=self.architecture.network)
            )

    @property
    def build(self) -> str:
        return self.config.build

    @property
    def best_epoch(self) -> int | None:
        """The epoch with the best validation accuracy so far (None without validation)."""
        return self.trainer_state.get("best", {}).get("epoch")

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "cnnkit_version": self.cnnkit_version,
            "architecture": self.architecture.to_dict(),
            "class_names": list(self.class_names),
            "classes": None if self.classes is None else list(self.classes),
            "standardization": self.standardization.to_dict(),
            "preprocessing": self.preprocessing,
            "config": self.config.to_dict(),
            "dataset": self.dataset,
            "valid_size": self.valid_size,
            "epoch": self.epoch,
            "history": list(self.history),
            "trainer_state": self.trainer_state,
            "test_files": _grouped(self.test_files),
        }

    @classmethod
    def from_dict(cls, meta, path) -> "ModelRecord":
        """Validate checkpoint metadata (format 1 or 2) into a record; CheckpointError names `path` and the field."""
        return _parse(meta, str(path))

    def replace(self, **changes) -> "ModelRecord":
        return dataclasses.replace(self, **changes)


# --- validation: each check names the field it reads ---


class _FieldError(Exception):
    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{field_name} {problem}")


def _parse(meta, path: str) -> ModelRecord:
    try:
        if not isinstance(meta, dict):
            raise _FieldError("metadata", f"is a JSON {type(meta).__name__}, not an object")
        version = meta.get("format_version", 1)
        if not _is_int(version) or version < 1:
            raise _FieldError("format_version", f"must be a whole number >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format {version} is newer than this cnnkit understands "
                f"({FORMAT_VERSION}); upgrade cnnkit"
            )
        if version == 1:
            meta = _upgrade_v1(meta)
        return _parse_v2(meta)
    except _FieldError as exc:
        raise CheckpointError(f"{path}: checkpoint metadata field {exc}") from None


def _parse_v2(meta: dict) -> ModelRecord:
    arch = _architecture(_get(meta, "architecture", dict))
    names = _get(meta, "class_names", list)
    if len(names) != arch.num_classes or not all(isinstance(n, str) for n in names):
        raise _FieldError("class_names", f"must be {arch.num_classes} strings, one per output")
    classes = meta.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or len(classes) != arch.num_classes:
            raise _FieldError("classes", f"must be a list of {arch.num_classes} labels")
        if not (all(_is_int(c) for c in classes) or all(isinstance(c, str) for c in classes)):
            raise _FieldError("classes", "must be all whole numbers or all strings")
        classes = tuple(classes)
    try:
        standardization = Standardization.from_dict(_get(meta, "standardization", dict))
    except CnnkitError as exc:
        raise _FieldError("standardization", f"is malformed ({exc})") from None
    if len(standardization.mean) != arch.input_shape[0]:
        raise _FieldError("standardization", f"must hold {arch.input_shape[0]} channel(s)")
    preprocessing = _get(meta, "preprocessing", str)
    if preprocessing not in PREPROCESSING:
        raise _FieldError(
            "preprocessing", f"must be one of {', '.join(PREPROCESSING)}, got {preprocessing!r}"
        )
    config = _config(_get(meta, "config", dict))
    if config.arch not in ("auto", arch.network):  # "auto": a record from before there were two networks
        raise _FieldError("config.arch", f"says {config.arch!r} but the architecture is {arch.network!r}")
    dataset = meta.get("dataset")
    if dataset is not None and (not isinstance(dataset, str) or not dataset):
        raise _FieldError("dataset", "must be a dataset source string or null")
    valid_size = _get(meta, "valid_size", int)
    epoch = _get(meta, "epoch", int)
    if valid_size < 0 or epoch < 0:
        raise _FieldError("valid_size" if valid_size < 0 else "epoch", "must not be negative")
    history = _history(_get(meta, "history", list), epoch)
    trainer_state = _trainer_state(meta.get("trainer_state"), epoch)
    test_files = _test_files(meta.get("test_files"))
    version = meta.get("cnnkit_version", "unknown")
    return ModelRecord(
        architecture=arch,
        class_names=tuple(names),
        standardization=standardization,
        preprocessing=preprocessing,
        config=config,
        dataset=dataset,
        valid_size=valid_size,
        classes=classes,
        epoch=epoch,
        history=tuple(history),
        trainer_state=trainer_state,
        test_files=test_files,
        cnnkit_version=version if isinstance(version, str) else "unknown",
    )


def _architecture(d: dict):
    network = d.get("network", "chapter")
    if network not in ARCHITECTURES:
        raise _FieldError(
            "architecture.network", f"must be one of {', '.join(ARCHITECTURES)}, got {network!r}"
        )
    kind = ARCHITECTURES[network]
    known = {f.name for f in dataclasses.fields(kind)} | {"network"}
    if set(d) - known:
        raise _FieldError("architecture", f"has unknown keys {sorted(set(d) - known)}")
    shape = d.get("input_shape", (1, 28, 28))
    if not (isinstance(shape, list | tuple) and len(shape) == 3 and all(_is_int(v) for v in shape)):
        raise _FieldError("architecture.input_shape", f"must be [C, H, W], got {shape!r}")
    if shape[0] not in (1, 3) or not all(1 <= v <= MAX_IMAGE_SIDE for v in shape[1:]):
        raise _FieldError(
            "architecture.input_shape",
            f"must have 1 or 3 channels and sides 1..{MAX_IMAGE_SIDE}, got {shape}",
        )
    classes = d.get("num_classes", 10)
    if not _is_int(classes) or not 2 <= classes <= MAX_CLASSES:
        raise _FieldError("architecture.num_classes", f"must be 2..{MAX_CLASSES:,}, got {classes!r}")
    if kind is ResNetArchitecture:
        _resnet_sizes(d)
    else:
        _chapter_sizes(d)
    try:
        arch = architecture_from_dict(d)
    except (TypeError, ValueError) as exc:
        raise _FieldError("architecture", f"does not describe a network ({exc})") from None
    if arch.num_parameters > MAX_PARAMETERS:
        raise _FieldError("architecture", f"describes more than {MAX_PARAMETERS:,} parameters")
    return arch


def _resnet_sizes(d: dict):
    widths = d.get("widths", (16, 32, 64, 128))
    if not (
        isinstance(widths, list | tuple)
        and len(widths) == 4
        and all(_is_int(c) and 1 <= c <= MAX_CHANNELS for c in widths)
    ):
        raise _FieldError("architecture.widths", f"must be four counts 1..{MAX_CHANNELS}, got {widths!r}")
    _dropout_rate(d)


def _dropout_rate(d: dict):
    rate = d.get("dropout_rate", 0.5)
    if not _is_number(rate) or not 0 <= rate < 1:
        raise _FieldError("architecture.dropout_rate", f"must be in [0, 1), got {rate!r}")


def _chapter_sizes(d: dict):
    channels = d.get("conv_channels", (32, 64))
    if not (
        isinstance(channels, list | tuple)
        and len(channels) == 2
        and all(_is_int(c) and 1 <= c <= MAX_CHANNELS for c in channels)
    ):
        raise _FieldError(
            "architecture.conv_channels", f"must be two counts 1..{MAX_CHANNELS}, got {channels!r}"
        )
    kernel = d.get("kernel_size", 5)
    if not _is_int(kernel) or not 1 <= kernel <= MAX_KERNEL_SIZE:
        raise _FieldError("architecture.kernel_size", f"must be 1..{MAX_KERNEL_SIZE}, got {kernel!r}")
    hidden = d.get("hidden_units", 1024)
    if not _is_int(hidden) or not 1 <= hidden <= MAX_HIDDEN_UNITS:
        raise _FieldError("architecture.hidden_units", f"must be 1..{MAX_HIDDEN_UNITS}, got {hidden!r}")
    _dropout_rate(d)


def _config(d: dict) -> TrainConfig:
    """The record's training configuration, each field checked by its setting (cnnkit.recipes), so that a
    bad one is named; a field this cnnkit does not know (a later one's) is ignored, as its default would be."""
    values = {}
    for name, value in d.items():
        if name not in SETTINGS:
            continue
        if (isinstance(value, float) and not math.isfinite(value)) or (
            isinstance(value, int) and abs(value) > 2**63
        ):
            raise _FieldError(f"config.{name}", f"has the wrong type: {value!r}")
        try:
            check_setting(name, value)
        except TypeError:
            raise _FieldError(f"config.{name}", f"has the wrong type: {value!r}") from None
        except ValueError as exc:
            raise _FieldError(f"config.{name}", str(exc).removeprefix(f"{name} ")) from None
        values[name] = value
    if values.get("precision", "fp32") not in ("fp32", "bf16"):
        raise _FieldError("config.precision", "must be fp32 or bf16")
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        raise _FieldError("config", f"is not a valid training configuration ({exc})") from None


# The measures of a history entry and the state of each stateful callback (cnnkit.training's BestEpoch
# and EarlyStopping), each value of one of the kinds below. Keys this cnnkit does not know (a later
# version's measures or callbacks) are dropped when read, as unknown config fields are: nothing here
# reads them, a resumed run writes only its own, and a value that is not strict JSON (NaN) could not be
# written back.
_KINDS = {
    "epoch": (lambda v, last: _is_int(v) and 1 <= v <= last, "an epoch 1..{last} (the record's epoch)"),
    "epoch or null": (
        lambda v, last: v is None or (_is_int(v) and 1 <= v <= last),
        "an epoch 1..{last} (the record's epoch) or null",
    ),
    "count": (lambda v, last: _is_int(v) and v >= 0, "a whole number >= 0"),
    "number or null": (lambda v, last: v is None or _is_finite(v), "a finite number or null"),
    "fraction or null": (lambda v, last: v is None or (_is_finite(v) and 0 <= v <= 1), "in [0, 1] or null"),
}
_HISTORY_ENTRY = {
    "epoch": "epoch",
    "train_loss": "number or null",
    "valid_loss": "number or null",
    "valid_accuracy": "fraction or null",
    "learning_rate": "number or null",
    "images_per_s": "number or null",
    "epoch_seconds": "number or null",
}
_TRAINER_STATE = {
    "best": {"epoch": "epoch or null", "valid_accuracy": "fraction or null"},
    "early_stopping": {"best_loss": "number or null", "wait": "count", "best_epoch": "epoch or null"},
}


def _history(history: list, epoch: int) -> list[dict]:
    """One object per epoch trained (1..`epoch`), each of known measures."""
    if len(history) > MAX_HISTORY:
        raise _FieldError("history", f"holds more than {MAX_HISTORY:,} epochs")
    return [
        _known_values(entry, f"history[{i}]", _HISTORY_ENTRY, epoch, required=("epoch",))
        for i, entry in enumerate(history)
    ]


def _trainer_state(state, epoch: int) -> dict:
    """The callbacks' state: the known ones, each an object of known keys (missing ones: the defaults)."""
    if state is None:
        return {}
    if not isinstance(state, dict):
        raise _FieldError("trainer_state", f"must be an object, got a JSON {_json_type(state)}")
    return {
        name: _known_values(state[name], f"trainer_state.{name}", kinds, epoch)
        for name, kinds in _TRAINER_STATE.items()
        if name in state
    }


def _known_values(d, where: str, kinds: dict, last_epoch: int, required=()) -> dict:
    """The keys of object `d` named in `kinds` (key -> kind), each checked; the others dropped."""
    if not isinstance(d, dict):
        raise _FieldError(where, f"must be an object, got a JSON {_json_type(d)}")
    for key in required:
        if key not in d:
            raise _FieldError(f"{where}.{key}", "is missing")
    values = {}
    for key, value in d.items():
        if key in kinds:
            ok, expected = _KINDS[kinds[key]]
            if not ok(value, last_epoch):
                raise _FieldError(
                    f"{where}.{key}", f"must be {expected.format(last=last_epoch)}, got {_quoted(value)}"
                )
            values[key] = value
    return values


def _grouped(paths) -> dict | None:
    """Relative paths as {folder: [names]}, each folder's names sorted: the record's compact form."""
    if paths is None:
        return None
    groups = {}
    for path in sorted(paths):
        folder, _, name = path.rpartition("/")
        groups.setdefault(folder, []).append(name)
    return groups


def _test_files(groups) -> tuple[str, ...] | None:
    """The held-out test files from their grouped form, each a path inside the dataset's folder: no
    absolute path, no "..", no empty part, at most MAX_TEST_FILES."""
    if groups is None:
        return None
    if not isinstance(groups, dict):
        raise _FieldError(
            "test_files",
            f"must be an object of folder: [file names] or null, got a JSON {_json_type(groups)}",
        )
    paths = []
    for folder, names in groups.items():
        parts = folder.split("/")
        if not folder or "\0" in folder or any(part in ("", ".", "..") for part in parts):
            raise _FieldError(
                "test_files",
                f"names the folder {_quoted(folder)}; expected a path inside the dataset's folder",
            )
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _FieldError(f"test_files[{_quoted(folder)}]", "must be a list of file names")
        for name in names:
            if name in ("", ".", "..") or "/" in name or "\0" in name:
                raise _FieldError(
                    f"test_files[{_quoted(folder)}]", f"holds {_quoted(name)}; expected a file name"
                )
            paths.append(f"{folder}/{name}")
        if len(paths) > MAX_TEST_FILES:
            raise _FieldError("test_files", f"lists more than {MAX_TEST_FILES:,} files")
    return tuple(sorted(paths))


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _quoted(value) -> str:
    """A JSON value as a message quotes it: its type when it is a container, else itself (cut short)."""
    if isinstance(value, dict | list):
        return f"a JSON {_json_type(value)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _upgrade_v1(meta: dict) -> dict:
    """Format 1 (cnnkit 0.1.0) as format 2: `hyperparameters` -> `config`; ConvNN's params mapped."""
    hyper = _get(meta, "hyperparameters", dict)
    if "random_seed" in hyper or "seed_" in hyper:  # written by ConvNN.save
        config = {
            "epochs": hyper.get("epochs", 20),
            "batch_size": hyper.get("batch_size", 64),
            "learning_rate": hyper.get("learning_rate", 1e-4),
            "dropout_rate": hyper.get("dropout_rate", 0.5),
            "shuffle": hyper.get("shuffle", True),
            "seed": hyper.get("seed_", hyper.get("random_seed") or 0),
            "precision": hyper.get("precision_", "fp32"),
        }
    else:
        config = dict(hyper)
    config["build"] = meta.get("build", config.get("build", "layers"))
    dataset = meta.get("dataset")
    return {
        **meta,
        "config": config,
        "dataset": None if dataset == "arrays" else dataset,
        "trainer_state": {},
    }


def _get(meta: dict, name: str, kind: type):
    if name not in meta:
        raise _FieldError(name, "is missing")
    value = meta[name]
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise _FieldError(name, f"must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """A JSON number that is a finite float (a whole number too large for a float is not)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False
