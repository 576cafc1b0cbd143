"""The chapter's CNN, both builds: shapes, identical outputs from identical weights, weight layouts."""

import pytest
import torch
from torch import nn

from cnnkit.model import Architecture, LayerCNN, LowLevelCNN, build_model, convert_state, dropout


def test_lowlevel_build_has_the_chapters_weight_shapes():
    model = build_model(Architecture(), "lowlevel", seed=0)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "conv_1_weights": (5, 5, 1, 32),
        "conv_1_biases": (32,),
        "conv_2_weights": (5, 5, 32, 64),
        "conv_2_biases": (64,),
        "fc_3_weights": (1024, 1024),
        "fc_3_biases": (1024,),
        "fc_4_weights": (1024, 10),
        "fc_4_biases": (10,),
    }


@pytest.mark.parametrize(
    ("input_shape", "num_classes", "flat"),
    [((1, 28, 28), 10, 1024), ((3, 32, 32), 4, 1600), ((1, 29, 31), 7, 1600), ((2, 13, 13), 3, 64)],
)
def test_both_builds_give_the_same_outputs_for_the_same_weights(input_shape, num_classes, flat):
    arch = Architecture(input_shape=input_shape, num_classes=num_classes)
    assert arch.flat_features == flat
    layers = build_model(arch, "layers", seed=3).double().eval()
    lowlevel = LowLevelCNN(arch).double().eval()
    lowlevel.load_state_dict(convert_state(layers.state_dict(), arch, "layers", "lowlevel"))
    x = torch.randn(6, *input_shape, dtype=torch.float64)
    out_layers, out_lowlevel = layers(x), lowlevel(x)
    assert out_layers.shape == (6, num_classes)
    torch.testing.assert_close(out_lowlevel, out_layers, rtol=1e-12, atol=1e-12)


def test_same_seed_gives_same_initial_weights_in_both_builds():
    arch = Architecture()
    layers = build_model(arch, "layers", seed=7)
    lowlevel = build_model(arch, "lowlevel", seed=7)
    back = convert_state(lowlevel.state_dict(), arch, "lowlevel", "layers")
    for name, tensor in layers.state_dict().items():
        assert torch.equal(back[name], tensor), name
    assert not torch.equal(
        build_model(arch, "layers", seed=8).state_dict()["features.0.weight"], layers.features[0].weight
    )


def test_initialization_is_glorot_uniform_with_zero_biases():
    model = build_model(Architecture(), "layers", seed=0)
    fc = model.classifier[1]
    bound = (6 / (fc.in_features + fc.out_features)) ** 0.5
    assert fc.weight.abs().max() <= bound
    assert fc.weight.abs().max() > 0.9 * bound
    assert all(
        torch.count_nonzero(m.bias) == 0 for m in model.modules() if hasattr(m, "bias") and m.bias is not None
    )


def test_pooling_is_tensorflow_same_padding():
    # 29x31: conv 25x27 -> pool ceil -> 13x14 -> conv 9x10 -> pool ceil -> 5x5
    assert Architecture(input_shape=(1, 29, 31)).feature_shape == (64, 5, 5)
    model = LayerCNN(Architecture(input_shape=(1, 29, 31)))
    assert model.features(torch.zeros(1, 1, 29, 31)).shape == (1, 64, 5, 5)


@pytest.mark.parametrize("p", [0.5, 0.3, 0.1])
def test_dropout_zeroes_a_fraction_p_and_scales_the_rest(p):
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, p)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.005
    assert torch.allclose(y[kept], torch.tensor(1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / (1 - p))
    # each element independently: the mask is no pattern of rows or columns
    assert kept.float().mean(0).std() < 0.05 and kept.float().mean(1).std() < 0.05
    assert torch.equal(dropout(x, p, training=False), x) and torch.equal(dropout(x, 0.0), x)


def test_dropout_masks_follow_the_torch_seed():
    x = torch.ones(64, 1024)
    torch.manual_seed(5)
    a = dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.5), a)
    assert not torch.equal(dropout(x, 0.5), a)


def test_both_builds_agree_in_training_mode_given_the_same_seed():
    arch = Architecture()
    layers, lowlevel = (
        build_model(arch, "layers", seed=2).double(),
        build_model(arch, "lowlevel", seed=2).double(),
    )
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    torch.manual_seed(11)
    a = layers.train()(x)
    torch.manual_seed(11)
    torch.testing.assert_close(lowlevel.train()(x), a, rtol=1e-12, atol=1e-12)


def test_dropout_only_in_training_mode():
    model = build_model(Architecture(), seed=0)
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    assert not torch.equal(a, model(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (1, 11, 28)}, "too small"),
        ({"input_shape": (28, 28)}, "input_shape"),
        ({"num_classes": 1}, "num_classes"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
    ],
)
def test_bad_architectures_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Architecture(**kwargs)


def test_smallest_input_that_fits():
    assert Architecture(input_shape=(1, 13, 13)).feature_shape == (64, 1, 1)
    with pytest.raises(ValueError, match="at least 13x13"):
        Architecture(input_shape=(1, 12, 40))


def test_architecture_round_trips_through_a_dict():
    arch = Architecture(input_shape=(3, 32, 32), num_classes=4, dropout_rate=0.25)
    assert Architecture.from_dict(arch.to_dict()) == arch


def test_unknown_build_is_refused():
    with pytest.raises(ValueError, match="build"):
        build_model(Architecture(), "keras")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_after_pooling_is_bit_identical_to_the_chapters_order(dtype):
    # The layer build pools before its ReLUs; the chapter's order (conv -> ReLU -> pool) must give
    # exactly the same outputs and gradients, in bf16 too.
    model = build_model(Architecture(), "layers", seed=1).to(dtype)
    conv1, pool1, relu1, conv2, pool2, relu2 = model.features
    chapter_order = torch.nn.Sequential(conv1, relu1, pool1, conv2, relu2, pool2)
    x = torch.randn(8, 1, 28, 28, dtype=dtype)
    ours, theirs = model.features(x), chapter_order(x)
    assert torch.equal(ours, theirs)
    grad = torch.randn_like(ours)
    grads_ours = torch.autograd.grad(ours, list(model.features.parameters()), grad)
    grads_theirs = torch.autograd.grad(theirs, list(chapter_order.parameters()), grad)
    for a, b in zip(grads_ours, grads_theirs, strict=True):
        assert torch.equal(a, b)


def test_the_layer_build_is_the_chapters_layers_and_printing_it_shows_what_runs():
    """The reference build holds PyTorch's modules in the chapter's order; build_model swaps the fused
    layers in (cnnkit.kernels.fuse) with the same parameters and names, and printing it shows them."""
    from cnnkit.kernels import Conv2dReLUPool, MaxPoolReLU

    arch = Architecture(conv_channels=(4, 8), hidden_units=16)
    reference = build_model(arch, seed=3, fused=False)
    fused = build_model(arch, seed=3)
    assert [type(m) for m in reference.features] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 2
    assert [type(m) for m in fused.features] == [
        Conv2dReLUPool,
        nn.Identity,
        nn.Identity,
        nn.Conv2d,  # 4 input channels: the fused first layer takes images of one channel
        MaxPoolReLU,
        nn.Identity,
    ]
    assert "Conv2dReLUPool(1, 4" in repr(fused) and "MaxPoolReLU()" in repr(fused)
    assert "MaxPool2d" not in repr(fused) and "MaxPool2d" in repr(reference)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    for name, value in fused.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
    x = torch.randn(5, 1, 28, 28)
    fused.eval(), reference.eval()
    with torch.inference_mode():
        assert torch.allclose(fused(x), reference(x), atol=1e-5)  # the first layer sums in another order
