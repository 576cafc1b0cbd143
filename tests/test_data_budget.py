"""The data memory budget (cnnkit.data.budget) and the arrays that count against it."""

import tracemalloc

import numpy as np
import pytest
import torch

from cnnkit.data import Dataset, MemoryBudget, Split, Standardization, data_memory_limit, load_dataset
from cnnkit.data.budget import BUDGET_ENV, DEFAULT_MAX_BYTES, MB, array_bytes
from cnnkit.data.dataset import infer_preprocessing
from cnnkit.errors import DatasetError
from cnnkit.runs import to_tensors


@pytest.mark.parametrize(("text", "limit"), [("512", 512 * MB), ("0.5", MB // 2), (" 64 ", 64 * MB)])
def test_the_variable_sets_the_budget_in_megabytes(monkeypatch, text, limit):
    monkeypatch.setenv(BUDGET_ENV, text)
    assert data_memory_limit() == limit


def test_the_default_budget_is_at_most_the_fixed_cap(monkeypatch):
    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert 0 < data_memory_limit() <= DEFAULT_MAX_BYTES
    monkeypatch.setenv(BUDGET_ENV, "")  # empty means unset
    assert 0 < data_memory_limit() <= DEFAULT_MAX_BYTES


@pytest.mark.parametrize("text", ["lots", "0", "-5", "inf", "nan"])
def test_a_variable_that_is_not_a_positive_number_is_one_line_error(monkeypatch, text):
    monkeypatch.setenv(BUDGET_ENV, text)
    with pytest.raises(DatasetError, match=f"{BUDGET_ENV}='{text}': expected a positive number of megabytes"):
        MemoryBudget()


def test_reserve_counts_what_is_held_and_refuses_what_would_not_fit(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "10")
    budget = MemoryBudget(held=4 * MB)
    budget.reserve(6 * MB, "data.npz: X_train")
    with pytest.raises(DatasetError) as caught:
        budget.reserve(1, "data.npz: y_train (3 uint8)")
    assert str(caught.value) == (
        "data.npz: y_train (3 uint8) would take 1 bytes beside the 10 MB already loaded, over cnnkit's data "
        "memory budget of 10 MB; set CNNKIT_MAX_DATA_MB (megabytes) to allow more"
    )
    budget.release(2 * MB)
    budget.reserve(2 * MB, "data.npz: y_train")
    assert budget.held == 10 * MB


def test_array_bytes_counts_a_buffer_shared_by_views_once():
    images = np.zeros((10, 1, 4, 4), np.uint8)
    labels = np.zeros(10, np.int64)
    assert array_bytes(images[:7], images[7:], labels) == images.nbytes + labels.nbytes
    assert array_bytes(images.reshape(10, 16)[:, :8]) == images.nbytes


def test_a_datasets_bytes_do_not_change_when_validation_is_split_off():
    images = np.zeros((12, 1, 4, 4), np.uint8)
    dataset = Dataset("d", ["a", "b"], train=Split(images, np.arange(12) % 2, "train"))
    assert dataset.nbytes == images.nbytes + 12 * 8
    assert dataset.split_validation(3).nbytes == dataset.nbytes


def test_standardizing_reserves_its_float32_copy_beside_the_images(monkeypatch):
    images = np.zeros((64, 1, 64, 64), np.uint8)  # 256 KB; 1 MB as float32
    monkeypatch.setenv(BUDGET_ENV, "1")
    with pytest.raises(
        DatasetError, match=r"64 x 1 x 64 x 64 images standardized as float32 would take 1 MB"
    ):
        Standardization((0.0,), (1.0,)).apply(images)
    monkeypatch.setenv(BUDGET_ENV, "1.3")
    assert Standardization((0.0,), (1.0,)).apply(images).dtype == np.float32


def test_loading_an_npz_reserves_its_members_before_reading_them(monkeypatch, tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X_train=np.zeros((300, 1, 64, 64), np.uint8), y_train=np.arange(300) % 2)
    monkeypatch.setenv(BUDGET_ENV, "1")  # X_train is 1.2 MB
    with pytest.raises(DatasetError, match=r"d.npz: X_train \(300 x 1 x 64 x 64 uint8\) would take 1 MB"):
        load_dataset(f"npz:{path}")
    monkeypatch.setenv(BUDGET_ENV, "2")
    assert load_dataset(f"npz:{path}").nbytes == 300 * 64 * 64 + 300 * 8


def test_converting_npz_images_counts_both_copies(monkeypatch, tmp_path):
    path = tmp_path / "d.npz"  # int64 pixels (2.5 MB) become uint8 (0.3 MB): 2.8 MB while both exist
    np.savez(path, X_train=np.full((80, 64, 64), 7, np.int64), y_train=np.arange(80) % 2)
    monkeypatch.setenv(BUDGET_ENV, "2.7")
    with pytest.raises(DatasetError, match=r"d.npz: X_train as 80 x 1 x 64 x 64 uint8 images would take"):
        load_dataset(f"npz:{path}")
    monkeypatch.setenv(BUDGET_ENV, "2.9")
    assert load_dataset(f"npz:{path}").train.images.dtype == np.uint8


def test_resizing_a_folder_reserves_the_resized_images(monkeypatch, tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "1.png")
    monkeypatch.setenv(BUDGET_ENV, "1")  # 2 images of 1 x 1024 x 1024 need 2 MB
    with pytest.raises(DatasetError, match=r": 2 x 1 x 1024 x 1024 uint8 images would take 2 MB"):
        load_dataset(f"folder:{tmp_path}", image_size=(1024, 1024))
    assert load_dataset(f"folder:{tmp_path}", image_size=(256, 256)).image_shape == (1, 256, 256)


def test_to_tensors_standardizes_chunk_by_chunk_exactly_as_a_whole(monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3000, 3, 32, 32), dtype=np.uint8)  # 9.2 M values: three chunks
    split = Split(images, np.arange(3000) % 2, "train")
    std = Standardization.fit(images)
    budget = MemoryBudget(held=images.nbytes)
    tensor, labels = to_tensors(split, std, torch.device("cpu"), budget, "test-data")
    assert torch.equal(labels, torch.from_numpy(split.labels))
    assert tensor.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(tensor, torch.from_numpy(std.apply(images)))
    assert budget.held == images.nbytes + 4 * images.size
    monkeypatch.setenv(BUDGET_ENV, "40")  # 9 MB of images and 35 MB as float32
    with pytest.raises(DatasetError, match="test-data: the train images standardized as float32"):
        to_tensors(split, std, torch.device("cpu"), MemoryBudget(held=images.nbytes), "test-data")


def test_statistics_of_one_large_image_need_no_copy_of_it():
    image = np.zeros((1, 1, 8192, 8192), np.uint8)  # 64 M values: 512 MB as float64, 256 MB as float32
    image[0, 0, 2048:6144, 2048:6144] = 200
    tracemalloc.start()
    try:
        stats = Standardization.fit(image)
        style, _ = infer_preprocessing(image, ["a", "b"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.mean == pytest.approx((50.0,))
    assert style == "resize-dark"
    assert peak < 128 * MB, f"{peak / MB:.0f} MB"
