import json

import numpy as np
import pytest

from cnnkit.data import MAX_CLASSES, Dataset, Split, Standardization, iterate_minibatches, minibatch_indices
from cnnkit.data.dataset import images_as_nchw, infer_preprocessing
from cnnkit.errors import DatasetError


def make_dataset(n_train=60, n_test=10, shape=(1, 2, 3)):
    rng = np.random.default_rng(0)
    train = Split(rng.integers(0, 256, (n_train, *shape), dtype=np.uint8), np.arange(n_train) % 3, "train")
    test = Split(rng.integers(0, 256, (n_test, *shape), dtype=np.uint8), np.arange(n_test) % 3, "test")
    return Dataset("fake", ["a", "b", "c"], train=train, test=test)


# --- Split and Dataset ---


def test_split_holds_nchw_images_and_int64_labels():
    split = Split(np.zeros((4, 1, 2, 2), np.uint8), np.array([0, 1, 0, 1], dtype=np.uint8), "test")
    assert len(split) == 4 and split.labels.dtype == np.int64


@pytest.mark.parametrize(
    ("images", "labels", "name", "message"),
    [
        (np.zeros((4, 2, 2), np.uint8), np.zeros(4), "train", r"expected \(N, C, H, W\)"),
        (np.zeros((4, 1, 2, 2), np.uint8), np.zeros(3), "train", "4 images but labels of shape"),
        (np.zeros((4, 1, 2, 2), np.uint8), np.zeros(4), "validation", "not one of"),
    ],
)
def test_split_rejects_inconsistent_parts(images, labels, name, message):
    with pytest.raises(DatasetError, match=message):
        Split(images, labels, name)


def test_dataset_knows_its_image_shape_and_splits():
    ds = make_dataset()
    assert ds.image_shape == (1, 2, 3)
    assert [s.name for s in ds.splits] == ["train", "test"] and ds.valid is None


def test_dataset_rejects_splits_of_different_shapes_and_labels_beyond_the_classes():
    train = Split(np.zeros((2, 1, 2, 2), np.uint8), [0, 1], "train")
    with pytest.raises(DatasetError, match="test images are 1 x 3 x 3 but train images are 1 x 2 x 2"):
        Dataset("x", ["a", "b"], train=train, test=Split(np.zeros((2, 1, 3, 3), np.uint8), [0, 1], "test"))
    with pytest.raises(DatasetError, match=r"labels range 0\.\.1 but there are 1 class names"):
        Dataset("x", ["a"], train=train)
    with pytest.raises(DatasetError, match="no train, valid or test split"):
        Dataset("x", ["a"])


# --- split_validation ---


def test_split_validation_takes_the_last_images_of_train():
    ds = make_dataset(n_train=60)
    split = ds.split_validation(15)
    assert len(split.train) == 45 and len(split.valid) == 15 and split.test is ds.test
    np.testing.assert_array_equal(split.valid.images, ds.train.images[45:])
    np.testing.assert_array_equal(split.valid.labels, ds.train.labels[45:])
    np.testing.assert_array_equal(split.train.images, ds.train.images[:45])
    assert split.valid.name == "valid" and ds.valid is None


def test_split_validation_default_is_the_chapters_10000_or_a_sixth():
    assert len(make_dataset(n_train=60).split_validation().valid) == 10
    big = Dataset("big", ["a"], train=Split(np.zeros((66_000, 1, 1, 1), np.uint8), np.zeros(66_000), "train"))
    split = big.split_validation()
    assert len(split.valid) == 10_000 and len(split.train) == 56_000


def test_split_validation_accepts_a_fraction_and_zero():
    ds = make_dataset(n_train=60)
    assert len(ds.split_validation(0.25).valid) == 15
    assert ds.split_validation(0).valid is None


@pytest.mark.parametrize(
    ("valid_size", "message"),
    [
        (60, "leaves no training images"),
        (61, "leaves no training images"),
        (-1, "must not be negative"),
        (1.0, "strictly between 0 and 1"),
        (0.001, "less than one image"),
        (True, "a count or a fraction"),
        ("10", "a count or a fraction"),
    ],
)
def test_split_validation_rejects_impossible_sizes(valid_size, message):
    with pytest.raises(DatasetError, match=message):
        make_dataset(n_train=60).split_validation(valid_size)


def test_split_validation_needs_a_training_split_and_no_validation_split_yet():
    ds = make_dataset().split_validation(5)
    with pytest.raises(DatasetError, match="already has a validation split"):
        ds.split_validation(5)
    test_only = Dataset("t", ["a", "b", "c"], test=make_dataset().test)
    with pytest.raises(DatasetError, match="no training split"):
        test_only.split_validation()


# --- Standardization ---


def test_standardization_fits_each_channel_in_float64():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 3, 4, 5), dtype=np.uint8)
    stats = Standardization.fit(images)
    wide = images.astype(np.float64)
    np.testing.assert_allclose(stats.mean, wide.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats.std, wide.std(axis=(0, 2, 3)), rtol=1e-12)


def test_standardization_comes_from_the_training_split_only():
    train = Split(
        np.full((10, 1, 2, 2), 10, np.uint8) + np.arange(4, dtype=np.uint8).reshape(2, 2), [0] * 10, "train"
    )
    test = Split(np.full((10, 1, 2, 2), 200, np.uint8), [0] * 10, "test")
    ds = Dataset("d", ["a"], train=train, test=test)
    stats = Standardization.fit(ds.train.images)
    assert stats.mean == (11.5,)
    # The test split, standardized with the training statistics, is far from mean 0.
    assert Standardization.fit(ds.test.images).mean == (200.0,)
    assert stats.apply(ds.test.images).mean() > 50


def test_standardization_apply_gives_float32_zero_mean_unit_std():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (40, 3, 6, 6), dtype=np.uint8)
    out = Standardization.fit(images).apply(images)
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, atol=1e-5)


def test_standardization_apply_leaves_its_input_alone():
    images = np.ones((2, 1, 2, 2), np.float32)
    Standardization((0.5,), (2.0,)).apply(images)
    assert (images == 1).all()


def test_constant_channel_gets_std_one():
    images = np.zeros((5, 2, 3, 3), np.uint8)
    images[:, 1] = 7
    stats = Standardization.fit(images)
    assert stats.std == (1.0, 1.0) and stats.mean == (0.0, 7.0)
    assert not np.isnan(stats.apply(images)).any()


def test_standardization_round_trips_through_json():
    stats = Standardization.fit(np.random.default_rng(3).integers(0, 256, (8, 3, 4, 4), dtype=np.uint8))
    assert Standardization.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


@pytest.mark.parametrize(
    "data", [{"mean": [1.0]}, {"mean": [1.0], "std": [0.0]}, {"mean": [1, 2], "std": [1]}, None]
)
def test_malformed_standardization_data_is_rejected(data):
    with pytest.raises(DatasetError, match="standardization"):
        Standardization.from_dict(data)


def test_standardization_rejects_images_with_other_channels():
    with pytest.raises(DatasetError, match="1 channel"):
        Standardization((0.0,), (1.0,)).apply(np.zeros((2, 3, 4, 4)))


# --- mini-batches ---


def test_batch_order_depends_only_on_seed_and_epoch():
    first = minibatch_indices(100, 16, seed=7, epoch=3)
    again = minibatch_indices(100, 16, seed=7, epoch=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    next_epoch = np.concatenate(minibatch_indices(100, 16, seed=7, epoch=4))
    other_seed = np.concatenate(minibatch_indices(100, 16, seed=8, epoch=3))
    assert not np.array_equal(np.concatenate(first), next_epoch)
    assert not np.array_equal(np.concatenate(first), other_seed)


def test_every_index_once_per_epoch_and_the_last_partial_batch_is_kept():
    batches = minibatch_indices(100, 16, seed=1, epoch=1)
    assert [len(b) for b in batches] == [16] * 6 + [4]
    assert all(b.dtype == np.int64 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(100))


def test_no_shuffle_keeps_the_order():
    batches = minibatch_indices(10, 4, shuffle=False)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_no_seed_draws_fresh_orders():
    assert not np.array_equal(
        np.concatenate(minibatch_indices(1000)), np.concatenate(minibatch_indices(1000))
    )


def test_empty_input_gives_no_batches():
    assert minibatch_indices(0, 8, seed=0) == []


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_bad_batch_size_is_rejected(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        minibatch_indices(10, batch_size)


def test_iterate_minibatches_keeps_images_and_labels_together():
    X = np.arange(10 * 3).reshape(10, 3)
    y = np.arange(10)
    batches = list(iterate_minibatches(X, y, batch_size=4, seed=0, epoch=2))
    assert [len(b) for _, b in batches] == [4, 4, 2]
    for xb, yb in batches:
        np.testing.assert_array_equal(xb[:, 0], yb * 3)
    order = np.concatenate(minibatch_indices(10, 4, seed=0, epoch=2))
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), order)


def test_iterate_minibatches_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="X has 3 rows but y has 2"):
        next(iterate_minibatches(np.zeros((3, 1)), np.zeros(2)))


def test_images_as_nchw_accepts_the_usual_forms_and_names_what_is_wrong():
    x = np.arange(2 * 28 * 28 * 3).reshape(2, 28, 28, 3)
    np.testing.assert_array_equal(images_as_nchw(x, allow_nhwc=True), x.transpose(0, 3, 1, 2))
    assert images_as_nchw(x).shape == (2, 28, 28, 3)  # without allow_nhwc, 4-D is taken as (N, C, H, W)
    assert images_as_nchw(np.zeros((2, 784))).shape == (2, 1, 28, 28)
    assert images_as_nchw(np.zeros((2, 5, 7))).shape == (2, 1, 5, 7)
    with pytest.raises(ValueError, match="rows of 780 values are not square"):
        images_as_nchw(np.zeros((2, 780)))
    with pytest.raises(ValueError, match=r"has shape \(2, 5, 5, 5\); expected .*\(N, H, W, C\)"):
        images_as_nchw(np.zeros((2, 5, 5, 5)), allow_nhwc=True)
    with pytest.raises(ValueError, match="has dtype bool"):
        images_as_nchw(np.zeros((2, 784), bool))


# --- preprocessing, notes and the class limit ---


def test_preprocessing_and_notes_survive_split_validation():
    images = np.zeros((12, 1, 4, 4), np.uint8)
    ds = Dataset(
        "d", ["a", "b"], train=Split(images, np.arange(12) % 2, "train"), preprocessing="object", notes=["n"]
    )
    assert ds.notes == ("n",)
    split = ds.split_validation(3)
    assert split.preprocessing == "object" and split.notes == ("n",) and len(split.valid) == 3
    assert Dataset("d", ["a"], test=Split(images[:1], [0], "test")).preprocessing == "resize"


def test_dataset_refuses_too_many_classes_and_an_unknown_preprocessing():
    split = Split(np.zeros((1, 1, 2, 2), np.uint8), [0], "test")
    Dataset("d", [str(i) for i in range(MAX_CLASSES)], test=split)
    with pytest.raises(DatasetError, match="10,001 classes is over cnnkit's limit of 10,000"):
        Dataset("d", [str(i) for i in range(MAX_CLASSES + 1)], test=split)
    with pytest.raises(DatasetError, match="preprocessing 'sharpen' is not one of digit, object, resize"):
        Dataset("d", ["a"], test=split, preprocessing="sharpen")


def _drawn(n, shape, background, ink, dtype=np.uint8):
    images = np.full((n, *shape), background, dtype=dtype)
    images[..., shape[1] // 4 : shape[1] // 2, shape[2] // 3 : shape[2] // 2] = ink
    return images


DIGIT_NAMES = [str(d) for d in range(10)]


def _filling(n, shape):
    images = np.zeros((n, *shape), np.uint8)
    images[..., 3:-3, 1:-1] = 200  # the object spans the whole width
    return images


@pytest.mark.parametrize(
    ("images", "class_names", "expected"),
    [
        (_drawn(5, (1, 28, 28), 0, 255), DIGIT_NAMES, "digit"),
        (_drawn(5, (1, 28, 28), 0, 255), ["cat", "dog"], "resize-dark"),  # small shapes: kept in place
        (_drawn(5, (1, 32, 32), 0, 255), DIGIT_NAMES, "resize-dark"),
        (_drawn(5, (3, 28, 28), 10, 240), DIGIT_NAMES, "resize-dark"),  # gray stored as RGB
        (_filling(5, (1, 28, 28)), ["shirt", "shoe"], "object"),  # fills its frame, as Fashion-MNIST
        (_drawn(5, (1, 28, 28), 255, 0), DIGIT_NAMES, "resize"),  # dark on light: kept as stored
        (_drawn(5, (3, 8, 8), 0, 0) + np.array([0, 90, 200], np.uint8)[:, None, None], ["a"], "resize"),
        (_drawn(5, (1, 28, 28), -1.0, 1.0, np.float32), DIGIT_NAMES, "digit"),  # the chapter's scaled MNIST
        (np.zeros((0, 1, 28, 28), np.uint8), DIGIT_NAMES, "resize"),
    ],
)
def test_infer_preprocessing_follows_how_the_images_look(images, class_names, expected):
    style, reason = infer_preprocessing(images, class_names)
    assert style == expected and reason and "\n" not in reason
