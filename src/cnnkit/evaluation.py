"""A trained model meets a labelled split: which images it is scored on, and the numbers it gets.

`cnnkit evaluate` and `cnnkit report` both go through `evaluation_split` and `evaluate_split`, so
report.json's accuracy and confusion matrix are exactly what `cnnkit evaluate --json` prints; an
ensemble of models (`load_ensemble`) and test-time augmentation go through `evaluate_ensemble`.
"""

from dataclasses import dataclass

import numpy as np
import torch

from cnnkit.checkpoint import load_network
from cnnkit.data import Dataset, Split, resolve_source, scoring_test_files, split_for_model
from cnnkit.errors import CheckpointError, no_dataset_recorded
from cnnkit.inference import average_probabilities, log_probabilities, predict_logits
from cnnkit.metrics import Evaluation, evaluate_logits
from cnnkit.record import ModelRecord


@dataclass
class SplitEvaluation:
    """One pass of a model over a split: the metrics, `cnnkit evaluate --json`'s object, and the logits (N, K)."""

    evaluation: Evaluation
    numbers: dict
    logits: torch.Tensor

    @property
    def probabilities(self) -> np.ndarray:
        return torch.softmax(self.logits, dim=1).numpy()


def evaluation_split(
    record: ModelRecord,
    checkpoint_path,
    dataset: str | None = None,
    split: str = "test",
    with_train: bool = False,
) -> tuple[str, Dataset, Split]:
    """The source, the dataset as the model takes it, and its split `split` ("test", "valid", "train",
    or "all": every image the source has).

    `dataset` is a source string (default: the one the model was trained on). "valid" and "train" are
    carved as training carved them (the last `record.valid_size` training images are "valid"). Of a
    folder, only the split asked for is decoded (`with_train`: the training split too). A folder
    without train/ and test/ is split as `cnnkit.data.scoring_test_files` says: the model's own by the
    test files its record lists, another as test images only. Raises CnnkitError when the split is
    missing or empty.
    """
    source = resolve_source(dataset) if dataset else record.dataset
    if source is None:
        raise no_dataset_recorded(checkpoint_path)
    arch = record.architecture
    test_files = scoring_test_files(source, record.dataset, record.test_files, split)
    data, chosen = split_for_model(
        source,
        arch.input_shape,
        record.class_names,
        record.valid_size,
        split,
        test_files=test_files,
        with_train=with_train,
    )
    return source, data, chosen


def evaluate_split(
    model, ckpt, source: str, split: Split, precision: str, device, batch_size=None
) -> SplitEvaluation:
    """Run `model` (of checkpoint `ckpt`) once over `split`, standardized with the checkpoint's statistics.

    `precision` is what runs ("fp32" or "bf16"; "int8" for a quantized model, which computes in fp32).
    `numbers` is the JSON object of `cnnkit evaluate --json`: checkpoint, epoch, dataset, split,
    precision, device, accuracy, loss, n, per_class and confusion_matrix.
    """
    record = ckpt.record
    logits = predict_logits(
        model,
        record.standardization.apply(split.images),
        batch_size,
        precision="fp32" if precision == "int8" else precision,
    )
    result = evaluate_logits(logits, split.labels)
    numbers = {"checkpoint": str(ckpt.path), "epoch": record.epoch}
    numbers.update(_scored(source, split, precision, device, result, record.class_names))
    return SplitEvaluation(result, numbers, logits)


def load_ensemble(paths, which=None, device="cpu") -> list:
    """The models of several checkpoints (run folders or files), as (model, Checkpoint) pairs, for averaging.

    They must share their class names and input shape: a CheckpointError names the first that does not.
    """
    members = [load_network(path, which, device) for path in paths]
    first = members[0][1]
    for _, ckpt in members[1:]:
        for what, value, expected in (
            ("classes", ckpt.record.class_names, first.record.class_names),
            ("input shape", ckpt.record.architecture.input_shape, first.record.architecture.input_shape),
        ):
            if value != expected:
                raise CheckpointError(
                    f"{ckpt.path}: an ensemble's models must share their {what}; "
                    f"{first.path} has {_brief(expected)}, this one {_brief(value)}"
                )
    return members


def evaluate_ensemble(
    members, source: str, split: Split, precision: str, device, batch_size=None, tta: bool = False
) -> SplitEvaluation:
    """`evaluate_split` for the averaged probabilities of `members` (see `load_ensemble`), with or
    without test-time augmentation (`inference.TTA_SHIFTS`). `numbers` names every model."""
    proba = average_probabilities(
        [(model, ckpt.record) for model, ckpt in members],
        split.images,
        tta=tta,
        batch_size=batch_size,
        precision=precision,
    )
    logits = torch.from_numpy(log_probabilities(proba))
    result = evaluate_logits(logits, split.labels)
    numbers = {
        "checkpoint": " + ".join(str(ckpt.path) for _, ckpt in members),
        "epoch": members[0][1].record.epoch if len(members) == 1 else None,
        "models": [{"checkpoint": str(ckpt.path), "epoch": ckpt.record.epoch} for _, ckpt in members],
        "tta": tta,
    }
    numbers.update(_scored(source, split, precision, device, result, members[0][1].record.class_names))
    return SplitEvaluation(result, numbers, logits)


def _scored(source: str, split: Split, precision: str, device, result: Evaluation, class_names) -> dict:
    """The part of `cnnkit evaluate --json` after the model: what it was scored on, how, and the metrics."""
    numbers = {"dataset": source, "split": split.name, "precision": precision, "device": str(device)}
    numbers.update(result.to_dict(class_names))
    return numbers


def _brief(values) -> str:
    values = list(values)
    return ", ".join(map(str, values[:6])) + (", ..." if len(values) > 6 else "")
