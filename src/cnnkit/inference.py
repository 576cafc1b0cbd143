"""Using a network: logits, probabilities, labels and evaluation metrics, in inference mode, batched."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.device import autocast

# Images per forward pass of a float network on a CPU. Larger batches are slower here: the first
# layer's activations for 1,000 images (74 MB in fp32) spill out of the cache, and max-pooling and
# ReLU then wait on memory (bf16 on 2 cores: 25,000 images/s in batches of 256, 17,000 in batches of
# 1,000). Anything from 128 to 384 is as fast. GPUs and int8 networks prefer large batches.
CPU_FLOAT_BATCH = 256
LARGE_BATCH = 1000


def default_batch_size(model, device) -> int:
    """How many images `predict_logits` gives `model` per forward pass on `device` by default."""
    if torch.device(device).type == "cpu" and not getattr(model, "prefers_large_batches", False):
        return CPU_FLOAT_BATCH
    return LARGE_BATCH


def predict_logits(model, images, batch_size=None, device=None, precision="fp32") -> torch.Tensor:
    """Logits (N, K) float32 on the CPU for standardized images (N, C, H, W) (NumPy array or tensor).

    Images go through the network `batch_size` at a time (default: `default_batch_size`).
    """
    device = device or next(model.parameters(), torch.empty(0)).device
    batch_size = batch_size or default_batch_size(model, device)
    images = torch.as_tensor(images)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(device, torch.float32)
                with autocast(device, precision):
                    outputs.append(model(batch).float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.empty(0, model.arch.num_classes)
    return torch.cat(outputs)


def predict_proba(model, images, **kwargs) -> np.ndarray:
    """Class probabilities (N, K), each row summing to 1: the chapter's predict(return_proba=True)."""
    return torch.softmax(predict_logits(model, images, **kwargs), dim=1).numpy()


def predict_labels(model, images, **kwargs) -> np.ndarray:
    """Predicted class indices (N,): the chapter's predict(return_proba=False)."""
    return predict_logits(model, images, **kwargs).argmax(dim=1).numpy()


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


def evaluate(model, images, labels, batch_size=None, device=None, precision="fp32") -> Evaluation:
    """Mean cross-entropy, accuracy and confusion matrix of `model` on standardized images and labels."""
    num_classes = model.arch.num_classes
    logits = predict_logits(model, images, batch_size=batch_size, device=device, precision=precision)
    labels = torch.as_tensor(labels).to("cpu", torch.int64)  # a NumPy array, or a tensor on any device
    if len(labels) == 0:
        return Evaluation(float("nan"), float("nan"), 0, np.zeros((num_classes, num_classes), np.int64))
    loss = F.cross_entropy(logits, labels).item()
    predicted = logits.argmax(dim=1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).numpy()
    return Evaluation(
        loss=loss,
        accuracy=float((predicted == labels).double().mean()),
        n=len(labels),
        confusion=confusion,
    )
