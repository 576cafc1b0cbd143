"""The chapter's `ConvNN` class as a scikit-learn estimator."""

import math

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError

from cnnkit.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from cnnkit.data import Standardization
from cnnkit.data.dataset import images_as_nchw
from cnnkit.device import memory_format, resolve_device, resolve_precision
from cnnkit.inference import predict_logits
from cnnkit.model import Architecture, build_model
from cnnkit.recipes import TrainConfig
from cnnkit.runs import preprocessing_for
from cnnkit.training import make_optimizer, restore_optimizer, train


class ConvNN(ClassifierMixin, BaseEstimator):
    """The chapter's CNN with fit / predict / predict_proba / score, like any scikit-learn classifier.

    X may be rows of H*W pixels of square grayscale images (the chapter's (N, 784)), (N, H, W) or
    (N, C, H, W); y holds any class labels (ints or strings). Inputs are standardized with the training
    set's mean and std, which the fitted model keeps (`standardization_`).

    Parameters are the chapter's: batch_size, epochs, learning_rate, dropout_rate, shuffle and
    random_seed (None draws one; the drawn seed is kept in `seed_`). `warm_start=True` makes a second
    `fit` continue training the fitted network for `epochs` more epochs, with Adam's state (the
    chapter's `train(initialize=False)`). build ("layers" or "lowlevel"), precision ("auto", "fp32",
    "bf16") and device ("auto", "cpu", "cuda") choose how it runs; verbose=1 logs a line per epoch.

    Fitted attributes: classes_, n_features_in_, input_shape_, standardization_, model_, optimizer_,
    history_ (one dict per epoch), seed_.
    """

    def __init__(
        self,
        batch_size=64,
        epochs=20,
        learning_rate=1e-4,
        dropout_rate=0.5,
        shuffle=True,
        random_seed=None,
        warm_start=False,
        build="layers",
        precision="auto",
        device="auto",
        verbose=0,
    ):
        self.batch_size = batch_size
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.dropout_rate = dropout_rate
        self.shuffle = shuffle
        self.random_seed = random_seed
        self.warm_start = warm_start
        self.build = build
        self.precision = precision
        self.device = device
        self.verbose = verbose

    def fit(self, X, y, validation_data=None):
        """Train on X, y; validation_data=(X_valid, y_valid) is measured after each epoch. Returns self."""
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"y must be 1-D class labels, got shape {y.shape}")
        continuing = self.warm_start and hasattr(self, "model_")
        images = self._images(X, check_shape=continuing)
        if len(images) != len(y):
            raise ValueError(f"X has {len(images)} samples but y has {len(y)}")
        if not continuing:
            self._initialize(images, y)
        labels = self._encode(y)
        device = next(self.model_.parameters()).device
        done = len(self.history_)
        config = TrainConfig(
            epochs=done + self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            dropout_rate=self.dropout_rate,
            shuffle=self.shuffle,
            seed=self.seed_,
            build=self.build,
            precision=self.precision_,
        )
        valid = None
        if validation_data is not None:
            X_valid, y_valid = validation_data
            valid = (
                self._tensors(self._images(X_valid, check_shape=True), device),
                torch.as_tensor(self._encode(np.asarray(y_valid)), device=device),
            )
        records = train(
            self.model_,
            self.optimizer_,
            (self._tensors(images, device), torch.as_tensor(labels, device=device)),
            valid,
            config,
            start_epoch=done + 1,
            log=print if self.verbose else None,
            show_progress=None if self.verbose else False,
        )
        self.history_ += [r.to_dict() for r in records]
        return self

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (N, n_classes), columns in the order of classes_."""
        return torch.softmax(self._logits(X), dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        """Predicted class labels (N,), values from classes_."""
        predicted = self._logits(X).argmax(dim=1).numpy()
        return self.classes_[predicted]

    def save(self, path):
        """Write the fitted model as a cnnkit checkpoint (usable by `cnnkit predict` and `evaluate`)."""
        self._check_fitted()
        arch = self.model_.arch
        meta = {
            "build": self.build,
            "architecture": arch.to_dict(),
            "class_names": [str(c) for c in self.classes_],
            "classes": self.classes_.tolist(),
            "standardization": self.standardization_.to_dict(),
            "preprocessing": preprocessing_for("arrays", arch.input_shape),
            "dataset": "arrays",
            "valid_size": 0,
            "hyperparameters": {**self.get_params(), "seed_": self.seed_, "precision_": self.precision_},
            "epoch": len(self.history_),
            "history": self.history_,
        }
        return save_checkpoint(path, self.model_, meta, self.optimizer_)

    @classmethod
    def load(cls, path, device="auto") -> "ConvNN":
        """A fitted ConvNN from a checkpoint written by `save` or by `cnnkit train`."""
        ckpt = load_checkpoint(path)
        meta = ckpt.meta
        params = {k: v for k, v in meta["hyperparameters"].items() if k in cls._get_param_names()}
        params.setdefault("random_seed", meta["hyperparameters"].get("seed"))
        est = cls(**{**params, "build": meta["build"], "device": device})
        arch = Architecture.from_dict(meta["architecture"])
        dev = resolve_device(device)
        est.model_ = build_model(arch, meta["build"]).to(dev, memory_format=memory_format(dev))
        est.model_.load_state_dict(ckpt.model_state)
        est.optimizer_ = make_optimizer(est.model_, est.learning_rate)
        opt_state = load_optimizer_state(ckpt.path, required=False)
        if opt_state is not None:
            restore_optimizer(est.optimizer_, opt_state)
        est.classes_ = np.asarray(meta.get("classes", meta["class_names"]))
        est.input_shape_ = arch.input_shape
        est.n_features_in_ = math.prod(arch.input_shape)
        est.standardization_ = Standardization.from_dict(meta["standardization"])
        est.history_ = list(meta["history"])
        est.seed_ = meta["hyperparameters"].get("seed_", meta["hyperparameters"].get("seed"))
        est.precision_ = resolve_precision(est.precision, dev)
        return est

    # --- internals ---

    def _initialize(self, images, y):
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"y must hold at least 2 classes, got {len(self.classes_)}")
        self.input_shape_ = tuple(images.shape[1:])
        self.n_features_in_ = math.prod(self.input_shape_)
        self.seed_ = (
            self.random_seed
            if self.random_seed is not None
            else int(np.random.SeedSequence().entropy % 2**31)
        )
        device = resolve_device(self.device)
        self.precision_ = resolve_precision(self.precision, device)
        arch = Architecture(self.input_shape_, len(self.classes_), dropout_rate=self.dropout_rate)
        self.standardization_ = Standardization.fit(images)
        self.model_ = build_model(arch, self.build, seed=self.seed_).to(
            device, memory_format=memory_format(device)
        )
        self.optimizer_ = make_optimizer(self.model_, self.learning_rate)
        self.history_ = []

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
        try:
            X = images_as_nchw(X)
        except ValueError as exc:
            raise ValueError(f"X {exc}") from None
        if check_shape and hasattr(self, "input_shape_") and tuple(X.shape[1:]) != tuple(self.input_shape_):
            raise ValueError(
                f"X has images of shape {tuple(X.shape[1:])}, the model takes {tuple(self.input_shape_)}"
            )
        return X

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
