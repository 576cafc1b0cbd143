"""cnnkit.pooling: max_pool_relu against F.relu(F.max_pool2d(x, 2, 2, ceil_mode=True)), bit for bit.

Every comparison is of bits (NaN payloads and the sign of zero included), of the output and of the
gradient, for the C++ kernels and for the fallback where they cannot be built (PyTorch's own op).
"""

import logging
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cnnkit.kernels import extension, pooling
from cnnkit.kernels.pooling import MaxPoolReLU, kernel_name, max_pool_relu

FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHAPES = [
    (64, 32, 24, 24),
    (64, 64, 8, 8),
    (3, 5, 7, 9),
    (2, 3, 1, 1),
    (0, 4, 6, 6),
    (2, 4, 1, 7),
    (1, 3, 8, 1),
    (2, 20, 37, 35),  # whole blocks of 16 lanes and a remainder, in channels (NHWC) and in a row (NCHW)
    (1, 16, 6, 64),
]
BITS = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float64: torch.int64,
}


def reference(x):
    return F.relu(F.max_pool2d(x, 2, 2, ceil_mode=True))


@pytest.fixture(scope="session")
def cpp_kernels(cpp_extension):
    return cpp_extension.pool_relu


def use_kernels(implementation, request, monkeypatch):
    """Makes max_pool_relu use the C++ kernels or PyTorch's own op until the test ends."""
    chosen = request.getfixturevalue("cpp_kernels") if implementation == "C++" else pooling.PURE_PYTORCH
    monkeypatch.setattr(pooling, "_resolved", chosen)
    assert kernel_name() == implementation
    return chosen


@pytest.fixture(params=["C++", "pure PyTorch"])
def kernels(request, monkeypatch):
    return use_kernels(request.param, request, monkeypatch)


def make_input(kind, shape, dtype, memory_format, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=generator)
    elif kind == "ties":  # many equal maxima in a window, many all-equal windows
        x = torch.randint(-2, 3, shape, generator=generator).float()
    elif kind == "equal":
        x = torch.ones(shape)
    elif kind == "negative":
        x = -0.5 - torch.rand(shape, generator=generator)
    else:
        raise ValueError(kind)
    return x.to(dtype).contiguous(memory_format=memory_format)


def forward_backward(fn, x, seed=1):
    """fn's output and its gradient with respect to x (x's own strides, as the backward pass returns it:
    before any accumulation into .grad) for a random grad_output with some -0.0 in it."""
    leaf = x.detach().requires_grad_()
    output = fn(leaf)
    generator = torch.Generator().manual_seed(seed)
    grad_output = torch.randn(output.shape, generator=generator).to(output.dtype)
    grad_output[grad_output.abs() < 0.1] = -0.0
    (grad,) = torch.autograd.grad(output, leaf, grad_output)
    return output, grad


def assert_same_bits(actual, expected, nan_bits=True):
    """Same dtype, shape and bits. nan_bits=False: NaNs only need to be NaN (their sign and payload may
    differ), the other elements must have the same bits."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.numel() == 0:
        return
    if not nan_bits:
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(actual), nan), "NaNs in different places"
        actual, expected = actual.masked_fill(nan, 0), expected.masked_fill(nan, 0)
    bits = BITS[actual.dtype]
    differ = actual.view(bits) != expected.view(bits)
    assert not differ.any(), (
        f"{int(differ.sum())} of {actual.numel()} elements differ, first at {differ.nonzero()[0].tolist()}"
    )


def layout(tensor):
    """What a memory format means for a tensor: its contiguity, and its strides where the size is > 1
    (the strides of a dimension of size 1 are arbitrary)."""
    return (
        tensor.is_contiguous(),
        tensor.is_contiguous(memory_format=torch.channels_last),
        tuple(stride for stride, size in zip(tensor.stride(), tensor.shape, strict=True) if size > 1),
    )


def assert_matches_reference(x, nan_bits=True):
    output, grad = forward_backward(max_pool_relu, x)
    expected_output, expected_grad = forward_backward(reference, x)
    assert_same_bits(output, expected_output, nan_bits)
    assert_same_bits(grad, expected_grad, nan_bits)
    assert layout(output) == layout(expected_output)
    assert layout(grad) == layout(expected_grad)


@pytest.mark.parametrize("kind", ["normal", "ties", "equal", "negative"])
@pytest.mark.parametrize("memory_format", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_output_and_gradient_are_bit_identical(kernels, shape, dtype, memory_format, kind):
    assert_matches_reference(make_input(kind, shape, dtype, memory_format))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_tie_goes_to_the_first_maximum_and_nan_to_the_last(kernels, dtype):
    nan, inf = float("nan"), float("inf")
    windows = [
        ([1, 1, 1, 1], [1, 0, 0, 0]),
        ([0, 2, 2, 2], [0, 1, 0, 0]),
        ([0, 1, 3, 3], [0, 0, 1, 0]),
        ([-1, -1, -1, -1], [0, 0, 0, 0]),  # ReLU cuts the gradient off
        ([nan, 5, nan, 7], [0, 0, 1, 0]),
        ([1, nan, 2, 3], [0, 1, 0, 0]),
        ([-inf, -inf, -inf, -inf], [0, 0, 0, 0]),
        ([inf, inf, 1, 1], [1, 0, 0, 0]),
    ]
    for values, gradient in windows:
        x = torch.tensor(values, dtype=dtype).reshape(1, 1, 2, 2).requires_grad_()
        max_pool_relu(x).backward(torch.ones(1, 1, 1, 1, dtype=dtype))
        assert x.grad.flatten().tolist() == gradient, values
    # And in PyTorch's own op, which is what these windows assume:
    for values, gradient in windows:
        x = torch.tensor(values, dtype=dtype).reshape(1, 1, 2, 2).requires_grad_()
        reference(x).backward(torch.ones(1, 1, 1, 1, dtype=dtype))
        assert x.grad.flatten().tolist() == gradient, values


SPECIAL_VALUES = [0.0, -0.0, 1.0, -1.0, 2.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40]


@st.composite
def special_inputs(draw):
    """Small inputs of few distinct values (ties everywhere), signed zeros, infinities, NaNs and
    subnormals, in NCHW, channels_last or strided views that are neither."""
    shape = (
        draw(st.integers(0, 3)),
        draw(st.integers(1, 40)),
        draw(st.integers(1, 9)),
        draw(st.integers(1, 70)),
    )
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    values = torch.tensor(draw(st.lists(st.sampled_from(SPECIAL_VALUES), min_size=1, max_size=5)))
    generator = torch.Generator().manual_seed(seed)
    x = values[torch.randint(len(values), shape, generator=generator)].to(dtype)
    view = draw(st.sampled_from(["NCHW", "channels_last", "transposed", "sliced", "expanded"]))
    if view == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif view == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    elif view == "sliced":
        x = torch.cat([x, x], dim=3)[..., ::2]
    elif view == "expanded":  # stride 0 over the channels
        x = x[:, :1].expand(shape)
    return x


@pytest.mark.parametrize("implementation", ["C++", "pure PyTorch"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=special_inputs())
def test_special_values_and_layouts(request, monkeypatch, implementation, x):
    use_kernels(implementation, request, monkeypatch)
    # PyTorch's own bfloat16 kernels turn some NaNs into 0xffff, depending on length and layout.
    assert_matches_reference(x, nan_bits=x.dtype == torch.float32)


@pytest.mark.parametrize("memory_format", FORMATS.values(), ids=FORMATS.keys())
def test_memory_format_follows_the_input(kernels, memory_format):
    x = make_input("normal", (2, 8, 6, 5), torch.float32, memory_format).requires_grad_()
    output = max_pool_relu(x)
    output.sum().backward()
    assert output.is_contiguous(memory_format=memory_format)
    assert x.grad.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", FORMATS.values(), ids=FORMATS.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_in_a_network_the_weight_gradients_are_bit_identical(kernels, dtype, memory_format):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1).to(dtype=dtype, memory_format=memory_format)
    x = torch.randn(4, 3, 11, 10).to(dtype).contiguous(memory_format=memory_format)
    grads = []
    for pool in (max_pool_relu, reference):
        conv.zero_grad(set_to_none=True)
        (pool(conv(x)) * torch.linspace(-1, 1, 6 * 5).reshape(6, 5).to(dtype)).sum().backward()
        grads.append((conv.weight.grad, conv.bias.grad))
    for actual, expected in zip(*grads, strict=True):
        assert_same_bits(actual, expected)


def test_module_replaces_maxpool_and_relu(kernels):
    x = make_input("ties", (2, 3, 9, 8), torch.float32, torch.contiguous_format)
    layer = MaxPoolReLU()
    expected = nn.Sequential(nn.MaxPool2d(2, 2, ceil_mode=True), nn.ReLU())
    output, grad = forward_backward(layer, x)
    expected_output, expected_grad = forward_backward(expected, x)
    assert_same_bits(output, expected_output)
    assert_same_bits(grad, expected_grad)


@pytest.mark.parametrize("memory_format", FORMATS.values(), ids=FORMATS.keys())
def test_without_gradients(kernels, memory_format):
    x = make_input("normal", (3, 4, 7, 6), torch.bfloat16, memory_format)
    expected = reference(x)
    assert_same_bits(max_pool_relu(x), expected)  # requires_grad False
    with torch.no_grad():
        output = max_pool_relu(x.clone().requires_grad_())
        assert not output.requires_grad
        assert_same_bits(output, expected)
    with torch.inference_mode():
        output = max_pool_relu(x)
        assert output.is_inference()
        assert_same_bits(output, reference(x))
    assert layout(output) == layout(expected)


def test_under_autocast_the_input_dtype_decides(kernels):
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 10, 9)
    grads = []
    for pool in (max_pool_relu, reference):
        conv.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = conv(x)  # bfloat16 under autocast
            output = pool(hidden)
            assert output.dtype == torch.bfloat16
            fp32_output = pool(x)  # float32 in, float32 out
            assert fp32_output.dtype == torch.float32
            assert_same_bits(fp32_output, reference(x))
        output.float().sum().backward()
        grads.append(conv.weight.grad)
    assert_same_bits(grads[0], grads[1])


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(2, 3, 5, 5, dtype=torch.float64),
        torch.randn(3, 5, 4),  # unbatched
        torch.randint(-5, 5, (2, 3, 4, 4)),
        torch.randn(2, 3, 5, 5).half(),
    ],
    ids=["float64", "unbatched", "int64", "float16"],
)
def test_other_inputs_take_pytorchs_path(kernels, x):
    if not x.is_floating_point():  # whatever PyTorch does with integers (raise or pool), the same
        try:
            expected = reference(x)
        except RuntimeError as error:
            with pytest.raises(RuntimeError, match=str(error)):
                max_pool_relu(x)
        else:
            assert torch.equal(max_pool_relu(x), expected)
        return
    output, grad = forward_backward(max_pool_relu, x)
    expected_output, expected_grad = forward_backward(reference, x)
    assert_same_bits(output, expected_output)
    assert_same_bits(grad, expected_grad)


def test_empty_images_raise_as_pytorch_does(kernels):
    x = torch.randn(2, 3, 0, 4)
    with pytest.raises(RuntimeError) as expected:
        reference(x)
    with pytest.raises(RuntimeError) as raised:
        max_pool_relu(x)
    assert str(raised.value) == str(expected.value)


def test_the_kernels_are_loaded_once_across_threads(monkeypatch):
    calls = []

    def load():
        calls.append(1)
        return None

    monkeypatch.setattr(extension, "_loaded", extension._NOT_LOADED)
    monkeypatch.setattr(extension, "_load_or_warn", load)
    threads = [threading.Thread(target=kernel_name) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1]
    assert kernel_name() == "pure PyTorch"


def test_a_failed_build_falls_back_with_one_warning(monkeypatch, caplog):
    def fail(level=None):
        raise RuntimeError(
            "Error building extension 'x': [1/2] c++ ...\nx.cpp:1:1: error: boom\nninja: stopped"
        )

    monkeypatch.setattr(pooling, "_resolved", None)
    monkeypatch.setattr(extension, "_loaded", extension._NOT_LOADED)
    monkeypatch.setattr(extension, "_load_extension", fail)
    monkeypatch.delenv("CNNKIT_PURE_PYTORCH", raising=False)
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        assert kernel_name() == "pure PyTorch"
        assert kernel_name() == "pure PyTorch"
        assert_matches_reference(make_input("ties", (3, 5, 7, 9), torch.bfloat16, torch.channels_last))
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [record.getMessage() for record in warnings] == [
        "could not build cnnkit's C++ kernels (compiler error: x.cpp:1:1: error: boom); "
        "using PyTorch's own ops (slower)"
    ]


CHILD = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F
    import cnnkit.kernels.pooling as pooling
    assert "torch.utils.cpp_extension" not in sys.modules, "importing cnnkit.kernels.pooling imported cpp_extension"
    print(pooling.kernel_name())
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randint(-2, 3, (3, 5, 7, 9)).to(torch.bfloat16).contiguous(memory_format=layout)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = pooling.max_pool_relu(a), F.relu(F.max_pool2d(b, 2, 2, ceil_mode=True))
        grad = torch.randn(out.shape).to(out.dtype)
        out.backward(grad)
        expected.backward(grad)
        assert torch.equal(out, expected) and torch.equal(a.grad, b.grad)
    print("exact")
    """
)


def run_child(env, cache_dir=None):
    child_env = {**os.environ, **env}
    child_env.pop("CNNKIT_CACHE_DIR", None)
    if cache_dir is not None:
        child_env["CNNKIT_CACHE_DIR"] = str(cache_dir)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_environment_variable_selects_pure_pytorch(tmp_path):
    out, err = run_child({"CNNKIT_PURE_PYTORCH": "1"}, tmp_path).communicate(timeout=120)
    assert out.split() == ["pure", "PyTorch", "exact"], err
    assert err == ""
    assert not (tmp_path / "extensions").exists()  # nothing was built


def test_a_compiler_that_fails_gives_one_warning_line(tmp_path):
    child = run_child({"CXX": "/bin/false", "CNNKIT_PURE_PYTORCH": ""}, tmp_path / "empty cache")
    out, err = child.communicate(timeout=300)
    assert out.split() == ["pure", "PyTorch", "exact"], err
    (line,) = err.splitlines()  # torch checks the compiler first: `/bin/false --version` fails
    assert line.startswith("could not build cnnkit's C++ kernels (`/bin/false")
    assert line.endswith("); using PyTorch's own ops (slower)")


@pytest.mark.slow
def test_two_processes_build_at_once_on_an_empty_cache(cpp_kernels, tmp_path):
    """Two DDP ranks starting together: one builds, the other waits for it; both use the C++ kernels and
    print nothing of the build."""
    children = [run_child({"CNNKIT_PURE_PYTORCH": ""}, tmp_path) for _ in range(2)]
    results = [child.communicate(timeout=600) for child in children]
    for out, err in results:
        assert out.split() == ["C++", "exact"], err
        assert err == ""
    (directory,) = (tmp_path / "extensions").iterdir()
    assert (directory / "built").exists()
    # A third process loads the cached library without building.
    out, err = run_child({"CNNKIT_PURE_PYTORCH": "", "CXX": "/bin/false"}, tmp_path).communicate(timeout=120)
    assert out.split() == ["C++", "exact"] and err == ""


def test_tracing_and_export_record_pytorchs_ops(kernels, recwarn):
    """cnnkit export traces the network: there max_pool_relu is max_pool2d and relu, which ONNX knows."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), MaxPoolReLU(), nn.Flatten(), nn.Linear(4 * 5 * 4, 3))
    x = torch.randn(2, 1, 9, 8)
    traced = torch.jit.trace(model, x)
    assert "aten::max_pool2d" in str(traced.inlined_graph)
    assert not [w for w in recwarn if issubclass(w.category, torch.jit.TracerWarning)]
    program = torch.export.export(model, (x,))
    assert "aten.max_pool2d.default" in {str(node.target) for node in program.graph.nodes}
    assert_same_bits(program.module()(x), model(x))


def test_without_pytorchs_private_queries_pytorchs_op_runs(kernels, monkeypatch):
    """The check for functorch transforms and forward-mode AD uses private PyTorch functions; where a
    torch lacks them, max_pool_relu takes PyTorch's own op, with the same bits."""
    x = make_input("ties", (3, 5, 7, 9), torch.bfloat16, torch.channels_last).requires_grad_()
    cpp = kernels is not pooling.PURE_PYTORCH
    assert (max_pool_relu(x).grad_fn.name() == "_MaxPoolReLUBackward") == cpp
    monkeypatch.delattr(torch._C, "_are_functorch_transforms_active")
    assert pooling._transform_active()
    assert max_pool_relu(x).grad_fn.name() != "_MaxPoolReLUBackward"
    assert_matches_reference(x.detach())
