"""Test-time augmentation and ensembles: averaged probabilities that reduce to the single model."""

import numpy as np
import pytest
import torch

from cnnkit.checkpoint import load_network
from cnnkit.data import Standardization
from cnnkit.evaluation import evaluation_split
from cnnkit.images import read_image_for_model
from cnnkit.inference import (
    average_probabilities,
    evaluate,
    evaluate_probabilities,
    predict_proba,
    predict_proba_tta,
    tta_views,
)
from cnnkit.model import Architecture, build_model
from cnnkit.recipes import TrainConfig
from cnnkit.record import ModelRecord

ARCH = Architecture(input_shape=(1, 16, 16), num_classes=3, conv_channels=(4, 6), hidden_units=16)


def _record(flip=False):
    return ModelRecord(
        architecture=ARCH,
        class_names=("a", "b", "c"),
        standardization=Standardization((100.0,), (50.0,)),
        preprocessing="resize",
        config=TrainConfig(flip=flip),
    )


def test_views_are_the_image_and_its_one_pixel_shifts_and_mirrors():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = tta_views(image)
    assert len(views) == 5 and torch.equal(views[0], image)
    down = views[2][0, 0]  # (dy, dx) = (1, 0): the content moves one row down, the top row repeated
    assert torch.equal(down[1:], image[0, 0, :3]) and torch.equal(down[0], image[0, 0, 0])
    right = views[4][0, 0]
    assert torch.equal(right[:, 1:], image[0, 0, :, :3])
    mirrored = tta_views(image, flip=True)
    assert len(mirrored) == 10 and torch.equal(mirrored[5], torch.flip(image, dims=[-1]))


def test_tta_of_an_image_that_shifting_does_not_change_equals_the_model():
    model = build_model(ARCH, seed=0)
    flat = torch.full((3, 1, 16, 16), 0.7)  # every shifted view is the same image
    np.testing.assert_allclose(predict_proba_tta(model, flat), predict_proba(model, flat), rtol=1e-6)
    noisy = torch.randn(3, 1, 16, 16)
    assert not np.allclose(predict_proba_tta(model, noisy), predict_proba(model, noisy))


def test_an_ensemble_of_one_model_repeated_equals_that_model_and_scores_the_same():
    model, record = build_model(ARCH, seed=1), _record()
    raw = np.random.default_rng(0).uniform(0, 255, (20, 1, 16, 16)).astype(np.float32)
    labels = np.arange(20) % 3
    single = predict_proba(model, record.standardization.apply(raw))
    np.testing.assert_allclose(average_probabilities([(model, record)] * 3, raw), single, rtol=1e-6)
    alone = evaluate(model, record.standardization.apply(raw), labels)
    together = evaluate_probabilities(average_probabilities([(model, record)] * 2, raw), labels)
    assert together.accuracy == alone.accuracy
    np.testing.assert_array_equal(together.confusion, alone.confusion)
    assert abs(together.loss - alone.loss) < 1e-5


def test_an_ensemble_averages_different_models_and_mirrors_only_for_those_trained_with_flips():
    a, b = build_model(ARCH, seed=1), build_model(ARCH, seed=2)
    raw = np.random.default_rng(1).uniform(0, 255, (5, 1, 16, 16)).astype(np.float32)
    std = _record().standardization.apply(raw)
    expected = (predict_proba(a, std) + predict_proba(b, std)) / 2
    np.testing.assert_allclose(
        average_probabilities([(a, _record()), (b, _record())], raw), expected, rtol=1e-6
    )
    mirrored = average_probabilities([(a, _record(flip=True))], raw, tta=True)
    np.testing.assert_allclose(mirrored, predict_proba_tta(a, std, flip=True), rtol=1e-6)
    assert not np.allclose(mirrored, predict_proba_tta(a, std, flip=False))


def test_evaluate_an_ensemble_of_one_run_twice_scores_as_the_run(cli, tiny_run):
    import json

    alone = json.loads(cli("evaluate", tiny_run, "--json", "--precision", "fp32").out)
    twice = cli("evaluate", tiny_run, tiny_run, "--json", "--precision", "fp32")
    assert twice.code == 0, twice.err
    twice = json.loads(twice.out)
    assert twice["accuracy"] == alone["accuracy"] and twice["confusion_matrix"] == alone["confusion_matrix"]
    assert [m["checkpoint"] for m in twice["models"]] == [alone["checkpoint"]] * 2 and twice["tta"] is False
    tta = cli("evaluate", tiny_run, "--tta", "--json", "--precision", "fp32")
    assert tta.code == 0, tta.err
    tta = json.loads(tta.out)
    assert tta["tta"] is True and tta["n"] == alone["n"] and tta["checkpoint"] == alone["checkpoint"]
    # The numbers are those of the averaged views, computed here with cnnkit.inference.
    model, ckpt = load_network(tiny_run)
    _, _, split = evaluation_split(ckpt.record, ckpt.path)
    proba = average_probabilities([(model, ckpt.record)], split.images, tta=True, precision="fp32")
    expected = evaluate_probabilities(proba, split.labels)
    assert tta["accuracy"] == expected.accuracy
    assert tta["confusion_matrix"] == expected.confusion.tolist()
    assert tta["loss"] == pytest.approx(expected.loss, rel=1e-5)
    assert tta["loss"] != pytest.approx(alone["loss"], rel=1e-5)  # and TTA did change them


def test_predict_with_an_ensemble_and_tta(cli, tiny_run):
    import json

    seven = "examples/seven.png"
    alone = json.loads(cli("predict", tiny_run, seven, "--json", "--proba", "--precision", "fp32").out)
    twice = cli("predict", tiny_run, tiny_run, seven, "--json", "--proba", "--precision", "fp32")
    assert twice.code == 0, twice.err
    assert [e["file"] for e in json.loads(twice.out)] == [seven]  # the second run is a model, not an image
    for name, p in json.loads(twice.out)[0]["probabilities"].items():
        assert abs(p - alone[0]["probabilities"][name]) < 1e-6
    tta = cli("predict", tiny_run, seven, "--json", "--proba", "--precision", "fp32", "--tta")
    assert tta.code == 0, tta.err
    [entry] = json.loads(tta.out)
    # The probabilities are the mean over the 5 shifted views of the prepared image (cnnkit.inference).
    model, ckpt = load_network(tiny_run)
    record = ckpt.record
    image = read_image_for_model(seven, record.architecture.input_shape, record.preprocessing)[None]
    expected = predict_proba_tta(model, record.standardization.apply(image), flip=record.config.flip)[0]
    probabilities = np.array(list(entry["probabilities"].values()))
    assert list(entry["probabilities"]) == list(record.class_names)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)
    assert entry["label"] == int(expected.argmax()) and entry["file"] == seven
    assert not np.allclose(probabilities, list(alone[0]["probabilities"].values()), rtol=1e-5, atol=1e-7)


def test_an_ensemble_of_models_that_disagree_on_classes_or_onnx_files_is_one_line(
    cli, tiny_run, three_class_run
):
    cli("evaluate", tiny_run, three_class_run).assert_one_line_error("must share their classes")
    cli("predict", tiny_run, three_class_run, "examples/seven.png").assert_one_line_error("must share")
    cli("evaluate", tiny_run, "model.onnx").assert_one_line_error("model.onnx", "not .onnx files")
    cli("evaluate", tiny_run, "--tta", "--precision", "int8").assert_one_line_error("int8")
