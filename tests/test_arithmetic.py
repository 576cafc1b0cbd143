"""cnnkit.arithmetic: the arithmetic behind any one value of any layer, checked against the library
(cnnkit.ops, cnnkit.layer_outputs) and against numbers worked out by hand."""

import numpy as np
import pytest
import torch

from cnnkit import ops
from cnnkit.arithmetic import ExplainError, explain
from cnnkit.data import Standardization
from cnnkit.layer_outputs import activations, reference_network
from cnnkit.model import Architecture, build_model

ARCH = Architecture(input_shape=(1, 20, 20), num_classes=4, conv_channels=(3, 5), hidden_units=12)
STD = Standardization((30.0,), (70.0,))


@pytest.fixture(scope="module")
def setup():
    model = build_model(ARCH, "layers", seed=3)  # the fused layers swapped in, as a checkpoint loads
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.uniform_(-0.3, 0.3)  # biases that are not 0, so that adding them shows
    pixels = (np.random.default_rng(0).random((1, 20, 20)) * 255).astype(np.float32)
    layers = {k: v[0] for k, v in activations(model, STD.apply(pixels[None])).items()}
    return model, reference_network(model), pixels, layers


def test_a_convolution_value_is_its_window_times_the_filter_plus_the_bias(setup):
    model, network, pixels, layers = setup
    answer = explain(network, pixels, STD, "conv1", 2, 7, 4)
    [step] = answer["steps"]
    assert step["kind"] == "conv" and step["source"] == "input" and step["filter"] == 2
    assert step["rows"] == [7, 8, 9, 10, 11] and step["cols"] == [4, 5, 6, 7, 8]
    window = np.array(step["channels"][0]["window"])
    np.testing.assert_allclose(window, STD.apply(pixels[None])[0, 0, 7:12, 4:9], rtol=1e-6)
    np.testing.assert_array_equal(np.array(step["pixels"][0]), pixels[0, 7:12, 4:9])
    weights = model.features[0].weight[2, 0].detach().numpy()
    np.testing.assert_allclose(step["channels"][0]["weights"], weights)
    np.testing.assert_allclose(step["channels"][0]["products"], window * weights, rtol=1e-12)
    assert step["sum"] == pytest.approx(float((window * weights).sum()), rel=1e-12)
    assert step["bias"] == pytest.approx(float(model.features[0].bias[2].detach()))
    whole = ops.conv2d_multi(
        STD.apply(pixels[None])[0].astype(np.float64),
        network.features[0].weight.detach().double().numpy(),
        network.features[0].bias.detach().double().numpy(),
    )
    assert step["value"] == pytest.approx(whole[2, 7, 4], rel=1e-9)  # cross-correlation, as ops computes it
    assert answer["value"] == pytest.approx(layers["conv1"][2, 7, 4], rel=1e-5, abs=1e-6)
    assert step["network_value"] == pytest.approx(step["value"], rel=1e-5, abs=1e-6)


def test_a_pooled_value_is_explained_through_pooling_relu_and_the_convolution_of_its_winner(setup):
    _, network, pixels, layers = setup
    c, y, x = np.unravel_index(np.argmax(layers["pool1"]), layers["pool1"].shape)
    answer = explain(network, pixels, STD, "pool1", int(c), int(y), int(x))
    pool, relu, conv = answer["steps"]
    assert [pool["kind"], relu["kind"], conv["kind"]] == ["maxpool", "relu", "conv"]
    assert pool["source"] == "relu1" and relu["source"] == "conv1" and conv["layer"] == "conv1"
    assert pool["rows"] == [2 * y, 2 * y + 1] and pool["cols"] == [2 * x, 2 * x + 1]
    np.testing.assert_allclose(
        pool["window"], layers["relu1"][c, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2], rtol=1e-6
    )
    _, wy, wx = pool["winner"]
    assert pool["value"] == pytest.approx(layers["relu1"][c, wy, wx]) == pytest.approx(np.max(pool["window"]))
    assert relu["at"] == [c, wy, wx] and conv["at"] == [c, wy, wx]
    assert relu["value"] == max(0.0, relu["input"]) and relu["input"] == pytest.approx(conv["network_value"])


def test_the_second_convolution_sums_every_channel_of_the_maps_before_it(setup):
    _, network, pixels, layers = setup
    [step] = explain(network, pixels, STD, "conv2", 4, 1, 2)["steps"]
    assert step["source"] == "pool1" and step["in_channels"] == 3 and len(step["channels"]) == 3
    assert "pixels" not in step
    sums = {entry["channel"]: entry["sum"] for entry in step["channels"]}
    for entry in step["channels"]:  # each window is the pooled maps' own values
        k = entry["channel"]
        np.testing.assert_allclose(entry["window"], layers["pool1"][k, 1:6, 2:7], rtol=1e-6, atol=1e-7)
    assert [abs(entry["sum"]) for entry in step["channels"]] == sorted(
        (abs(s) for s in sums.values()), reverse=True
    )
    assert step["sum"] == pytest.approx(sum(sums.values()))
    assert step["value"] == pytest.approx(layers["conv2"][4, 1, 2], rel=1e-5, abs=1e-6)


def test_a_dense_unit_lists_its_largest_contributions_and_sums_the_rest(setup):
    _, network, pixels, layers = setup
    answer = explain(network, pixels, STD, "dense3", 5)
    relu, dense = answer["steps"]
    assert relu["kind"] == "relu" and dense["kind"] == "dense" and dense["source"] == "pool2"
    c, h, w = layers["pool2"].shape
    assert dense["inputs"] == c * h * w and dense["source_shape"] == [c, h, w]
    products = [t["product"] for t in dense["top"]]
    assert [abs(p) for p in products] == sorted((abs(p) for p in products), reverse=True)
    for t in dense["top"]:  # each input named by its place in pool2's maps
        assert t["input"] == pytest.approx(layers["pool2"][tuple(t["from"])], rel=1e-6, abs=1e-7)
        assert t["product"] == pytest.approx(t["input"] * t["weight"])
    assert sum(products) + dense["rest_sum"] == pytest.approx(dense["sum"])
    assert dense["positive_sum"] + dense["negative_sum"] == pytest.approx(dense["sum"])
    assert dense["computed"] == pytest.approx(relu["input"], rel=1e-5, abs=1e-6)
    assert answer["value"] == pytest.approx(layers["dense3"][5], rel=1e-5, abs=1e-6)
    [logit] = explain(network, pixels, STD, "logits", 1)["steps"]
    assert logit["source"] == "dense3" and logit["inputs"] == 12 and logit["top"][0]["from"][0] < 12


def test_probabilities_and_the_input_are_explained_too(setup):
    _, network, pixels, layers = setup
    [softmax] = explain(network, pixels, STD, "probabilities", 2)["steps"]
    assert softmax["value"] == pytest.approx(layers["probabilities"][2], rel=1e-5)
    np.testing.assert_allclose(softmax["logits"], layers["logits"], rtol=1e-5, atol=1e-6)
    assert sum(softmax["exps"]) == pytest.approx(softmax["total"])
    [standardize] = explain(network, pixels, STD, "input", 0, 3, 9)["steps"]
    assert standardize["pixel"] == pixels[0, 3, 9]
    assert standardize["computed"] == pytest.approx((pixels[0, 3, 9] - 30.0) / 70.0)
    assert standardize["value"] == pytest.approx(standardize["computed"], rel=1e-6)


def test_the_low_level_build_is_explained_as_the_layer_build_with_the_same_weights(setup):
    model, network, pixels, _ = setup
    lowlevel = build_model(ARCH, "lowlevel", seed=3)
    from cnnkit.model import convert_state

    lowlevel.load_state_dict(convert_state(model.state_dict(), ARCH, "layers", "lowlevel"))
    assert explain(reference_network(lowlevel), pixels, STD, "pool2", 1, 0, 1) == explain(
        network, pixels, STD, "pool2", 1, 0, 1
    )


@pytest.mark.parametrize(
    ("layer", "channel", "y", "x", "fragment"),
    [
        ("conv9", 0, 0, 0, "no layer 'conv9'"),
        ("conv1", 3, 0, 0, "channel must be 0..2"),
        ("conv1", 0, 16, 0, "y 0..15"),
        ("dense3", 12, 0, 0, "channel must be 0..11"),
        ("dense3", 0, 1, 0, "y, x 0"),
    ],
)
def test_a_layer_or_position_the_network_does_not_have_is_refused_saying_what_it_has(
    setup, layer, channel, y, x, fragment
):
    _, network, pixels, _ = setup
    with pytest.raises(ExplainError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        explain(network, pixels, STD, layer, channel, y, x)


def test_a_residual_network_is_explained_through_batch_norm_padding_and_its_residual_sums():
    resnet = pytest.importorskip("cnnkit.resnet")
    arch = resnet.ResNetArchitecture(input_shape=(3, 12, 12), num_classes=3, widths=(4, 6, 8, 10))
    model = build_model(arch, "layers", seed=0).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # statistics as training would leave them
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    std = Standardization((120.0, 110.0, 100.0), (60.0, 50.0, 40.0))
    pixels = (np.random.default_rng(1).random((3, 12, 12)) * 255).astype(np.float32)
    layers = {k: v[0] for k, v in activations(model, std.apply(pixels[None])).items()}
    network = reference_network(model)
    for name, values in layers.items():
        at = (1, 0, 0) if values.ndim == 3 else (1,)  # a corner: the convolution's window overhangs
        answer = explain(network, pixels, std, name, *at, *([0, 0] if values.ndim == 1 else []))
        assert answer["value"] == pytest.approx(values[at], rel=1e-4, abs=1e-5), name
        for step in answer["steps"]:
            if "computed" in step:
                assert step["computed"] == pytest.approx(step["value"], rel=1e-4, abs=1e-5), (
                    name,
                    step["kind"],
                )
    first_relu = next(name for name in layers if name.startswith("relu"))
    relu, batchnorm, conv = explain(network, pixels, std, first_relu, 1, 0, 0)["steps"]
    assert [relu["kind"], batchnorm["kind"], conv["kind"]] == ["relu", "batchnorm", "conv"]
    assert conv["rows"][0] == -1 and conv["channels"][0]["window"][0] == [0.0, 0.0, 0.0]  # zero padding
    first_kinds = {
        explain(network, pixels, std, name, 0)["steps"][0]["kind"]
        for name in layers
        if layers[name].ndim == 3
    }
    assert {"add", "maxpool", "batchnorm", "relu"} <= first_kinds
