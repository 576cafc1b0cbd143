"""A dataset as a trained model takes it: images at the model's input shape, labels indexing its classes.

Used wherever a model meets a dataset (evaluate, resume, export's int8 calibration), for a checkpoint
(through its ModelRecord) and for an exported .onnx file (through its metadata) alike; NumPy only.
"""

import dataclasses

import numpy as np

from cnnkit.data.budget import MemoryBudget
from cnnkit.data.dataset import ALL_SPLIT, Dataset, Split, no_split_error, shape_text
from cnnkit.data.imagefolder import ALL_TEST
from cnnkit.data.sources import load_dataset
from cnnkit.errors import DatasetError


def load_dataset_for_model(
    source: str, input_shape, class_names, *, splits=None, test_files=None, progress=None
) -> Dataset:
    """Dataset `source` as a model with `input_shape` (C, H, W) and `class_names` takes it: folder
    images brought to its input shape, and labels re-indexed to the model's classes by class name.

    `splits`, `test_files` and `progress` are load_dataset's: the splits a folder decodes, and how a
    folder without train/ and test/ is split (see `scoring_test_files`).
    A dataset whose class names are just "0".."K-1" (it names no classes) is matched by position.
    A class the model does not know, or images of another shape, is a DatasetError naming it.
    """
    input_shape = tuple(input_shape)
    channels, height, width = input_shape
    if source.startswith("folder:"):  # image files are brought to the input size, as training did
        dataset = load_dataset(
            source,
            image_size=(height, width),
            channels=channels,
            splits=splits,
            test_files=test_files,
            progress=progress,
        )
    else:
        dataset = load_dataset(source)
    if dataset.image_shape != input_shape:
        raise DatasetError(
            f"dataset {source!r} has images of shape {shape_text(dataset.image_shape)} but the model takes "
            f"{shape_text(input_shape)}"
        )
    return match_classes(dataset, class_names, source)


load_for_model = load_dataset_for_model  # its old name, kept for code that imports it


def scoring_test_files(source: str, trained_on: str | None, recorded, split: str = "test"):
    """How to split `source`, if it is a folder without train/ and test/, to score a model trained on
    dataset `trained_on` that recorded `recorded` as that folder's held-out test files (None: none).

    The model's own folder: the files it held out (none recorded, by a model trained before cnnkit
    recorded them: every image is training data, as it was for that model). Another folder: every image is test data for the
    "test" split (a folder of test photos), training data for "valid" and "train".
    """
    if source == trained_on:
        return tuple(recorded) if recorded is not None else ()
    return ALL_TEST if split in ("test", ALL_SPLIT) else ()


def split_for_model(
    source: str,
    input_shape,
    class_names,
    valid_size: int,
    split: str = "test",
    *,
    test_files=None,
    with_train: bool = False,
) -> tuple[Dataset, Split]:
    """`load_dataset_for_model`, and its split `split` to score the model on: "test", "valid", "train",
    or "all" (every image the source has, in one Split named "all").

    Only the split asked for is decoded from a folder (with `with_train`, the training split too: int8
    calibrates on it). "valid" and "train" are carved as training carved them (the last `valid_size`
    training images are "valid"). `test_files`: see `scoring_test_files`. Raises CnnkitError when the
    split is missing or empty.
    """
    if split == ALL_SPLIT:
        data = load_dataset_for_model(source, input_shape, class_names, test_files=test_files)
        return data, _every_image(data, source)
    splits = ("test",) if split == "test" else ("train",)
    data = load_dataset_for_model(
        source,
        input_shape,
        class_names,
        splits=None if with_train else splits,
        test_files=test_files,
    )
    if split != "test" and data.train is not None:
        data = data.split_validation(valid_size)
    chosen = getattr(data, split)
    if chosen is None or len(chosen) == 0:
        raise no_split_error(source, split)
    return data, chosen


def _every_image(data: Dataset, source: str) -> Split:
    """Every image of `data` in one Split named "all" (a copy, reserved in the data memory budget,
    where the dataset has more than one split)."""
    splits = data.splits
    if len(splits) == 1:
        return Split(splits[0].images, splits[0].labels, ALL_SPLIT)
    n = sum(len(s) for s in splits)
    shape = (n, *data.image_shape)
    MemoryBudget(held=data.nbytes).reserve(
        n * (int(np.prod(data.image_shape)) * splits[0].images.itemsize + 8),
        f"{source}: every image in one array ({shape_text(shape)})",
    )
    images = np.concatenate([s.images for s in splits])
    return Split(images, np.concatenate([s.labels for s in splits]), ALL_SPLIT)


def match_classes(dataset: Dataset, class_names, source: str) -> Dataset:
    """`dataset` with labels indexing `class_names` (a model's outputs) instead of its own names."""
    model_names = list(class_names)
    own = list(dataset.class_names)
    if own == model_names:
        return dataset
    if own == [str(i) for i in range(len(own))] and len(own) <= len(model_names):
        mapping = np.arange(len(own))  # the dataset names no classes: its labels are output indices
    else:
        present = set()
        for split in dataset.splits:
            present.update(np.unique(split.labels).tolist())
        unknown = [own[i] for i in sorted(present) if own[i] not in model_names]
        if unknown:
            raise DatasetError(
                f"dataset {source!r} has class {unknown[0]!r}, which the model does not know "
                f"(it knows {', '.join(model_names[:12])}{', ...' if len(model_names) > 12 else ''})"
            )
        mapping = np.array([model_names.index(n) if n in model_names else -1 for n in own], dtype=np.int64)
    splits = {s.name: Split(s.images, mapping[s.labels], s.name) for s in dataset.splits}
    return dataclasses.replace(dataset, class_names=model_names, **splits)
