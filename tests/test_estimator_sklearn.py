"""ConvNN against scikit-learn's own estimator checks (sklearn.utils.estimator_checks.check_estimator).

Most generic checks fit rows of 2, 3, 5 or 10 features, which are not square images, so ConvNN
refuses them: those checks cannot apply to an image model and are listed, each with its reason, in
EXPECTED_FAILURES (and in the README). Every other check passes. To show that nothing but the shape
of their data stops the listed ones, they are run again on a ConvNN that reads each row as one pixel
with a channel per feature, and then all of them pass.
"""

import pytest
from sklearn.utils import get_tags
from sklearn.utils.estimator_checks import check_estimator

from cnnkit import ConvNN

# As small a network as the checks' data allow: 1x1 kernels take images of any size (2x2 included).
TINY = {
    "epochs": 2,
    "batch_size": 16,
    "learning_rate": 0.01,
    "dropout_rate": 0.0,
    "conv_channels": (8, 8),
    "kernel_size": 1,
    "hidden_units": 16,
    "precision": "fp32",
    "device": "cpu",
}

_ROWS = "fits rows of {} features: {} is not a square number, so the rows are not images"
EXPECTED_FAILURES = {
    "check_classifier_data_not_an_array": _ROWS.format(2, 2),
    "check_classifiers_classes": _ROWS.format(2, 2),
    "check_classifiers_train": _ROWS.format(2, 2),
    "check_dict_unchanged": _ROWS.format(3, 3),
    "check_dont_overwrite_parameters": _ROWS.format(3, 3),
    "check_dtype_object": _ROWS.format(10, 10),
    "check_estimators_dtypes": _ROWS.format(5, 5),
    "check_estimators_fit_returns_self": _ROWS.format(2, 2),
    "check_estimators_nan_inf": _ROWS.format(3, 3),
    "check_estimators_overwrite_params": _ROWS.format(2, 2),
    "check_estimators_pickle": _ROWS.format(3, 3),
    "check_f_contiguous_array_estimator": _ROWS.format(3, 3),
    "check_fit2d_predict1d": _ROWS.format(3, 3),
    "check_fit_check_is_fitted": _ROWS.format(2, 2),
    "check_fit_idempotent": _ROWS.format(2, 2),
    "check_fit_score_takes_y": _ROWS.format(3, 3),
    "check_methods_sample_order_invariance": _ROWS.format(3, 3),
    "check_methods_subset_invariance": _ROWS.format(3, 3),
    "check_n_features_in": _ROWS.format(2, 2),
    "check_pipeline_consistency": _ROWS.format(3, 3),
    "check_readonly_memmap_input": _ROWS.format(2, 2),
    "check_supervised_y_2d": _ROWS.format(3, 3),
}


class RowsAsPixels(ConvNN):
    """ConvNN reading a row of F features as one 1x1 pixel with F channels, so that every generic check
    reaches the code it checks (validation, pickling, idempotence, ...) instead of the image-shape error."""

    @staticmethod
    def _as_nchw(X):
        return X.reshape(len(X), -1, 1, 1) if X.ndim == 2 else ConvNN._as_nchw(X)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_checks(estimator, expected_failed_checks=None) -> dict:
    """check_name -> statuses ("passed", "xfail", "failed", "skipped") of every check run."""
    results = check_estimator(
        estimator, expected_failed_checks=expected_failed_checks, on_fail=None, on_skip=None
    )
    statuses = {}
    for result in results:
        statuses.setdefault(result["check_name"], set()).add(result["status"])
    return statuses


def test_check_estimator_fails_exactly_the_checks_whose_rows_are_not_images():
    statuses = run_checks(ConvNN(**TINY), EXPECTED_FAILURES)
    failed = {name for name, s in statuses.items() if s & {"failed", "xfail"}}
    assert failed == set(EXPECTED_FAILURES)
    assert not any("failed" in s for s in statuses.values())  # every listed one failed as expected
    for name in ("check_requires_y_none", "check_fit2d_1sample", "check_classifiers_one_label"):
        assert statuses[name] == {"passed"}  # y is checked before the shape of X
    assert statuses["check_n_features_in_after_fitting"] == {"passed"}  # rows of 4: 2x2 images


def test_every_check_passes_when_rows_are_read_as_pixels():
    statuses = run_checks(RowsAsPixels(**TINY))
    assert {name for name, s in statuses.items() if s - {"passed", "skipped"}} == set()
    assert set(EXPECTED_FAILURES) <= set(statuses)


def test_tags_say_what_x_may_be():
    tags = get_tags(ConvNN())
    assert tags.input_tags.two_d_array and tags.input_tags.three_d_array  # rows, and (N, H, W)
    assert not tags.input_tags.allow_nan and not tags.input_tags.sparse
    assert tags.estimator_type == "classifier"
