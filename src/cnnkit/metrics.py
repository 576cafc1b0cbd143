"""Evaluation metrics from logits: mean cross-entropy, accuracy, per-class accuracy, confusion matrix.

NumPy only, so that scoring an exported .onnx model (cnnkit.onnx_model) needs no torch;
`cnnkit.inference.evaluate` computes its metrics here too.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class Evaluation:
    """Loss and accuracy on a labelled set, with per-class accuracy and the confusion matrix.

    confusion[i, j] counts images of true class i predicted as class j.
    """

    loss: float
    accuracy: float
    n: int
    confusion: np.ndarray

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """Recall of each class; NaN for a class with no images."""
        totals = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, np.diag(self.confusion) / np.maximum(totals, 1), np.nan)

    def to_dict(self, class_names) -> dict:
        per_class = {
            name: {"accuracy": None if np.isnan(acc) else float(acc), "n": int(n)}
            for name, acc, n in zip(
                class_names, self.per_class_accuracy, self.confusion.sum(axis=1), strict=True
            )
        }
        return {  # strict JSON: NaN (no images, or a diverged network) becomes null
            "accuracy": _finite_or_none(self.accuracy),
            "loss": _finite_or_none(self.loss),
            "n": self.n,
            "per_class": per_class,
            "confusion_matrix": self.confusion.tolist(),
        }


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


def strict_json(value):
    """`value` (dicts, lists and tuples of numbers, strings, None) with every NaN or infinity made None:
    what every JSON that cnnkit writes goes through, as `json.dumps(strict_json(value), allow_nan=False)`,
    so that a diverged network's NaN becomes null instead of stopping the command."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    if isinstance(value, float | np.floating):
        return _finite_or_none(float(value))
    return value


def evaluate_logits(logits, labels) -> Evaluation:
    """Metrics of logits (N, K) against labels (N,) indexing the K classes.

    Either may be a NumPy array or a torch tensor (on any device). The loss is the mean cross-entropy
    of the softmax, computed in float64.
    """
    logits = _as_array(logits).astype(np.float32, copy=False)
    labels = _as_array(labels).astype(np.int64, copy=False).reshape(-1)
    num_classes = logits.shape[1]
    if len(labels) == 0:
        return Evaluation(float("nan"), float("nan"), 0, np.zeros((num_classes, num_classes), np.int64))
    wide = logits.astype(np.float64)
    top = wide.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(wide - top).sum(axis=1)) + top[:, 0]
    loss = float(np.mean(log_norm - wide[np.arange(len(labels)), labels]))
    predicted = logits.argmax(axis=1)
    confusion = np.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    return Evaluation(
        loss=loss,
        accuracy=float((predicted == labels).mean()),
        n=len(labels),
        confusion=confusion.reshape(num_classes, num_classes).astype(np.int64),
    )


def _as_array(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch
        values = values.detach().cpu().numpy()
    return np.asarray(values)
