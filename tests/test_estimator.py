"""ConvNN: the chapter's class as a scikit-learn estimator."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score

from cnnkit import ConvNN


@pytest.fixture(scope="module")
def digits(mnist_5k):
    """1,000 training and 300 test digits as the chapter holds them: rows of 784 floats."""
    train, test = mnist_5k.train, mnist_5k.test
    rows = lambda images: images.reshape(len(images), -1).astype(np.float64)  # noqa: E731
    return rows(train.images[:1000]), train.labels[:1000], rows(test.images[:300]), test.labels[:300]


@pytest.fixture(scope="module")
def fitted(digits):
    X, y, _, _ = digits
    return ConvNN(epochs=4, random_seed=123, precision="fp32").fit(X, y)


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


def test_string_labels_and_validation_data(digits):
    X, y, X_test, y_test = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    model = ConvNN(epochs=1, random_seed=0, precision="fp32").fit(
        X[:300], names[y[:300]], validation_data=(X_test, names[y_test])
    )
    assert set(model.predict(X_test[:10])) <= set(names)
    assert 0 <= model.history_[0]["valid_accuracy"] <= 1


def test_save_and_load_give_the_same_predictions(tmp_path, digits, fitted):
    _, _, X_test, _ = digits
    path = fitted.save(tmp_path / "convnn.safetensors")
    loaded = ConvNN.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(X_test), fitted.predict_proba(X_test))
    assert loaded.get_params() == {**fitted.get_params(), "device": "auto"}
    assert loaded.history_ == fitted.history_


def test_warm_start_continues_like_the_chapters_initialize_false(digits):
    X, y, _, _ = digits
    straight = ConvNN(epochs=2, random_seed=1, precision="fp32").fit(X[:256], y[:256])
    continued = ConvNN(epochs=1, random_seed=1, precision="fp32", warm_start=True).fit(X[:256], y[:256])
    continued.fit(X[:256], y[:256])
    assert [h["epoch"] for h in continued.history_] == [1, 2]
    np.testing.assert_array_equal(continued.predict_proba(X[:50]), straight.predict_proba(X[:50]))


def test_clone_and_cross_val_score(digits):
    X, y, _, _ = digits
    model = ConvNN(epochs=1, batch_size=32, random_seed=0, precision="fp32")
    copy = clone(model)
    assert copy.get_params() == model.get_params() and not hasattr(copy, "model_")
    scores = cross_val_score(model, X[:300], y[:300], cv=2)
    assert scores.shape == (2,) and all(0 <= s <= 1 for s in scores)


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


def test_a_saved_model_continues_training_exactly(tmp_path, digits):
    X, y, _, _ = digits
    straight = ConvNN(epochs=2, random_seed=4, precision="fp32").fit(X[:256], y[:256])
    first = ConvNN(epochs=1, random_seed=4, precision="fp32").fit(X[:256], y[:256])
    loaded = ConvNN.load(first.save(tmp_path / "one-epoch.safetensors"))
    loaded.set_params(warm_start=True).fit(X[:256], y[:256])
    for a, b in zip(straight.model_.parameters(), loaded.model_.parameters(), strict=True):
        assert torch.equal(a, b)
