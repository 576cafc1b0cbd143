"""Inference: precisions that agree, metrics that are right, int8 quantization."""

import numpy as np
import pytest
import torch

from cnnkit.checkpoint import load_network
from cnnkit.inference import (
    CPU_FLOAT_BATCH,
    LARGE_BATCH,
    Evaluation,
    default_batch_size,
    evaluate,
    predict_labels,
    predict_logits,
    predict_proba,
)
from cnnkit.model import Architecture, build_model, convert_state
from cnnkit.quantize import quantize_int8


@pytest.fixture(scope="module")
def model_and_test_set(trained_run, mnist_5k):
    model, ckpt = load_network(trained_run)
    std = ckpt.record.standardization
    return (
        model,
        std.apply(mnist_5k.test.images),
        mnist_5k.test.labels,
        std.apply(mnist_5k.train.images[:512]),
    )


def test_bf16_and_fp32_agree_on_at_least_99_percent_of_a_test_set(model_and_test_set):
    model, images, labels, _ = model_and_test_set
    fp32 = predict_labels(model, images, precision="fp32")
    bf16 = predict_labels(model, images, precision="bf16")
    assert (fp32 == bf16).mean() >= 0.99
    assert (fp32 == labels).mean() > 0.9


def test_int8_agrees_with_fp32_on_at_least_99_percent(model_and_test_set):
    model, images, labels, calibration = model_and_test_set
    int8 = quantize_int8(model, calibration)
    fp32 = predict_labels(model, images)
    assert (predict_labels(int8, images) == fp32).mean() >= 0.99
    assert evaluate(int8, images, labels).accuracy == pytest.approx(
        evaluate(model, images, labels).accuracy, abs=0.01
    )


def test_int8_quantizes_the_lowlevel_build_too(model_and_test_set):
    model, images, _, calibration = model_and_test_set
    lowlevel = build_model(model.arch, "lowlevel")
    lowlevel.load_state_dict(convert_state(model.state_dict(), model.arch, "layers", "lowlevel"))
    a = predict_labels(quantize_int8(lowlevel.eval(), calibration), images)
    assert (a == predict_labels(model, images)).mean() >= 0.99


def test_probabilities_sum_to_one_and_match_labels(model_and_test_set):
    model, images, _, _ = model_and_test_set
    proba = predict_proba(model, images[:100])
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(proba.argmax(axis=1), predict_labels(model, images[:100]))


def test_batching_does_not_change_logits():
    model = build_model(Architecture(), seed=0).eval()
    images = torch.randn(25, 1, 28, 28)
    torch.testing.assert_close(
        predict_logits(model, images, batch_size=7), predict_logits(model, images, batch_size=25)
    )
    assert predict_logits(model, images[:0]).shape == (0, 10)


def test_default_batch_size_is_cache_sized_for_float_networks_on_a_cpu(model_and_test_set):
    model, _, _, calibration = model_and_test_set
    assert default_batch_size(model, "cpu") == CPU_FLOAT_BATCH < LARGE_BATCH
    assert default_batch_size(model, torch.device("cuda")) == LARGE_BATCH
    assert default_batch_size(quantize_int8(model, calibration[:64]), "cpu") == LARGE_BATCH


def test_evaluation_metrics_on_a_hand_made_case():
    class Fixed(torch.nn.Module):
        arch = Architecture(num_classes=3)

        def forward(self, x):
            return x.flatten(1)[:, :3]

    # predicted classes: 0, 1, 1, 2 ; true classes: 0, 1, 2, 2
    logits = torch.tensor([[9, 0, 0], [0, 9, 0], [0, 9, 0], [0, 0, 9]], dtype=torch.float32)
    result = evaluate(Fixed(), logits[:, :, None, None], np.array([0, 1, 2, 2]))
    assert isinstance(result, Evaluation)
    assert result.accuracy == 0.75 and result.n == 4
    np.testing.assert_array_equal(result.confusion, [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    np.testing.assert_allclose(result.per_class_accuracy, [1.0, 1.0, 0.5])
    report = result.to_dict(["a", "b", "c"])
    assert report["per_class"]["c"] == {"accuracy": 0.5, "n": 2}


def test_evaluate_takes_labels_as_a_tensor_too(model_and_test_set):
    model, images, labels, _ = model_and_test_set
    from_numpy = evaluate(model, images, labels)
    from_tensor = evaluate(model, torch.from_numpy(images), torch.from_numpy(labels))
    assert from_tensor.accuracy == from_numpy.accuracy and from_tensor.n == len(labels)
