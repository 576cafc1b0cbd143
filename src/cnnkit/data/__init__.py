"""Datasets for cnnkit: files -> arrays (N, C, H, W) with labels -> standardized float32 -> mini-batches.

`load_dataset(source)` reads one of: mnist-5k, mnist, fashion-mnist, idx:DIR, npz:FILE, folder:DIR
(see `cnnkit.data.sources`); `resolve_source` makes a source's path absolute. The Dataset it returns
holds train/valid/test Splits, class names (at most MAX_CLASSES) and how `predict` prepares photos;
`split_validation` carves the validation split, `Standardization` holds the training statistics,
`minibatch_indices` / `iterate_minibatches` make the batches; `load_dataset_for_model` / `split_for_model`
bring a dataset to a trained model's input shape and classes (`scoring_test_files`: which images of a
folder without train/ and test/ are its test split). A folder's decoded images are cached on disk
(`cnnkit.data.cache`). Every array made from a source counts against one data memory budget
(`data_memory_limit`, $CNNKIT_MAX_DATA_MB), reserved in a `MemoryBudget` before it is made (see
`cnnkit.data.budget`).
"""

from cnnkit.data.budget import MemoryBudget, data_memory_limit
from cnnkit.data.dataset import (
    MAX_CLASSES,
    Dataset,
    Split,
    Standardization,
    iterate_minibatches,
    minibatch_indices,
)
from cnnkit.data.idx import read_idx
from cnnkit.data.info import info_table
from cnnkit.data.matching import (
    load_dataset_for_model,
    load_for_model,
    match_classes,
    scoring_test_files,
    split_for_model,
)
from cnnkit.data.sources import load_dataset, resolve_source

__all__ = [
    "MAX_CLASSES",
    "Dataset",
    "MemoryBudget",
    "Split",
    "Standardization",
    "data_memory_limit",
    "info_table",
    "iterate_minibatches",
    "load_dataset",
    "load_dataset_for_model",
    "load_for_model",
    "match_classes",
    "minibatch_indices",
    "read_idx",
    "resolve_source",
    "scoring_test_files",
    "split_for_model",
]
