"""Hostile .onnx files, through the command line: a graph runs only if `cnnkit export` could have written
it (its operators, no subgraphs, every tensor of bounded size), checked before onnxruntime reads the
file; anything else is one line naming the file and the operator or tensor, exit 2, in bounded memory.

Each hostile graph is built here with onnx.helper: cnnkit's signature and metadata around one change.
"""

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cnnkit.checkpoint import save_checkpoint
from cnnkit.data import Standardization
from cnnkit.export import export_onnx
from cnnkit.model import Architecture, ResNetArchitecture, build_model
from cnnkit.onnx_model import OPERATORS, OnnxMetadata, load_onnx
from cnnkit.recipes import RECIPES
from cnnkit.record import ModelRecord

pytestmark = pytest.mark.slow  # each hostile graph runs in a child process with a timeout

METADATA = OnnxMetadata(
    class_names=tuple("0123456789"),
    preprocessing="digit",
    input_shape=(1, 28, 28),
    precision="fp32",
    checkpoint_sha256="0" * 64,
    cnnkit_version="0.0",
)


def _tensor(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.array(values, dtype), name)


def _classifier(nodes, initializers=(), value_info=(), weight=0.0):
    """cnnkit's signature (pixels N x 1 x 28 x 28 -> logits and probabilities, N x 10) and metadata around
    a linear layer: `flat` (N, 784) -> `scores` (N, 10), which `nodes` turn into `logits`."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["pixels", "flat_shape"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "weight"], ["scores"], name="linear", transB=1),
            *nodes,
            helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
        ],
        "hostile",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 10])
            for n in ("logits", "probabilities")
        ],
        [
            _tensor("flat_shape", [-1, 784]),
            _tensor("weight", np.full((10, 784), weight), np.float32),
            *initializers,
        ],
        value_info=list(value_info),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    for key, value in METADATA.to_props().items():
        model.metadata_props.add(key=key, value=value)
    return model


def _relu(source="scores", target="logits", **attributes):
    return helper.make_node("Relu", [source], [target], name="relu", **attributes)


def _branch(name, source):
    """A subgraph passing on `source` (a tensor of the graph around it) as its one output."""
    return helper.make_graph(
        [helper.make_node("Identity", [source], [f"{name}_out"])],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
    )


def _loop():
    # The repro: 10^12 turns of a loop that does nothing; `cnnkit predict` never returned.
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["go_on"], ["go_on_out"]),
            helper.make_node("Identity", ["carried"], ["carried_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("turn", TensorProto.INT64, []),
            helper.make_tensor_value_info("go_on", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("go_on_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carried_out", TensorProto.FLOAT, None),
        ],
    )
    loop = helper.make_node("Loop", ["turns", "always", "scores"], ["logits"], name="spin", body=body)
    return _classifier([loop], [_tensor("turns", 10**12), _tensor("always", True, np.bool_)])


def _constant_of_shape(size):
    # The repro: onnxruntime fills it while loading the file (4 EB, 12 GB: a traceback, exit 1).
    return _classifier(
        [
            helper.make_node(
                "ConstantOfShape",
                ["size"],
                ["filled"],
                name="fill",
                value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
            ),
            helper.make_node("ReduceSum", ["filled"], ["total"], name="sum", keepdims=0),
            helper.make_node("Add", ["scores", "total"], ["logits"], name="add"),
        ],
        [_tensor("size", size)],
    )


def _nested_subgraph():
    inner = helper.make_node(
        "If", ["always"], ["inner"], then_branch=_branch("a", "scores"), else_branch=_branch("b", "scores")
    )
    then_branch = helper.make_graph(
        [inner], "then", [], [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)]
    )
    outer = helper.make_node(
        "If",
        ["always"],
        ["logits"],
        name="choose",
        then_branch=then_branch,
        else_branch=_branch("c", "scores"),
    )
    return _classifier([outer], [_tensor("always", True, np.bool_)])


def _padded_convolution():
    # Operators of cnnkit's own, asking for 4.4e12 values: a 1x1 image padded by 2^20 on every side.
    side = 2 * 2**20 + 1
    return _classifier(
        [
            helper.make_node("Conv", ["speck", "kernel"], ["padded"], name="pad", pads=[2**20] * 4),
            helper.make_node("MaxPool", ["padded"], ["peak"], name="pool", kernel_shape=[side, side]),
            helper.make_node("Reshape", ["peak", "one"], ["offset"], name="squeeze"),
            helper.make_node("Sub", ["scores", "offset"], ["logits"], name="shift"),
        ],
        [
            _tensor("speck", np.ones((1, 1, 1, 1)), np.float32),
            _tensor("kernel", np.ones((1, 1, 1, 1)), np.float32),
            _tensor("one", [1]),
        ],
    )


def _square_of_the_batch():
    # Operators of cnnkit's own, a tensor of (784 N)^2 values: small for one image, 161 GB for 256. It is
    # refused at its first tensor whose first dimension is not the number of images.
    return _classifier(
        [
            helper.make_node("Reshape", ["pixels", "column_shape"], ["column"], name="column"),
            helper.make_node("Reshape", ["pixels", "row_shape"], ["row"], name="row"),
            helper.make_node("Gemm", ["column", "row"], ["square"], name="outer"),
            helper.make_node("Gemm", ["square", "column"], ["back"], name="inner"),
            helper.make_node("Reshape", ["back", "flat_shape"], ["back_flat"], name="unflatten"),
            helper.make_node("Gemm", ["back_flat", "weight"], ["echo"], name="echo", transB=1),
            helper.make_node("Sub", ["scores", "echo"], ["logits"], name="shift"),
        ],
        [_tensor("column_shape", [-1, 1]), _tensor("row_shape", [1, -1])],
    )


def _huge_initializer():
    huge = TensorProto(name="unused", data_type=TensorProto.FLOAT, dims=[10**6, 10**6])  # and no data
    return _classifier([_relu()], [huge])


HOSTILE = {
    "loop": (_loop, ["node 'spin' (Loop) holds a subgraph"]),
    "constant of 4 EB": (lambda: _constant_of_shape([10**9, 10**9]), ["operator ConstantOfShape", "'fill'"]),
    "constant of 12 GB": (lambda: _constant_of_shape([3, 10**9]), ["operator ConstantOfShape", "'fill'"]),
    "custom operator": (
        lambda: _classifier(
            [helper.make_node("Exec", ["scores"], ["logits"], name="x", domain="com.example")]
        ),
        ["operator com.example.Exec", "not one that `cnnkit export` writes"],
    ),
    "operator of onnx's, not cnnkit's": (
        lambda: _classifier([helper.make_node("Sin", ["scores"], ["logits"], name="sine")]),
        ["operator Sin (node 'sine')"],
    ),
    "nested subgraph": (_nested_subgraph, ["node 'choose' (If) holds a subgraph"]),
    "subgraph in an allowed operator": (
        lambda: _classifier([_relu(body=_branch("d", "scores"))]),
        ["node 'relu' (Relu) holds a subgraph"],
    ),
    "declared dimension": (
        lambda: _classifier(
            [_relu()],
            value_info=[helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 10**12])],
        ),
        ["tensor 'scores' is batch x 1000000000000", "over cnnkit's limit"],
    ),
    "initializer of 4 TB": (
        _huge_initializer,
        ["tensor 'unused' is 1000000 x 1000000", "over cnnkit's limit"],
    ),
    "computed dimension": (_padded_convolution, ["tensor 'padded' is 1 x 1 x 2097153 x 2097153", "limit"]),
    "tensor growing faster than the batch": (
        _square_of_the_batch,
        ["tensor 'column' is 784 x 1 for one image and 1568 x 1 for two"],
    ),
}


@pytest.fixture(scope="module")
def digit(tmp_path_factory, mnist_5k):
    path = tmp_path_factory.mktemp("images") / "digit.png"
    Image.fromarray(mnist_5k.test.images[0, 0]).save(path)
    return path


@pytest.mark.parametrize("case", HOSTILE)
def test_a_graph_no_export_could_have_written_is_one_line_before_onnxruntime_reads_it(
    cli, tmp_path, digit, case
):
    build, fragments = HOSTILE[case]
    path = tmp_path / "hostile.onnx"
    onnx.save(build(), str(path))
    # In a child process, with a time limit: before this check, the loop ran for ever and the
    # constants and the padding asked onnxruntime for terabytes.
    cli("predict", path, digit, timeout=60).assert_one_line_error(str(path), *fragments)


def test_a_graph_of_cnnkits_operators_and_sizes_runs_though_no_export_wrote_it(cli, tmp_path, digit):
    # What the hostile graphs above change, left out: the same graph runs.
    path = tmp_path / "linear.onnx"
    onnx.save(_classifier([_relu()]), str(path))
    result = cli("predict", path, digit, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)[0]["confidence"] == pytest.approx(0.1)


def test_nan_outputs_are_null_in_predicts_and_evaluates_json(cli, tmp_path, digit, small_npz):
    path = tmp_path / "nan.onnx"
    onnx.save(_classifier([_relu()], weight=np.nan), str(path))
    result = cli("predict", path, digit, "--json", "--proba")
    assert result.code == 0, result.err
    [prediction] = json.loads(result.out, parse_constant=pytest.fail)  # strict JSON: no NaN
    assert prediction["confidence"] is None and set(prediction["probabilities"].values()) == {None}
    result = cli("evaluate", path, "--dataset", small_npz, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out, parse_constant=pytest.fail)["loss"] is None


@pytest.fixture(scope="module")
def exports(tmp_path_factory, small_npz):
    """An untrained small network of either build, and a small ResNet, exported as fp32 and as int8:
    {(build or "resnet", precision): path}."""
    folder = tmp_path_factory.mktemp("exports")
    chapter = Architecture(conv_channels=(4, 8), hidden_units=32)
    networks = {
        "layers": (chapter, dataclasses.replace(RECIPES["fast"], build="layers")),
        "lowlevel": (chapter, dataclasses.replace(RECIPES["fast"], build="lowlevel")),
        "resnet": (ResNetArchitecture((1, 28, 28), 10, (4, 8, 8, 8)), RECIPES["photos"]),
    }
    paths = {}
    for build, (arch, config) in networks.items():
        record = ModelRecord(
            architecture=arch,
            class_names=tuple("0123456789"),
            standardization=Standardization((33.0,), (78.0,)),
            preprocessing="digit",
            config=config,
            dataset=small_npz,
        )
        checkpoint = save_checkpoint(
            folder / f"{build}.safetensors", build_model(arch, record.build, seed=0), record
        )
        for precision in ("fp32", "int8"):
            out = folder / f"{build}-{precision}.onnx"
            paths[build, precision] = export_onnx(checkpoint, out, precision=precision).path
    return paths


def test_cnnkits_own_exports_use_exactly_the_allowed_operators_and_still_run(cli, exports, digit):
    used = set()
    for (build, precision), path in exports.items():
        used |= {node.op_type for node in onnx.load(str(path)).graph.node}
        assert load_onnx(path).metadata.precision == precision
        result = cli("predict", path, digit, "--json")
        assert result.code == 0, (build, precision, result.err)
    # the allow-list is what the exports write, no more, no less, and Transpose, which earlier exports of
    # the low-level build wrote (the export now takes every network's layer build)
    assert used | {"Transpose"} == OPERATORS and "Transpose" not in used
