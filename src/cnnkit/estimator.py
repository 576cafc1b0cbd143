"""The chapter's `ConvNN` class as a scikit-learn estimator."""

import dataclasses
import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import assert_all_finite, check_array, check_random_state, column_or_1d

from cnnkit.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from cnnkit.data import Standardization
from cnnkit.data.dataset import MAX_CLASSES, images_as_nchw, infer_preprocessing
from cnnkit.device import DEVICES, PRECISIONS, memory_format, resolve_device, resolve_precision
from cnnkit.inference import predict_logits
from cnnkit.model import ARCHITECTURES, build_model
from cnnkit.recipes import SETTINGS, TrainConfig, check_setting, choose_network
from cnnkit.record import ModelRecord
from cnnkit.training import EarlyStopping, EpochLogger, make_optimizer, restore_optimizer, train

_DEPRECATED = "deprecated"  # random_seed's default: the old name was not given
# ConvNN's parameters that are TrainConfig's settings of the same name: checked, stored and read back
# through cnnkit.recipes (the others: random_state is `seed`, scale is (scale_low, scale_high), and
# precision also takes "auto").
CONFIG_PARAMS = (
    "arch",
    "optimizer",
    "weight_decay",
    "batch_size",
    "learning_rate",
    "dropout_rate",
    "shuffle",
    "build",
    "lr_schedule",
    "label_smoothing",
    "patience",
    "augment",
    "rotate",
    "shift",
    "shear",
    "flip",
    "pad",
)


# The architecture's sizes that are ConvNN parameters of the same name, per network.
_ARCH_PARAMS = {"chapter": ("conv_channels", "kernel_size", "hidden_units"), "resnet": ("widths",)}


class ConvNN(ClassifierMixin, BaseEstimator):
    """A CNN with fit / predict / predict_proba / score, like any scikit-learn classifier: the chapter's, or
    (arch="resnet", the default for color images) cnnkit's small ResNet (cnnkit.resnet).

    X holds square images in any of these forms: rows of H*W pixels (the chapter's (N, 784)),
    (N, H, W), (N, C, H, W) or (N, H, W, C), with 1 or 3 channels; NaN and inf are refused. y holds
    class labels (ints or strings, at least 2 classes); continuous targets are refused, as by any
    scikit-learn classifier. Inputs are standardized with the training set's per-channel mean and std,
    which the fitted model keeps (`standardization_`).

    All parameters are keyword-only, as scikit-learn's. Training: batch_size, epochs, learning_rate (the
    peak of a "one-cycle" lr_schedule), optimizer ("adam" or "sgd") and weight_decay, dropout_rate, shuffle,
    label_smoothing, and patience (stop after
    that many epochs without a lower loss on `validation_data`, or on the last `validation_fraction` of
    the training images when fit gets no validation_data; 0 never stops early; patience with neither is
    a UserWarning) - the chapter's values by default, `cnnkit train`'s
    TrainConfig fields; augment ("none", "affine" or "crop") with its ranges rotate, shift, scale (low,
    high) and shear, pad for "crop", and flip, as `cnnkit train --augment` (see cnnkit.augment). random_state is None (a seed drawn from NumPy's global generator), an int or
    a NumPy RandomState / Generator; the seed used is kept in `seed_`. random_seed is its deprecated
    name. The network: arch ("auto": the ResNet for color images, the chapter's otherwise; "chapter";
    "resnet"); the chapter's conv_channels (filters of the two convolutions), kernel_size and
    hidden_units (images must be at least (3 * kernel_size - 2) pixels a side, 13x13 for the chapter's
    5x5); the ResNet's widths (channels of its prep layer and three stages).
    `warm_start=True` makes a second `fit` continue training the fitted network for `epochs` more
    epochs, with Adam's state (the chapter's `train(initialize=False)`). build ("layers" or
    "lowlevel"), precision ("auto", "fp32", "bf16") and device ("auto", "cpu", "cuda") choose how it
    runs; verbose=1 logs a line per epoch. Parameters are checked when `fit` runs: a bad value is a
    ValueError, a value of the wrong type a TypeError, each naming the parameter.

    Fitted attributes: classes_, n_features_in_ (C*H*W), input_shape_ (C, H, W), standardization_,
    model_, optimizer_, history_ (one dict per epoch), n_iter_ (epochs trained, len(history_)), seed_,
    config_ (the TrainConfig of the last fit, or of the checkpoint `load` read).
    """

    def __init__(
        self,
        *,
        batch_size=64,
        epochs=20,
        learning_rate=1e-4,
        dropout_rate=0.5,
        shuffle=True,
        random_state=None,
        warm_start=False,
        build="layers",
        precision="auto",
        device="auto",
        verbose=0,
        lr_schedule="constant",
        label_smoothing=0.0,
        patience=0,
        validation_fraction=0.0,
        augment="none",
        rotate=12.0,
        shift=2.5,
        scale=(0.9, 1.1),
        shear=10.0,
        flip=False,
        pad=4,
        arch="auto",
        optimizer="adam",
        weight_decay=0.0,
        conv_channels=(32, 64),
        kernel_size=5,
        hidden_units=1024,
        widths=(16, 32, 64, 128),
        random_seed=_DEPRECATED,
    ):
        self.batch_size = batch_size
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.dropout_rate = dropout_rate
        self.shuffle = shuffle
        self.random_state = random_state
        self.warm_start = warm_start
        self.build = build
        self.precision = precision
        self.device = device
        self.verbose = verbose
        self.lr_schedule = lr_schedule
        self.label_smoothing = label_smoothing
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.augment = augment
        self.rotate = rotate
        self.shift = shift
        self.scale = scale
        self.shear = shear
        self.flip = flip
        self.pad = pad
        self.arch = arch
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.conv_channels = conv_channels
        self.kernel_size = kernel_size
        self.hidden_units = hidden_units
        self.widths = widths
        self.random_seed = random_seed

    @property
    def n_iter_(self) -> int:
        """Epochs trained so far (scikit-learn's name for the iterations an estimator ran)."""
        self._check_fitted()
        return len(self.history_)

    def fit(self, X, y, validation_data=None):
        """Train on X, y; validation_data=(X_valid, y_valid) is measured after each epoch (without it,
        the last `validation_fraction` of X, y is held out for that). Returns self."""
        self._check_params()
        random_state = self._random_state()
        continuing = self.warm_start and hasattr(self, "model_")
        # As scikit-learn's own estimators: X's values, then y, then what this model needs of X.
        X = check_array(X, allow_nd=True, dtype="numeric", input_name="X")
        y = self._labels(y)
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} samples but y has {len(y)}")
        if validation_data is None and self.validation_fraction > 0:
            held_out = max(1, round(len(X) * self.validation_fraction))
            if held_out >= len(X):
                raise ValueError(f"validation_fraction={self.validation_fraction} leaves no training images")
            X, y, validation_data = X[:-held_out], y[:-held_out], (X[-held_out:], y[-held_out:])
        if self.patience and validation_data is None:
            warnings.warn(
                f"patience={self.patience} has no effect without validation_data or a validation_fraction",
                UserWarning,
                stacklevel=2,
            )
        if not continuing:
            self._check_classes(y)
        images = self._images(X, check_shape=continuing)
        if not continuing:
            self._initialize(images, y, random_state)
        labels = self._encode(y)
        device = next(self.model_.parameters()).device
        done = len(self.history_)
        # recipe and keep have no parameter here: they stay as the checkpoint `load` read had them.
        self.config_ = config = dataclasses.replace(
            getattr(self, "config_", TrainConfig()),
            **{name: SETTINGS[name].type(getattr(self, name)) for name in CONFIG_PARAMS if name != "arch"},
            arch=self.model_.arch.network,  # "auto" resolved
            epochs=done + int(self.epochs),
            seed=self.seed_,
            precision=self.precision_,
            scale_low=float(self.scale[0]),
            scale_high=float(self.scale[1]),
        )
        valid = None
        if validation_data is not None:
            X_valid, y_valid = validation_data
            valid = (
                self._tensors(self._images(X_valid, check_shape=True), device),
                torch.as_tensor(self._encode(self._labels(y_valid)), device=device),
            )
        callbacks = [EpochLogger(print, config.epochs)] if self.verbose else []
        stopping = EarlyStopping(self.patience)
        if self.patience and valid is not None:
            callbacks.append(stopping)
        records = train(
            self.model_,
            self.optimizer_,
            (self._tensors(images, device), torch.as_tensor(labels, device=device)),
            valid,
            config,
            start_epoch=done + 1,
            callbacks=callbacks,
            show_progress=None if self.verbose else False,
        )
        self.history_ += [r.to_dict() for r in records]
        if self.verbose and stopping.reason:
            print(stopping.reason)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, n_classes) in float64, columns in the order of classes_."""
        return torch.softmax(self._logits(X).double(), dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        """Predicted class labels (N,), values from classes_."""
        predicted = self._logits(X).argmax(dim=1).numpy()
        return self.classes_[predicted]

    def save(self, path):
        """Write the fitted model as a cnnkit checkpoint (usable by `cnnkit predict` and `evaluate`)."""
        self._check_fitted()
        record = ModelRecord(
            architecture=self.model_.arch,
            class_names=tuple(str(c) for c in self.classes_),
            classes=tuple(c.item() if hasattr(c, "item") else c for c in self.classes_),
            standardization=self.standardization_,
            preprocessing=self.preprocessing_,
            config=self.config_,
            dataset=None,
            epoch=len(self.history_),
            history=tuple(self.history_),
        )
        return save_checkpoint(path, self.model_, record, self.optimizer_)

    @classmethod
    def load(cls, path, device="auto") -> "ConvNN":
        """A fitted ConvNN from a checkpoint written by `save` or by `cnnkit train` (any recipe).

        The parameters are the checkpoint's TrainConfig and architecture (epochs: those trained so
        far), so `clone` or a new `fit` trains the same recipe; `save` writes the config back whole.
        """
        ckpt = load_checkpoint(path)
        record, config, arch = ckpt.record, ckpt.record.config, ckpt.record.architecture
        est = cls(
            **{name: getattr(config, name) for name in CONFIG_PARAMS},
            epochs=config.epochs,
            random_state=config.seed,
            precision=config.precision,
            device=device,
            scale=(config.scale_low, config.scale_high),
            **{name: getattr(arch, name) for name in _ARCH_PARAMS[arch.network]},
        )
        dev = resolve_device(device)
        est.model_ = build_model(arch, record.build).to(dev, memory_format=memory_format(dev))
        est.model_.load_state_dict(ckpt.model_state)
        est.optimizer_ = make_optimizer(est.model_, est.learning_rate, est.optimizer, est.weight_decay)
        restore_optimizer(
            est.optimizer_, load_optimizer_state(ckpt.path, est.model_, required=False, kind=est.optimizer)
        )
        est.classes_ = np.asarray(record.classes if record.classes is not None else record.class_names)
        est.input_shape_ = arch.input_shape
        est.n_features_in_ = math.prod(est.input_shape_)
        est.standardization_ = record.standardization
        est.preprocessing_ = record.preprocessing
        est.history_ = list(record.history)
        est.seed_ = config.seed
        est.config_ = config
        est.precision_ = resolve_precision(est.precision, dev)
        return est

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True  # (N, H, W); (N, C, H, W) and (N, H, W, C) have no tag
        return tags

    # --- parameters ---

    def _check_params(self):
        """Raise ValueError (TypeError for a wrong type) naming the first parameter that cannot work."""
        for name in (*CONFIG_PARAMS, "epochs"):
            check_setting(name, getattr(self, name))
        _seed(self, "random_state")
        _boolean(self, "warm_start")
        _choice(self, "precision", PRECISIONS)
        _choice(self, "device", DEVICES)
        _integer(self, "verbose", 0)
        _number(self, "validation_fraction", "a number in [0, 1)", lambda v: 0 <= v < 1)
        scale = self.scale
        if not (
            isinstance(scale, tuple | list)
            and len(scale) == 2
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in scale)
        ):
            raise TypeError(f"scale must be a pair (low, high) of numbers, got {scale!r}")
        if not 0 < scale[0] <= scale[1] < math.inf:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale!r}")
        channels = self.conv_channels
        if not (
            isinstance(channels, tuple | list)
            and len(channels) == 2
            and all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in channels)
        ):
            raise TypeError(
                f"conv_channels must be a pair of ints (filters of the two convolutions), got {channels!r}"
            )
        if min(channels) < 1:
            raise ValueError(f"conv_channels must be a pair of ints >= 1, got {channels!r}")
        _integer(self, "kernel_size", 1)
        _integer(self, "hidden_units", 1)
        widths = self.widths
        if not (
            isinstance(widths, tuple | list)
            and len(widths) == 4
            and all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in widths)
        ):
            raise TypeError(f"widths must be four ints (the ResNet's prep and stage widths), got {widths!r}")
        if min(widths) < 1:
            raise ValueError(f"widths must be four ints >= 1, got {widths!r}")
        if not (isinstance(self.random_seed, str) and self.random_seed == _DEPRECATED):
            _seed(self, "random_seed")

    def _random_state(self):
        """random_state, or the deprecated random_seed when that was given (with a FutureWarning)."""
        if isinstance(self.random_seed, str) and self.random_seed == _DEPRECATED:
            return self.random_state
        if self.random_state is not None:
            raise ValueError("random_seed is the deprecated name of random_state: give only random_state")
        warnings.warn(
            "ConvNN's random_seed is deprecated and will be removed; use random_state (same meaning)",
            FutureWarning,
            stacklevel=3,
        )
        return self.random_seed

    # --- internals ---

    def _check_classes(self, y):
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(
                f"y holds 1 class ({classes.tolist()[0]!r}); a classifier needs at least 2 classes"
            )
        if len(classes) > MAX_CLASSES:
            raise ValueError(f"y holds {len(classes):,} classes; at most {MAX_CLASSES:,} are supported")

    def _initialize(self, images, y, random_state):
        self.classes_ = np.unique(y)
        network = choose_network(TrainConfig(arch=self.arch), images.shape[1])
        sizes = {
            "chapter": {
                "conv_channels": tuple(int(c) for c in self.conv_channels),
                "kernel_size": int(self.kernel_size),
                "hidden_units": int(self.hidden_units),
            },
            "resnet": {"widths": tuple(int(c) for c in self.widths)},
        }[network]
        try:
            arch = ARCHITECTURES[network](
                tuple(images.shape[1:]), len(self.classes_), dropout_rate=float(self.dropout_rate), **sizes
            )
        except ValueError as exc:
            raise ValueError(f"X: {exc} (kernel_size sets the minimum)") from None
        self.input_shape_ = arch.input_shape
        self.n_features_in_ = math.prod(self.input_shape_)
        self.seed_ = _draw_seed(random_state)
        device = resolve_device(self.device)
        self.precision_ = resolve_precision(self.precision, device)
        self.standardization_ = Standardization.fit(images)
        self.preprocessing_ = infer_preprocessing(images, [str(c) for c in self.classes_])[0]
        self.model_ = build_model(arch, self.build, seed=self.seed_).to(
            device, memory_format=memory_format(device)
        )
        self.optimizer_ = make_optimizer(self.model_, self.learning_rate, self.optimizer, self.weight_decay)
        self.history_ = []

    def _labels(self, y) -> np.ndarray:
        """y as 1-D class labels, as a scikit-learn classifier takes them (continuous y is refused)."""
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        y = column_or_1d(y, warn=True)
        if y.dtype.kind in "fc":
            assert_all_finite(y, input_name="y")
        check_classification_targets(y)
        return y

    def _encode(self, y) -> np.ndarray:
        index = np.searchsorted(self.classes_, y)
        index = np.clip(index, 0, len(self.classes_) - 1)
        unknown = self.classes_[index] != y
        if unknown.any():
            raise ValueError(
                f"y holds labels the model was not fitted on: {np.unique(y[unknown])[:5].tolist()}"
            )
        return index.astype(np.int64)

    def _images(self, X, check_shape) -> np.ndarray:
        """X as (N, C, H, W) numbers, all finite; with `check_shape`, of the fitted input shape."""
        X = check_array(X, allow_nd=True, dtype="numeric", input_name="X")
        fitted = check_shape and hasattr(self, "input_shape_")
        if fitted and X.ndim == 2 and X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input (images of shape {tuple(self.input_shape_)})"
            )
        X = self._as_nchw(X)
        if fitted and tuple(X.shape[1:]) != tuple(self.input_shape_):
            raise ValueError(
                f"X has images of shape {tuple(X.shape[1:])}, the model takes {tuple(self.input_shape_)}"
            )
        return X

    @staticmethod
    def _as_nchw(X) -> np.ndarray:
        try:
            return images_as_nchw(X, allow_nhwc=True)
        except ValueError as exc:
            raise ValueError(f"X {exc}") from None

    def _tensors(self, images, device):
        x = torch.from_numpy(self.standardization_.apply(images)).to(device)
        return x.contiguous(memory_format=memory_format(device))

    def _logits(self, X) -> torch.Tensor:
        self._check_fitted()
        images = self._images(X, check_shape=True)
        device = next(self.model_.parameters()).device
        return predict_logits(self.model_, self._tensors(images, device), precision=self.precision_)

    def _check_fitted(self):
        if not hasattr(self, "model_"):
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call fit(X, y) first.")


# --- parameter checks: each names the parameter and says what it must be ---


def _integer(est, name, low):
    value = getattr(est, name)
    is_int = isinstance(value, numbers.Integral) and (name == "verbose" or not isinstance(value, bool))
    if not is_int:
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _number(est, name, expected, ok):
    value = getattr(est, name)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not ok(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _boolean(est, name):
    value = getattr(est, name)
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _choice(est, name, choices):
    value = getattr(est, name)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _seed(est, name):
    value = getattr(est, name)
    expected = "None, an int in [0, 2**63) or a numpy RandomState or Generator"
    if value is None or isinstance(value, np.random.RandomState | np.random.Generator):
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _draw_seed(random_state) -> int:
    """The training seed: an int as given; otherwise drawn from the generator (None: NumPy's global one)."""
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**31))
    return int(check_random_state(random_state).randint(2**31))
