"""cnnkit.kernels.winograd: the second convolution as Winograd's F(4x4, 5x5) in float32."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from cnnkit.kernels import fuse, winograd
from cnnkit.kernels.winograd import WinogradConv2d, matrices, winograd_conv2d


@pytest.fixture
def kernels(cpp_extension, monkeypatch):
    """The C++ transforms, used even where cnnkit would not (built below AVX-512), so that they are tested
    on every CPU."""
    monkeypatch.setattr(winograd, "_kernels", lambda: cpp_extension.winograd)
    return cpp_extension.winograd


@pytest.fixture
def counted(kernels, monkeypatch):
    """The calls that went through the Winograd convolution."""
    calls = []
    apply = winograd._Winograd.apply
    monkeypatch.setattr(
        winograd._Winograd, "apply", lambda *args: calls.append(args[0].shape) or apply(*args)
    )
    return calls


def _relative_error(value, reference):
    return float((value.detach().double() - reference.detach()).abs().max() / reference.detach().abs().max())


def test_the_matrices_compute_the_correlation_exactly():
    a_t, g, b_t = matrices()  # exact in rationals; A^T and B^T stay exact in float32, G is rounded
    torch.manual_seed(0)
    d, w = torch.randn(8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    winograd_1d = a_t.double() @ ((g.double() @ w) * (b_t.double() @ d))
    direct = torch.stack([(d[i : i + 5] * w).sum() for i in range(4)])
    assert torch.allclose(winograd_1d, direct, rtol=0, atol=1e-6)
    assert all(Fraction(float(v)).denominator <= 8 for v in torch.cat([a_t.flatten(), b_t.flatten()]))


def test_the_compiled_matrices_are_the_derived_ones(kernels):
    a_t, _, b_t = matrices()
    compiled_b_t, compiled_a_t = kernels.constants()
    assert torch.equal(torch.tensor(compiled_b_t), b_t) and torch.equal(torch.tensor(compiled_a_t), a_t)


@pytest.mark.parametrize(
    "shape, filters",
    [((64, 32, 12, 12), 64), ((3, 16, 9, 14), 16), ((1, 32, 5, 5), 32), ((2, 16, 11, 8), 48)],
)
def test_values_and_gradients_are_the_convolutions(counted, shape, filters):
    torch.manual_seed(1)
    x = torch.randn(shape).relu().to(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(filters, shape[1], 5, 5) * 0.05).requires_grad_()
    b = (torch.randn(filters) * 0.1).requires_grad_()
    y = winograd_conv2d(x, w, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.conv2d(x64, w64, b64)
    y64.backward(grad.double())
    assert counted and y.shape == y64.shape and y.is_contiguous(memory_format=torch.channels_last)
    # oneDNN's float32 convolution is within about 1e-6 here; Winograd's transforms add error, not much
    assert _relative_error(y, y64) < 3e-5
    assert _relative_error(x.grad, x64.grad) < 3e-5
    assert _relative_error(w.grad, w64.grad) < 5e-5
    assert _relative_error(b.grad, b64.grad) < 1e-6
    assert _relative_error(y, y64) > 0  # it is not the direct convolution's arithmetic


def test_the_same_inputs_give_the_same_bits(counted):
    torch.manual_seed(2)
    x = torch.randn(8, 32, 12, 12).to(memory_format=torch.channels_last).requires_grad_()
    w, b = torch.randn(64, 32, 5, 5, requires_grad=True), torch.randn(64, requires_grad=True)
    results = []
    for _ in range(2):
        x.grad = w.grad = b.grad = None
        y = winograd_conv2d(x, w, b)
        y.square().sum().backward()
        results.append((y.detach().clone(), x.grad.clone(), w.grad.clone(), b.grad.clone()))
    assert all(torch.equal(first, second) for first, second in zip(*results, strict=True))


def test_only_the_gradients_asked_for(counted):
    x = torch.randn(2, 16, 8, 8).to(memory_format=torch.channels_last)
    w, b = torch.randn(16, 16, 5, 5, requires_grad=True), torch.randn(16)
    winograd_conv2d(x, w, b).sum().backward()
    assert counted and w.grad is not None and x.grad is None and b.grad is None


@pytest.mark.parametrize(
    "case",
    ["bf16 autocast", "channels not a multiple of 16", "3x3 filters", "no bias", "float64", "tracing"],
)
def test_other_calls_are_pytorchs_convolution_bit_for_bit(counted, case):
    torch.manual_seed(3)
    x = torch.randn(2, 16 if case != "channels not a multiple of 16" else 12, 10, 10)
    w = torch.randn(16, x.shape[1], *((3, 3) if case == "3x3 filters" else (5, 5)))
    b = None if case == "no bias" else torch.randn(16)
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    if case == "bf16 autocast":
        with torch.autocast("cpu", torch.bfloat16):
            assert torch.equal(winograd_conv2d(x, w, b), F.conv2d(x, w, b))
    elif case == "tracing":
        traced = torch.jit.trace(lambda x: winograd_conv2d(x, w, b), x, check_trace=False)
        assert "aten::_convolution" in str(traced.graph) and torch.equal(traced(x), F.conv2d(x, w, b))
    else:
        assert torch.equal(winograd_conv2d(x, w, b), F.conv2d(x, w, b))
    assert counted == []


def test_without_the_kernels_it_is_pytorchs_convolution(monkeypatch):
    monkeypatch.setattr(winograd, "_kernels", lambda: None)
    x, w, b = torch.randn(2, 32, 12, 12), torch.randn(64, 32, 5, 5), torch.randn(64)
    assert torch.equal(winograd_conv2d(x, w, b), F.conv2d(x, w, b))


@pytest.mark.parametrize("build", ["layers", "lowlevel"])
def test_the_chapters_network_runs_its_second_convolution_so_in_fp32_only(counted, build):
    from cnnkit.model import Architecture, build_model

    model = build_model(Architecture(conv_channels=(16, 32), hidden_units=16), build=build, seed=0)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(3, 1, 28, 28)
    model(x).sum().backward()
    assert counted == [(3, 16, 12, 12)]
    with torch.autocast("cpu", torch.bfloat16):
        model(x).sum().backward()
    assert len(counted) == 1
    model.eval()
    with torch.inference_mode():
        model(x)
    assert len(counted) == 2


def test_fuse_swaps_in_the_module_and_keeps_the_parameters():
    conv = torch.nn.Conv2d(32, 64, 5)
    model = fuse(torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3), conv, torch.nn.Conv2d(12, 16, 5)))
    assert [type(m) for m in model] == [torch.nn.Conv2d, WinogradConv2d, torch.nn.Conv2d]
    assert model[1].weight is conv.weight and model[1].bias is conv.bias
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]


def test_large_batches_go_in_chunks_of_bounded_memory(counted, monkeypatch):
    monkeypatch.setattr(winograd, "MAX_DOMAIN_BYTES", 64 * 4 * 32 * 4 * 3)  # 3 images of 4 tiles
    torch.manual_seed(4)
    x = torch.randn(8, 32, 12, 12).to(memory_format=torch.channels_last)
    w, b = torch.randn(16, 32, 5, 5), torch.randn(16)
    whole = [winograd._Winograd.apply(x[i : i + 1], w, b, winograd._kernels()) for i in range(8)]
    counted.clear()
    with torch.no_grad():
        y = winograd_conv2d(x, w, b)
    assert counted == [(3, 32, 12, 12), (3, 32, 12, 12), (2, 32, 12, 12)]
    assert torch.equal(y, torch.cat(whole)) and y.is_contiguous(memory_format=torch.channels_last)
    counted.clear()
    x.requires_grad_()
    assert (
        torch.equal(winograd_conv2d(x, w, b), F.conv2d(x, w, b)) and counted == []
    )  # training: whole or not
    monkeypatch.setattr(winograd, "MAX_DOMAIN_BYTES", 64 * 4 * 32 * 4 - 1)  # not one image
    assert not winograd.fuses(x, w, b)


def test_a_module_made_with_padding_computes_the_padded_convolution(counted):
    torch.manual_seed(6)
    conv = WinogradConv2d(16, 16, 5, padding=2)
    x = torch.randn(2, 16, 9, 9)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=2)) and counted == []
    assert not winograd.computes(conv) and winograd.computes(WinogradConv2d(16, 16, 5))
