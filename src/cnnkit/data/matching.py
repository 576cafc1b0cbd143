"""A dataset as a trained model takes it: images at the model's input shape, labels indexing its classes.

Used wherever a model meets a dataset (evaluate, resume, export's int8 calibration), for a checkpoint
(through its ModelRecord) and for an exported .onnx file (through its metadata) alike; NumPy only.
"""

import dataclasses

import numpy as np

from cnnkit.data.dataset import Dataset, Split, shape_text
from cnnkit.data.sources import load_dataset
from cnnkit.errors import DatasetError


def load_dataset_for_model(source: str, input_shape, class_names) -> Dataset:
    """Dataset `source` as a model with `input_shape` (C, H, W) and `class_names` takes it: folder
    images brought to its input shape, and labels re-indexed to the model's classes by class name.

    A dataset whose class names are just "0".."K-1" (it names no classes) is matched by position.
    A class the model does not know, or images of another shape, is a DatasetError naming it.
    """
    input_shape = tuple(input_shape)
    channels, height, width = input_shape
    if source.startswith("folder:"):  # image files are brought to the input size, as training did
        dataset = load_dataset(source, image_size=(height, width), channels=channels)
    else:
        dataset = load_dataset(source)
    if dataset.image_shape != input_shape:
        raise DatasetError(
            f"dataset {source!r} has images of shape {shape_text(dataset.image_shape)} but the model takes "
            f"{shape_text(input_shape)}"
        )
    return match_classes(dataset, class_names, source)


load_for_model = load_dataset_for_model  # its old name, kept for code that imports it


def split_for_model(
    source: str, input_shape, class_names, valid_size: int, split: str = "test"
) -> tuple[Dataset, Split]:
    """`load_dataset_for_model`, and its split `split` ("test", "valid" or "train") to score the model on.

    "valid" and "train" are carved as training carved them (the last `valid_size` training images are
    "valid"). Raises CnnkitError when the split is missing or empty.
    """
    data = load_dataset_for_model(source, input_shape, class_names)
    if split != "test" and data.train is not None:
        data = data.split_validation(valid_size)
    chosen = getattr(data, split)
    if chosen is None or len(chosen) == 0:
        raise DatasetError(f"dataset {source!r} has no {split} split; try --split valid or another --dataset")
    return data, chosen


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
