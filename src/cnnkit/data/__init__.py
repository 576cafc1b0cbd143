"""Datasets for cnnkit: files -> arrays (N, C, H, W) with labels -> standardized float32 -> mini-batches."""

from cnnkit.data.dataset import Dataset, Split, Standardization, iterate_minibatches, minibatch_indices
from cnnkit.data.idx import read_idx

__all__ = ["Dataset", "Split", "Standardization", "iterate_minibatches", "minibatch_indices", "read_idx"]
