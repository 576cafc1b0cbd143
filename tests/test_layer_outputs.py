"""cnnkit.layer_outputs (once cnnkit.inspect): every layer's output, and the filters that made the feature maps."""

import numpy as np
import pytest
import torch

from cnnkit.inference import predict_logits
from cnnkit.layer_outputs import LAYERS, activations, filters
from cnnkit.model import Architecture, build_model

ARCH = Architecture(input_shape=(3, 20, 17), num_classes=3, conv_channels=(4, 6), hidden_units=16)


@pytest.mark.parametrize("build", ["layers", "lowlevel"])
def test_every_layer_in_order_with_its_shape_and_last_layer_equal_to_the_model(build):
    model = build_model(ARCH, build, seed=1)
    images = np.random.default_rng(0).normal(size=(5, *ARCH.input_shape)).astype(np.float32)
    acts = activations(model, images, batch_size=2)  # batches of 2, 2, 1 are joined back together
    assert tuple(acts) == LAYERS
    assert acts["conv1"].shape == (5, 4, 16, 13)
    assert acts["pool1"].shape == (5, 4, 8, 7)  # TensorFlow SAME: ceil(13 / 2) = 7
    assert acts["conv2"].shape == (5, 6, 4, 3)
    assert acts["pool2"].shape == (5, 6, 2, 2)
    assert acts["dense3"].shape == (5, 16)
    np.testing.assert_allclose(acts["logits"], predict_logits(model, images).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acts["probabilities"].sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(acts["relu1"], np.maximum(acts["conv1"], 0))
    assert acts["relu2"].min() == 0 and acts["conv2"].min() < 0  # ReLU did something


def test_filters_are_the_first_layer_kernels_that_make_its_maps():
    model = build_model(ARCH, "lowlevel", seed=2)
    kernels = filters(model)
    assert kernels["conv1"].shape == (4, 3, 5, 5) and kernels["conv2"].shape == (6, 4, 5, 5)
    image = np.random.default_rng(1).normal(size=(1, *ARCH.input_shape)).astype(np.float32)
    # map j at (0, 0): the input's top-left 5x5 window times filter j, plus the bias
    bias = model.conv_1_biases.detach().numpy()
    expected = (image[0, :, :5, :5] * kernels["conv1"]).sum(axis=(1, 2, 3)) + bias
    np.testing.assert_allclose(activations(model, image)["conv1"][0, :, 0, 0], expected, rtol=1e-5, atol=1e-5)


def test_wrong_image_shape_is_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(N, 3, 20, 17\)"):
        activations(build_model(ARCH), torch.zeros(2, 1, 20, 17))


def test_the_unfused_copy_is_kept_until_the_weights_change():
    from cnnkit.layer_outputs import reference_network

    network = build_model(Architecture(conv_channels=(2, 3), hidden_units=8), seed=0)
    first = reference_network(network)
    assert reference_network(network) is first  # kept: the page asks for it on every request
    images = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    before = activations(network, images)["logits"]
    with torch.no_grad():
        network.features[0].weight.add_(0.5)  # an optimizer step writes in place
    assert reference_network(network) is not first
    assert not np.allclose(activations(network, images)["logits"], before)
