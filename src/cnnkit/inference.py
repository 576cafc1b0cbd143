"""Using a network: logits, probabilities, labels and evaluation metrics, in inference mode, batched."""

import numpy as np
import torch

from cnnkit.device import autocast
from cnnkit.kernels.cpu import keep_freed_memory
from cnnkit.metrics import Evaluation, evaluate_logits

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
    keep_freed_memory()
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


def evaluate(model, images, labels, batch_size=None, device=None, precision="fp32") -> Evaluation:
    """Mean cross-entropy, accuracy and confusion matrix of `model` on standardized images and labels."""
    logits = predict_logits(model, images, batch_size=batch_size, device=device, precision=precision)
    return evaluate_logits(logits, labels)


# Test-time augmentation (--tta): the image itself and its 1-pixel shifts up, down, left and right (the
# border repeated), each also mirrored left-right when the model was trained with flips; the views'
# probabilities are averaged.
TTA_SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


def tta_views(images, flip: bool = False) -> list[torch.Tensor]:
    """The TTA views of images (N, C, H, W): 5 shifted copies, or 10 with their mirrors."""
    images = torch.as_tensor(images)
    padded = torch.nn.functional.pad(images.float(), (1, 1, 1, 1), mode="replicate")
    height, width = images.shape[-2:]
    views = [padded[..., 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width] for dy, dx in TTA_SHIFTS]
    if flip:
        views += [torch.flip(view, dims=[-1]) for view in views]
    return views


def predict_proba_tta(model, images, flip: bool = False, **kwargs) -> np.ndarray:
    """`predict_proba` averaged over `tta_views(images, flip)`."""
    return np.mean([predict_proba(model, view, **kwargs) for view in tta_views(images, flip)], axis=0)


def average_probabilities(members, raw_images, tta: bool = False, **kwargs) -> np.ndarray:
    """An ensemble's class probabilities (N, K) for raw images (N, C, H, W): the mean of its members'.

    members: (model, record) pairs; each standardizes the images with its own record's statistics
    (and, with `tta`, mirrors them only if it was trained with flips).
    """
    total = None
    for model, record in members:
        images = record.standardization.apply(raw_images)
        if tta:
            proba = predict_proba_tta(model, images, flip=record.config.flip, **kwargs)
        else:
            proba = predict_proba(model, images, **kwargs)
        total = proba if total is None else total + proba
    return total / len(members)


def log_probabilities(probabilities) -> np.ndarray:
    """log p (N, K) float32, with 0 taken as the smallest float32: logits whose softmax is `probabilities`."""
    return np.log(np.maximum(np.asarray(probabilities, np.float32), np.finfo(np.float32).tiny))


def evaluate_probabilities(probabilities, labels) -> Evaluation:
    """`evaluate_logits` for averaged probabilities (N, K): the loss is the mean of -log p(true class)."""
    return evaluate_logits(log_probabilities(probabilities), labels)
