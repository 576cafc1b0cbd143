"""Shared fixtures: small real datasets and one trained run, made once per test session."""

import numpy as np
import pytest

from cnnkit.data import load_dataset


@pytest.fixture(scope="session")
def mnist_5k():
    return load_dataset("mnist-5k")


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory, mnist_5k):
    """npz:FILE source with 640 training and 200 test digits (real MNIST, from mnist-5k), Keras layout."""
    path = tmp_path_factory.mktemp("data") / "small.npz"
    train, test = mnist_5k.train, mnist_5k.test
    np.savez(
        path,
        x_train=train.images[:640, 0],
        y_train=train.labels[:640],
        x_test=test.images[:200, 0],
        y_test=test.labels[:200],
    )
    return f"npz:{path}"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run folder holding the chapter's CNN trained for 6 epochs on mnist-5k (about 94% test accuracy)."""
    from cnnkit.recipes import TrainConfig
    from cnnkit.runs import start_run

    run_dir = tmp_path_factory.mktemp("runs") / "mnist-5k"
    start_run("mnist-5k", TrainConfig(epochs=6, seed=0, precision="auto"), run_dir, log=lambda line: None)
    return run_dir
