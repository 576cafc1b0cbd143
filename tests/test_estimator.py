"""ConvNN: the chapter's class as a scikit-learn estimator."""

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import StratifiedKFold, cross_val_score

from cnnkit import ConvNN
from cnnkit.checkpoint import read_record
from cnnkit.recipes import learning_rate_at

# A small network, so that each fit takes a fraction of a second on a shared CPU.
SMALL = {"conv_channels": (8, 16), "hidden_units": 64, "learning_rate": 1e-3, "precision": "fp32"}
TINY = {"conv_channels": (2, 4), "hidden_units": 8, "precision": "fp32"}
FAST_CHECKPOINT = "tests/data/v1/epoch-002.safetensors"  # `cnnkit train --recipe fast`, a tiny network


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits(mnist_5k):
    """1,000 training and 300 test digits as the chapter holds them: rows of 784 floats."""
    train, test = mnist_5k.train, mnist_5k.test
    rows = lambda images: images.reshape(len(images), -1).astype(np.float64)  # noqa: E731
    return rows(train.images[:1000]), train.labels[:1000], rows(test.images[:300]), test.labels[:300]


@pytest.fixture(scope="module")
def fitted(digits):
    X, y, _, _ = digits
    return ConvNN(epochs=4, random_state=123, **SMALL).fit(X, y)


def test_fit_returns_self_and_learns(digits, fitted):
    _, _, X_test, y_test = digits
    assert isinstance(fitted, ConvNN)
    assert fitted.score(X_test, y_test) > 0.8
    assert [h["epoch"] for h in fitted.history_] == [1, 2, 3, 4]
    assert list(fitted.classes_) == list(range(10))
    assert fitted.n_features_in_ == 784 and fitted.input_shape_ == (1, 28, 28)


def test_predict_and_predict_proba_agree(digits, fitted):
    _, _, X_test, _ = digits
    proba = fitted.predict_proba(X_test[:50])
    assert proba.shape == (50, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(fitted.predict(X_test[:50]), fitted.classes_[proba.argmax(axis=1)])


def test_input_forms_are_equivalent(digits, fitted):
    _, _, X_test, _ = digits
    rows = X_test[:20]
    expected = fitted.predict_proba(rows)
    np.testing.assert_allclose(fitted.predict_proba(rows.reshape(20, 28, 28)), expected, rtol=1e-6)
    np.testing.assert_allclose(fitted.predict_proba(rows.reshape(20, 1, 28, 28)), expected, rtol=1e-6)
    np.testing.assert_allclose(fitted.predict_proba(rows.reshape(20, 28, 28, 1)), expected, rtol=1e-6)


def test_nhwc_images_are_accepted_by_fit(digits):
    # (N, H, W, C) used to be read as (N, C, H, W) = 28 channels of 28 x 1 images: "too small".
    X, y, X_test, _ = digits
    gray = ConvNN(epochs=1, random_state=0, **TINY).fit(X[:128].reshape(-1, 28, 28, 1), y[:128])
    assert gray.input_shape_ == (1, 28, 28)
    rows = ConvNN(epochs=1, random_state=0, **TINY).fit(X[:128], y[:128])
    np.testing.assert_array_equal(gray.predict_proba(X_test[:10]), rows.predict_proba(X_test[:10]))
    color = np.random.default_rng(0).random((24, 16, 16, 3))
    model = ConvNN(epochs=1, random_state=0, **TINY).fit(color, np.arange(24) % 3)
    assert model.input_shape_ == (3, 16, 16) and model.n_features_in_ == 3 * 16 * 16
    assert model.predict(color.transpose(0, 3, 1, 2)).shape == (24,)


def test_string_labels_and_validation_data(digits):
    X, y, X_test, y_test = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    model = ConvNN(epochs=1, random_state=0, **TINY).fit(
        X[:300], names[y[:300]], validation_data=(X_test, names[y_test])
    )
    assert set(model.predict(X_test[:10])) <= set(names)
    # The epoch's validation accuracy is the trained model's score on the validation data (one epoch:
    # the model after it is the one that was measured).
    assert model.history_[0]["valid_accuracy"] == pytest.approx(model.score(X_test, names[y_test]), abs=1e-9)


def test_save_and_load_give_the_same_predictions(tmp_path, digits, fitted):
    _, _, X_test, _ = digits
    path = fitted.save(tmp_path / "convnn.safetensors")
    loaded = ConvNN.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X_test), fitted.predict_proba(X_test))
    # what was "auto" is what it chose: the chapter's network for gray digits
    assert loaded.get_params() == {**fitted.get_params(), "device": "auto", "arch": "chapter"}
    assert loaded.history_ == fitted.history_
    assert loaded.config_ == fitted.config_


def test_warm_start_continues_like_the_chapters_initialize_false(digits):
    X, y, _, _ = digits
    straight = ConvNN(epochs=2, random_state=1, **TINY).fit(X[:256], y[:256])
    continued = ConvNN(epochs=1, random_state=1, warm_start=True, **TINY).fit(X[:256], y[:256])
    continued.fit(X[:256], y[:256])
    assert [h["epoch"] for h in continued.history_] == [1, 2]
    np.testing.assert_array_equal(continued.predict_proba(X[:50]), straight.predict_proba(X[:50]))


def test_clone_and_cross_val_score(digits):
    X, y, _, _ = digits
    model = ConvNN(epochs=1, batch_size=32, random_state=0, **TINY)
    copy = clone(model)
    assert copy.get_params() == model.get_params() and not hasattr(copy, "model_")
    scores = cross_val_score(model, X[:300], y[:300], cv=2)
    # Each fold's score is a clone fitted on the other fold, scored on this one (StratifiedKFold, as
    # scikit-learn splits a classifier's data for cv=2); random_state=0 makes the fits repeatable.
    expected = [
        clone(model).fit(X[train], y[train]).score(X[test], y[test])
        for train, test in StratifiedKFold(n_splits=2).split(X[:300], y[:300])
    ]
    assert scores.tolist() == expected


def test_bad_inputs_raise_clear_errors(digits, fitted):
    X, y, _, _ = digits
    with pytest.raises(NotFittedError):
        ConvNN().predict(X[:2])
    with pytest.raises(ValueError, match="square"):
        ConvNN().fit(np.zeros((4, 780)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="samples"):
        ConvNN().fit(X[:4], y[:3])
    with pytest.raises(ValueError, match="at least 2 classes"):
        ConvNN().fit(X[:4], [1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"the model takes \(1, 28, 28\)"):
        fitted.predict(np.zeros((2, 3, 28, 28)))
    with pytest.raises(ValueError, match="X has 400 features, but ConvNN is expecting 784"):
        fitted.predict(np.zeros((2, 400)))


def test_images_smaller_than_the_network_are_refused_with_the_minimum_size():
    with pytest.raises(ValueError, match="at least 13x13"):
        ConvNN(**TINY).fit(np.zeros((4, 12, 12)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="at least 7x7"):
        ConvNN(kernel_size=3, **TINY).fit(np.zeros((4, 6, 6)), [0, 1, 0, 1])


def test_continuous_y_is_refused(digits):
    # It used to be accepted as one class per distinct value.
    X, _, _, _ = digits
    y = np.random.default_rng(0).normal(size=64)
    with pytest.raises(ValueError, match="continuous"):
        ConvNN(**TINY).fit(X[:64], y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_in_X_are_value_errors(digits, fitted, bad):
    X, y, _, _ = digits
    X = X[:8].copy()
    X[3, 100] = bad
    with pytest.raises(ValueError, match=r"NaN|infinity"):
        ConvNN(**TINY).fit(X, y[:8])
    with pytest.raises(ValueError, match=r"NaN|infinity"):
        fitted.predict(X)


def test_random_state_is_scikit_learns_parameter(digits):
    X, y, _, _ = digits
    assert ConvNN().get_params()["random_state"] is None  # unlike the command line's --seed 123
    assert ConvNN(epochs=1, random_state=7, **TINY).fit(X[:64], y[:64]).seed_ == 7
    seeds = [
        ConvNN(epochs=1, random_state=state, **TINY).fit(X[:64], y[:64]).seed_
        for state in (
            np.random.RandomState(5),
            np.random.RandomState(5),
            np.random.default_rng(5),
            np.random.default_rng(5),
        )
    ]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3]
    np.random.seed(11)
    first = ConvNN(epochs=1, **TINY).fit(X[:64], y[:64]).seed_
    np.random.seed(11)
    assert ConvNN(epochs=1, **TINY).fit(X[:64], y[:64]).seed_ == first  # None: NumPy's global generator


def test_random_seed_still_works_with_a_future_warning(digits):
    X, y, _, _ = digits
    with pytest.warns(FutureWarning, match="random_state"):
        old = ConvNN(epochs=1, random_seed=9, **TINY).fit(X[:64], y[:64])
    new = ConvNN(epochs=1, random_state=9, **TINY).fit(X[:64], y[:64])
    assert old.seed_ == 9
    np.testing.assert_array_equal(old.predict_proba(X[:10]), new.predict_proba(X[:10]))
    with pytest.raises(ValueError, match="give only random_state"):
        ConvNN(random_seed=1, random_state=2).fit(X[:64], y[:64])


@pytest.mark.parametrize(
    ("params", "error", "expected"),
    [
        ({"epochs": "2"}, TypeError, "epochs must be an int >= 1"),
        ({"epochs": 0}, ValueError, "epochs must be an int >= 1"),
        ({"batch_size": 2.5}, TypeError, "batch_size must be an int >= 1"),
        ({"learning_rate": 0}, ValueError, "learning_rate must be a positive finite number"),
        ({"learning_rate": "fast"}, TypeError, "learning_rate must be"),
        ({"dropout_rate": 1.0}, ValueError, r"dropout_rate must be a number in \[0, 1\)"),
        ({"label_smoothing": -0.1}, ValueError, r"label_smoothing must be a number in \[0, 1\)"),
        ({"lr_schedule": "cosine"}, ValueError, "lr_schedule must be one of 'constant', 'one-cycle'"),
        ({"shuffle": "yes"}, TypeError, "shuffle must be True or False"),
        ({"random_state": -1}, ValueError, "random_state must be None, an int"),
        ({"random_state": "42"}, TypeError, "random_state must be None, an int"),
        ({"build": "keras"}, ValueError, "build must be one of 'layers', 'lowlevel'"),
        ({"precision": "fp16"}, ValueError, "precision must be one of 'auto', 'fp32', 'bf16'"),
        ({"device": "tpu"}, ValueError, "device must be one of 'auto', 'cpu', 'cuda'"),
        ({"patience": -1}, ValueError, "patience must be an int >= 0"),
        ({"conv_channels": (8,)}, TypeError, "conv_channels must be a pair of ints"),
        ({"kernel_size": 0}, ValueError, "kernel_size must be an int >= 1"),
        ({"augment": "elastic"}, ValueError, "augment must be one of 'none', 'affine'"),
        ({"rotate": 181}, ValueError, "rotate must be a number of degrees from 0 to 180"),
        ({"scale": (1.1, 0.9)}, ValueError, r"scale must be \(low, high\) with 0 < low <= high"),
        ({"scale": 1.1}, TypeError, "scale must be a pair"),
        ({"flip": 1}, TypeError, "flip must be True or False"),
    ],
)
def test_bad_parameters_are_refused_at_fit_naming_the_parameter(digits, params, error, expected):
    # epochs="2" used to fail deep in the training loop's arithmetic.
    X, y, _, _ = digits
    model = ConvNN(**params)  # scikit-learn stores parameters as given; fit checks them
    with pytest.raises(error, match=expected):
        model.fit(X[:8], y[:8])


def test_patience_stops_training_when_the_validation_loss_rises(digits):
    X, y, X_test, y_test = digits
    wrong = (y_test + 1) % 10  # the better it learns the digits, the higher this loss
    model = ConvNN(epochs=6, patience=1, random_state=0, **SMALL).fit(X, y, validation_data=(X_test, wrong))
    assert len(model.history_) < 6 and model.config_.patience == 1


def test_a_fast_recipe_checkpoint_keeps_its_schedule_through_load_and_save(tmp_path, digits):
    # ConvNN.load used to drop lr_schedule "one-cycle" and label_smoothing 0.1 of `--recipe fast`.
    X, y, _, _ = digits
    written = read_record(FAST_CHECKPOINT).config
    assert (written.recipe, written.lr_schedule, written.label_smoothing) == ("fast", "one-cycle", 0.1)
    model = ConvNN.load(FAST_CHECKPOINT, device="cpu")
    params = model.get_params()
    assert params["lr_schedule"] == "one-cycle" and params["label_smoothing"] == 0.1
    assert (params["batch_size"], params["learning_rate"], params["dropout_rate"]) == (256, 4e-3, 0.3)
    assert (params["conv_channels"], params["hidden_units"]) == ((2, 4), 8)
    assert read_record(model.save(tmp_path / "resaved.safetensors")).config == written

    model.set_params(epochs=1, warm_start=True).fit(X[:512], y[:512].astype(str))  # its classes are "0".."9"
    config = model.config_
    assert config == dataclasses.replace(written, epochs=3)
    steps = 2  # 512 images in batches of 256
    assert model.history_[-1]["learning_rate"] == pytest.approx(
        learning_rate_at(config, 3 * steps - 1, 3 * steps)
    )
    assert read_record(model.save(tmp_path / "continued.safetensors")).config == config

    fresh = clone(model).fit(X[:512], y[:512])
    assert (fresh.config_.lr_schedule, fresh.config_.label_smoothing) == ("one-cycle", 0.1)


def test_a_one_cycle_convnn_survives_save_and_load(tmp_path, digits):
    X, y, _, _ = digits
    model = ConvNN(
        epochs=1, batch_size=256, lr_schedule="one-cycle", label_smoothing=0.1, random_state=3, **TINY
    )
    model.fit(X[:512], y[:512])
    loaded = ConvNN.load(model.save(tmp_path / "one-cycle.safetensors"), device="cpu")
    assert loaded.get_params() == {**model.get_params(), "device": "cpu", "arch": "chapter"}
    assert loaded.config_ == model.config_
    assert (loaded.config_.lr_schedule, loaded.config_.label_smoothing) == ("one-cycle", 0.1)
    refit = clone(loaded).fit(X[:512], y[:512])
    assert refit.config_ == model.config_


def test_a_saved_model_continues_training_exactly(tmp_path, digits):
    X, y, _, _ = digits
    straight = ConvNN(epochs=2, random_state=4, **TINY).fit(X[:256], y[:256])
    first = ConvNN(epochs=1, random_state=4, **TINY).fit(X[:256], y[:256])
    loaded = ConvNN.load(first.save(tmp_path / "one-epoch.safetensors"))
    loaded.set_params(warm_start=True).fit(X[:256], y[:256])
    for a, b in zip(straight.model_.parameters(), loaded.model_.parameters(), strict=True):
        assert torch.equal(a, b)


def test_augmentation_parameters_train_as_cnnkit_train_does_and_survive_save_and_load(tmp_path, digits):
    X, y, _, _ = digits
    params = dict(
        epochs=1, random_state=0, augment="affine", rotate=20.0, scale=(0.8, 1.2), flip=True, **SMALL
    )
    model = ConvNN(**params).fit(X[:256], y[:256])
    config = model.config_
    assert (config.augment, config.rotate, config.scale_low, config.scale_high, config.flip) == (
        "affine",
        20.0,
        0.8,
        1.2,
        True,
    )
    plain = ConvNN(**{**params, "augment": "none", "flip": False}).fit(X[:256], y[:256])
    assert not np.allclose(model.predict_proba(X[:20]), plain.predict_proba(X[:20]))
    loaded = ConvNN.load(model.save(tmp_path / "m.safetensors"), device="cpu").get_params()
    assert (loaded["augment"], loaded["rotate"], loaded["scale"], loaded["flip"]) == (
        "affine",
        20.0,
        (0.8, 1.2),
        True,
    )


def test_parameters_are_keyword_only_and_n_iter_counts_epochs(digits):
    X, y, _, _ = digits
    with pytest.raises(TypeError):
        ConvNN(64, 2)
    model = ConvNN(epochs=2, random_state=0, **SMALL).fit(X[:200], y[:200])
    assert model.n_iter_ == 2 == len(model.history_)


def test_patience_without_validation_warns_and_validation_fraction_holds_images_out(digits):
    X, y, _, _ = digits
    with pytest.warns(UserWarning, match="patience=1 has no effect without validation_data"):
        ConvNN(epochs=1, patience=1, random_state=0, **SMALL).fit(X[:200], y[:200])
    model = ConvNN(epochs=2, patience=1, validation_fraction=0.25, random_state=0, **SMALL)
    model.fit(X[:200], y[:200])
    assert all(h["valid_accuracy"] is not None for h in model.history_)
    # The held-out quarter is the last 50 images: their accuracy is what the history says.
    assert model.history_[-1]["valid_accuracy"] == pytest.approx(model.score(X[150:200], y[150:200]))
    with pytest.raises(ValueError, match="validation_fraction must be a number in"):
        ConvNN(validation_fraction=1.0).fit(X[:20], y[:20])
