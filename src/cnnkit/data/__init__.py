"""Datasets for cnnkit: files -> arrays (N, C, H, W) with labels -> standardized float32 -> mini-batches."""

from cnnkit.data.dataset import Dataset, Split, Standardization, iterate_minibatches, minibatch_indices
from cnnkit.data.idx import read_idx
from cnnkit.data.sources import load_dataset

__all__ = [
    "Dataset",
    "Split",
    "Standardization",
    "iterate_minibatches",
    "load_dataset",
    "minibatch_indices",
    "read_idx",
]
