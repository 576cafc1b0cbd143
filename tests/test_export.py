"""Export to ONNX and running .onnx files: parity with PyTorch, int8 agreement, metadata, no torch at run time."""

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from cnnkit.checkpoint import load_network, save_checkpoint
from cnnkit.cli import main
from cnnkit.data import load_dataset_for_model
from cnnkit.export import export_metadata, export_onnx
from cnnkit.inference import predict_logits
from cnnkit.model import build_model, convert_state
from cnnkit.onnx_model import OnnxMetadata, load_onnx


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def lowlevel_checkpoint(tmp_path_factory, tiny_run):
    """The tiny run's newest weights as a checkpoint of the low-level build."""
    model, ckpt = load_network(tiny_run)
    lowlevel = build_model(model.arch, "lowlevel")
    lowlevel.load_state_dict(convert_state(model.state_dict(), model.arch, "layers", "lowlevel"))
    record = ckpt.record.replace(config=dataclasses.replace(ckpt.record.config, build="lowlevel"))
    return save_checkpoint(tmp_path_factory.mktemp("lowlevel") / "lowlevel.safetensors", lowlevel, record)


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory, tiny_run):
    """The tiny run exported as fp32 and as int8: {precision: ExportResult}."""
    folder = tmp_path_factory.mktemp("exports")
    return {p: export_onnx(tiny_run, folder / f"tiny-{p}.onnx", precision=p) for p in ("fp32", "int8")}


def _test_split(record):
    return load_dataset_for_model(record.dataset, record.architecture.input_shape, record.class_names).test


@pytest.mark.parametrize("build", ["layers", "lowlevel"])
def test_fp32_export_gives_pytorchs_logits_and_labels_for_either_build(
    tmp_path, tiny_run, lowlevel_checkpoint, build
):
    source = tiny_run if build == "layers" else lowlevel_checkpoint
    result = export_onnx(source, tmp_path / "model.onnx")
    model, ckpt = load_network(source)
    assert model.__class__.__name__ == ("LayerCNN" if build == "layers" else "LowLevelCNN")
    test = _test_split(ckpt.record)
    reference = predict_logits(model, ckpt.record.standardization.apply(test.images)).numpy()
    exported = load_onnx(tmp_path / "model.onnx")
    logits = exported.predict_logits(test.images)  # raw pixels: standardization is in the graph
    assert np.abs(logits - reference).max() <= 1e-4
    assert (logits.argmax(1) == reference.argmax(1)).mean() >= 0.999
    assert result.max_logit_difference <= 1e-4
    # any batch size: one image, and an odd batch, as in one call of 200
    assert np.abs(exported.predict_logits(test.images[:1]) - reference[:1]).max() <= 1e-4
    assert np.abs(exported.predict_logits(test.images, batch_size=7) - reference).max() <= 1e-4
    probabilities = exported.predict_proba(test.images[:10])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # one file: no external data


def test_trained_model_fp32_parity_and_int8_agreement(tmp_path, trained_run, mnist_5k):
    # The figures: fp32 within 1e-4 of PyTorch, identical labels on >= 99.9% of a test split;
    # int8 (calibrated on the first 512 training images) agreeing with fp32 on >= 99%.
    fp32 = export_onnx(trained_run, tmp_path / "fp32.onnx")
    int8 = export_onnx(trained_run, tmp_path / "int8.onnx", precision="int8")
    model, ckpt = load_network(trained_run)
    images = mnist_5k.test.images
    reference = predict_logits(model, ckpt.record.standardization.apply(images)).numpy()
    fp32_logits = load_onnx(fp32.path).predict_logits(images)
    int8_logits = load_onnx(int8.path).predict_logits(images)
    assert np.abs(fp32_logits - reference).max() <= 1e-4
    assert (fp32_logits.argmax(1) == reference.argmax(1)).mean() >= 0.999
    agreement = (int8_logits.argmax(1) == fp32_logits.argmax(1)).mean()
    assert agreement >= 0.99
    assert int8.agreement == pytest.approx(agreement) and int8.agreement_images == len(images)
    accuracy = {
        name: (lg.argmax(1) == mnist_5k.test.labels).mean()
        for name, lg in [("fp32", fp32_logits), ("int8", int8_logits)]
    }
    assert accuracy["int8"] == pytest.approx(accuracy["fp32"], abs=0.01)
    assert int8.metadata.calibration == "the first 512 training images of mnist-5k"
    assert int8.path.stat().st_size < fp32.path.stat().st_size / 3  # int8 weights


def test_int8_is_static_qdq_per_channel_calibrated_on_training_images(tiny_exports, small_npz):
    result = tiny_exports["int8"]
    assert result.metadata.precision == "int8"
    assert result.metadata.calibration == f"the first 512 training images of {small_npz}"
    graph = onnx.load(str(result.path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "Softmax"} <= ops
    weights = {init.name: init for init in graph.initializer}
    per_channel = [
        node
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in weights
        and weights[node.input[0]].data_type == onnx.TensorProto.INT8
        and len(weights[node.input[1]].dims) == 1
    ]
    assert len(per_channel) >= 2  # the convolutions' weights: one scale per output channel
    assert 0.9 <= result.agreement <= 1.0 and result.agreement_images == 200


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_each_pooling_reads_its_convolution_and_relu_follows_it(tiny_exports, precision):
    # The same values either way; pooled first, onnxruntime's int8 graph stays int8 through the pooling.
    graph = onnx.load(str(tiny_exports[precision].path)).graph
    producer = {out: node for node in graph.node for out in node.output}

    def source(name):  # the float op behind a tensor, through any quantize/dequantize pair
        node = producer[name]
        return source(node.input[0]) if node.op_type in ("QuantizeLinear", "DequantizeLinear") else node

    pools = [node for node in graph.node if node.op_type == "MaxPool"]
    assert len(pools) == 2
    assert [source(pool.input[0]).op_type for pool in pools] == ["Conv", "Conv"]
    relus = [node for node in graph.node if node.op_type == "Relu"]
    assert sorted(source(relu.input[0]).op_type for relu in relus) == ["Gemm", "MaxPool", "MaxPool"]


def test_metadata_is_derived_from_the_record_and_round_trips(tiny_run, tiny_exports):
    result = tiny_exports["fp32"]
    _, ckpt = load_network(tiny_run)
    sha256 = hashlib.sha256(ckpt.path.read_bytes()).hexdigest()
    expected = export_metadata(ckpt.record, sha256)
    assert load_onnx(result.path).metadata == expected == result.metadata
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert props == expected.to_props()
    assert json.loads(props["class_names"]) == list(ckpt.record.class_names)
    assert json.loads(props["input_shape"]) == [1, 28, 28]
    assert props["preprocessing"] == ckpt.record.preprocessing == "digit"
    assert props["cnnkit_version"] and props["checkpoint_sha256"] == sha256
    assert OnnxMetadata.from_props(expected.to_props(), "x.onnx") == expected


def test_a_fresh_onnxruntime_session_runs_the_file_without_cnnkit_or_torch(tmp_path, tiny_run, tiny_exports):
    model, ckpt = load_network(tiny_run)
    pixels = _test_split(ckpt.record).images[:32].astype(np.float32)
    np.save(tmp_path / "pixels.npy", pixels)
    expected = predict_logits(model, ckpt.record.standardization.apply(pixels)).numpy()
    script = textwrap.dedent(
        """
        import json, sys
        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("cnnkit", "torch"):
                    raise ImportError(f"{name} is not installed here")
        sys.meta_path.insert(0, Blocked())
        import numpy as np, onnxruntime as ort
        session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        names = json.loads(session.get_modelmeta().custom_metadata_map["class_names"])
        logits, probabilities = session.run(None, {"pixels": np.load("pixels.npy")})
        np.save("logits.npy", logits)
        print(json.dumps([names[i] for i in probabilities.argmax(1)]))
        print(sorted({m.split(".")[0] for m in sys.modules} & {"cnnkit", "torch"}))
        """
    )
    child = subprocess.run(
        [sys.executable, "-I", "-c", script, str(tiny_exports["fp32"].path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    labels, loaded = child.stdout.splitlines()
    assert loaded == "[]"
    assert json.loads(labels) == [ckpt.record.class_names[i] for i in expected.argmax(1)]
    assert np.abs(np.load(tmp_path / "logits.npy") - expected).max() <= 1e-4


def _digit_files(folder, split, n):
    paths = []
    for i in range(n):
        path = folder / f"digit-{i}.png"
        Image.fromarray(split.images[i, 0]).save(path)
        paths.append(path)
    return paths


def test_predict_and_evaluate_give_the_checkpoints_output_formats(
    capsys, tmp_path, tiny_run, tiny_exports, mnist_5k
):
    onnx_path = tiny_exports["fp32"].path
    images = _digit_files(tmp_path, mnist_5k.test, 3)
    outputs = {}
    for name, model in (("checkpoint", tiny_run), ("onnx", onnx_path)):
        code, out, err = run(capsys, "predict", model, *images, "--json", "--proba", "--precision", "fp32")
        assert code == 0, err
        outputs[name] = json.loads(out)
    for a, b in zip(outputs["checkpoint"], outputs["onnx"], strict=True):
        assert a.keys() == b.keys() and a["file"] == b["file"] and a["label"] == b["label"]
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
    for model in (tiny_run, onnx_path):
        code, out, err = run(capsys, "predict", model, images[0], "--proba")
        assert code == 0 and out.startswith(f"{images[0]}: ") and "%" in out and len(out.splitlines()) == 2, (
            err
        )
    reports, tables = {}, {}
    for name, model in (("checkpoint", tiny_run), ("onnx", onnx_path)):
        code, out, err = run(capsys, "evaluate", model, "--json", "--precision", "fp32")
        assert code == 0, err
        reports[name] = json.loads(out)
        code, out, err = run(capsys, "evaluate", model, "--split", "valid", "--precision", "fp32")
        assert code == 0, err
        tables[name] = out
    checkpoint, exported = reports["checkpoint"], reports["onnx"]
    assert list(checkpoint) == list(exported)
    assert exported["checkpoint"] == str(onnx_path) and exported["precision"] == "fp32"
    assert exported["device"] == "cpu" and exported["epoch"] == checkpoint["epoch"]
    for key in ("dataset", "split", "n", "accuracy", "confusion_matrix", "per_class"):
        assert exported[key] == checkpoint[key], key
    assert exported["loss"] == pytest.approx(checkpoint["loss"], abs=1e-5)
    first, second = (tables[name].splitlines() for name in ("checkpoint", "onnx"))
    assert first[1:] == second[1:]  # the same table; the first line names the file
    assert second[0].startswith(f"{onnx_path} (epoch ") and "valid" in second[0]


# A child process running `cnnkit ARGS` with torch and the other heavy packages made unimportable; at
# exit it writes the names of the modules it loaded to $CNNKIT_TEST_MODULES.
_TORCH_FREE_CHILD = """
import atexit, json, os, runpy, sys
BLOCKED = set(os.environ["CNNKIT_TEST_BLOCK"].split(","))
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocked())
def _write_modules():
    with open(os.environ["CNNKIT_TEST_MODULES"], "w") as f:
        json.dump(sorted(sys.modules), f)
atexit.register(_write_modules)
sys.argv[0] = "cnnkit"
runpy.run_module("cnnkit", run_name="__main__", alter_sys=True)
"""
# onnx is not among them: it checks a graph before onnxruntime runs it.
HEAVY = "torch,safetensors,sklearn,scipy,onnxscript"
TRAINING_CODE = {
    "cnnkit.model",
    "cnnkit.training",
    "cnnkit.runs",
    "cnnkit.record",
    "cnnkit.checkpoint",
    "cnnkit.inference",
    "cnnkit.estimator",
    "cnnkit.export",
    "cnnkit.quantize",
    "cnnkit.device",
}


def _run_blocked(tmp_path, *args, block=HEAVY):
    modules = tmp_path / "modules.json"
    env = {**os.environ, "CNNKIT_TEST_BLOCK": block, "CNNKIT_TEST_MODULES": str(modules)}
    child = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE_CHILD, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return child, set(json.loads(modules.read_text())) if modules.exists() else set()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_running_an_onnx_file_imports_neither_torch_nor_training_code(
    tmp_path, tiny_exports, mnist_5k, precision
):
    onnx_path = tiny_exports[precision].path
    [image] = _digit_files(tmp_path, mnist_5k.test, 1)
    for args in (["predict", onnx_path, image, "--json"], ["evaluate", onnx_path, "--json"]):
        child, modules = _run_blocked(tmp_path, *args)
        assert child.returncode == 0, child.stderr[-3000:]
        assert json.loads(child.stdout)  # a prediction, an evaluation
        assert not {m.split(".")[0] for m in modules} & set(HEAVY.split(","))
        assert not modules & TRAINING_CODE, sorted(modules & TRAINING_CODE)
        assert {"onnx", "onnxruntime"} <= modules


def test_without_the_onnx_extra_the_error_names_it(tmp_path, tiny_exports, tiny_run, mnist_5k):
    [image] = _digit_files(tmp_path, mnist_5k.test, 1)
    for missing in ("onnxruntime", "onnx"):
        child, _ = _run_blocked(tmp_path, "predict", tiny_exports["fp32"].path, image, block=missing)
        lines = child.stderr.strip().splitlines()
        assert child.returncode == 2 and len(lines) == 1 and 'pip install "cnnkit[onnx]"' in lines[0], (
            child.stderr
        )
        assert f"needs {missing}:" in lines[0]
    child, _ = _run_blocked(tmp_path, "export", tiny_run, "-o", tmp_path / "m.onnx", block="onnxscript")
    lines = child.stderr.strip().splitlines()
    assert child.returncode == 2 and len(lines) == 1, child.stderr
    assert "onnxscript" in lines[0] and 'pip install "cnnkit[onnx]"' in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def _with_props(source, target, change):
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    change(props)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(target))
    return target


def test_corrupt_or_foreign_onnx_files_are_one_line_exit_2(cli, tmp_path, tiny_exports, mnist_5k):
    good = tiny_exports["fp32"].path
    [image] = _digit_files(tmp_path, mnist_5k.test, 1)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    cases = [
        (junk, "not a readable ONNX model"),
        (truncated, "not a readable ONNX model"),
        (folder, "not a regular file"),
        (tmp_path / "missing.onnx", "no such file"),
        (_with_props(good, tmp_path / "foreign.onnx", lambda p: p.clear()), "not one exported by cnnkit"),
        (
            _with_props(good, tmp_path / "names.onnx", lambda p: p.update(class_names="[1, 2")),
            "class_names is not valid JSON",
        ),
        (
            _with_props(good, tmp_path / "shape.onnx", lambda p: p.update(input_shape="[3, 28, 28]")),
            "inputs do not fit its metadata",
        ),
        (
            _with_props(good, tmp_path / "style.onnx", lambda p: p.update(preprocessing="sharpen")),
            "preprocessing must be one of",
        ),
        (
            _with_props(good, tmp_path / "newer.onnx", lambda p: p.update(format_version="99")),
            "upgrade cnnkit",
        ),
    ]
    for path, fragment in cases:
        cli("predict", path, image).assert_one_line_error(path.name, fragment)
    cli("evaluate", junk).assert_one_line_error("junk.onnx", "not a readable ONNX model")


def test_options_that_do_not_apply_to_an_onnx_file_are_refused(
    capsys, tmp_path, tiny_run, tiny_exports, mnist_5k
):
    [image] = _digit_files(tmp_path, mnist_5k.test, 1)
    int8 = tiny_exports["int8"].path
    code, _, err = run(capsys, "evaluate", int8, "--precision", "fp32")
    assert code == 2 and "is an int8 model" in err and "cnnkit export --precision fp32" in err
    code, _, err = run(capsys, "predict", int8, image, "--checkpoint", "best")
    assert code == 2 and "--checkpoint best" in err
    code, _, err = run(capsys, "export", tiny_run, "-o", tmp_path / "model.bin")
    assert code == 2 and "must end in .onnx" in err and len(err.strip().splitlines()) == 1


def test_export_command_writes_one_file_and_reports_parity(capsys, tmp_path, tiny_run, small_npz):
    out = tmp_path / "deploy" / "tiny.onnx"
    code, stdout, err = run(
        capsys, "export", tiny_run, "--checkpoint", "best", "-o", out, "--precision", "int8"
    )
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith(f"{out}: int8, ") and "(epoch " in lines[0]
    assert "max |logit difference|" in lines[2]
    assert lines[3].startswith(f"int8   calibrated on the first 512 training images of {small_npz}")
    assert "agree with fp32 on" in lines[3]
    assert [p.name for p in out.parent.iterdir()] == ["tiny.onnx"]  # no temporary or external-data file


def test_the_docs_snippet_classifies_with_numpy_pillow_and_onnxruntime_only(tiny_exports):
    root = Path(__file__).resolve().parent.parent
    [snippet] = re.findall(r"```python\n(.*?)```", (root / "docs" / "onnx.md").read_text(), re.S)
    code = [line for line in snippet.splitlines() if line and not line.startswith(("import", "from"))]
    assert code[0].startswith("session = ") and len(code) == 4  # opening the file, then three lines
    blocker = (
        "import sys\n"
        "class Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('cnnkit', 'torch'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Blocked())\n"
    )
    script = blocker + snippet.replace('"digits.onnx"', repr(str(tiny_exports["fp32"].path)))
    child = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() in tiny_exports["fp32"].metadata.class_names


# --- a diverged model: weights of NaN ---


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory, tiny_run):
    """The tiny run's newest checkpoint with every weight set to NaN, as a diverged run would leave it."""
    import torch

    model, ckpt = load_network(tiny_run)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    return save_checkpoint(tmp_path_factory.mktemp("diverged") / "nan.safetensors", model, ckpt.record)


def test_export_refuses_weights_that_are_not_finite(cli, tmp_path, nan_checkpoint):
    out = tmp_path / "nan.onnx"
    cli("export", nan_checkpoint, "-o", out).assert_one_line_error(str(nan_checkpoint), "NaN or infinite")
    assert not out.exists()


def _strict_json(text):
    return json.loads(text, parse_constant=lambda constant: pytest.fail(f"{constant} in JSON"))


def test_nan_outputs_are_null_in_predicts_json_and_report_json(cli, tmp_path, nan_checkpoint, mnist_5k):
    [image] = _digit_files(tmp_path, mnist_5k.test, 1)
    result = cli("predict", nan_checkpoint, image, "--json", "--proba")
    assert result.code == 0, result.err
    [prediction] = _strict_json(result.out)
    assert prediction["confidence"] is None and set(prediction["probabilities"].values()) == {None}
    result = cli("report", nan_checkpoint, "--out", tmp_path / "report")
    assert result.code == 0, result.err
    report = _strict_json((tmp_path / "report" / "report.json").read_text())
    assert report["loss"] is None and report["mistakes"]
    assert {mistake["confidence"] for mistake in report["mistakes"]} == {None}
