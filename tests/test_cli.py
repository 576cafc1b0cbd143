"""The cnnkit command line: train, evaluate, predict, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnnkit import __version__
from cnnkit.cli import build_parser, main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnkit: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"cnnkit {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "predict", "data"):
        assert command in out


def test_train_then_resume_from_the_command_line(capsys, tmp_path, small_npz):
    out_dir = tmp_path / "run"
    code, out, _ = run(capsys, "train", "--dataset", small_npz, "--epochs", 1, "--out", out_dir)
    assert code == 0
    assert "epoch 1/1" in out and "valid_acc" in out and "img/s" in out and "parameters" in out
    assert (out_dir / "checkpoints" / "epoch-001.safetensors").exists()
    code, out, _ = run(capsys, "train", "--resume", out_dir, "--epochs", 2, "--quiet")
    assert (
        code == 0 and out == f"checkpoint: {out_dir / 'checkpoints' / 'epoch-002.safetensors'}\n"
    )  # --quiet
    assert (out_dir / "checkpoints" / "epoch-002.safetensors").exists()
    code, _, err = run(capsys, "train", "--resume", out_dir, "--epochs", 3, "--batch-size", 32)
    assert_one_line_error(code, err, "--batch-size", "resuming")


def test_evaluate_json_has_accuracy_loss_n_and_per_class(capsys, tiny_run, small_npz):
    code, out, _ = run(capsys, "evaluate", tiny_run, "--json", "--precision", "fp32")
    assert code == 0
    report = json.loads(out)
    assert report["n"] == 200 and report["split"] == "test" and report["dataset"] == small_npz
    assert report["precision"] == "fp32" and report["epoch"] == 3
    assert report["accuracy"] > 0.25 and 0 < report["loss"] < 2.3  # a tiny network, above chance (0.1)
    assert set(report["per_class"]) == {str(d) for d in range(10)}
    assert sum(entry["n"] for entry in report["per_class"].values()) == 200
    confusion = np.array(report["confusion_matrix"])
    assert confusion.sum() == 200 and np.trace(confusion) / 200 == pytest.approx(report["accuracy"])
    code, out, _ = run(capsys, "evaluate", tiny_run, "--json")
    assert json.loads(out)["precision"] in ("bf16", "fp32")  # what ran, never "auto"


def test_evaluate_int8_and_fp32_agree_closely(capsys, trained_run):
    reports = {}
    for precision in ("fp32", "int8"):
        code, out, _ = run(capsys, "evaluate", trained_run, "--json", "--precision", precision)
        assert code == 0
        reports[precision] = json.loads(out)
    assert reports["int8"]["precision"] == "int8"
    assert reports["int8"]["accuracy"] == pytest.approx(reports["fp32"]["accuracy"], abs=0.01)


def test_evaluate_table_and_other_splits(capsys, tiny_run):
    code, out, _ = run(capsys, "evaluate", tiny_run, "--split", "valid")
    assert code == 0
    assert "(valid, 128 images" in out and "confusion matrix" in out and "accuracy" in out


def _digit_files(tmp_path, split, count):
    paths = []
    for i in range(count):
        path = tmp_path / f"digit-{i}-label-{split.labels[i]}.png"
        Image.fromarray(split.images[i, 0]).resize((140, 140), Image.Resampling.BILINEAR).save(path)
        paths.append(path)
    return paths


def test_predict_json_reads_image_files(capsys, tmp_path, trained_run, mnist_5k):
    paths = _digit_files(tmp_path, mnist_5k.test, 20)
    code, out, _ = run(capsys, "predict", trained_run, *paths, "--json", "--proba")
    assert code == 0
    results = json.loads(out)
    assert [r["file"] for r in results] == [str(p) for p in paths]
    for r in results:
        assert r["class_name"] == str(r["label"])
        assert set(r["probabilities"]) == {str(d) for d in range(10)}
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    correct = sum(r["label"] == int(p.stem.split("-")[-1]) for r, p in zip(results, paths, strict=True))
    assert correct >= 18


def test_predict_plain_output(capsys, tmp_path, tiny_run, mnist_5k):
    [path] = _digit_files(tmp_path, mnist_5k.test, 1)
    code, out, _ = run(capsys, "predict", tiny_run, path)
    assert code == 0 and out.startswith(f"{path}: ") and "%" in out


def test_errors_are_one_line_with_exit_code_2(capsys, tmp_path, tiny_run):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x_test=np.zeros((4, 28, 28, 3), np.uint8), y_test=np.array([0, 1, 2, 3]))
    cases = [
        (["predict", tiny_run, tmp_path / "missing.png"], ["missing.png", "does not exist"]),
        (["predict", tiny_run, text], ["notes.txt", "not an image"]),
        (["predict", tmp_path / "nope.safetensors", text], ["nope.safetensors"]),
        (["evaluate", corrupt], ["corrupt.safetensors", "corrupt"]),
        (["evaluate", tiny_run, "--dataset", "imagenet"], ["imagenet"]),
        (["evaluate", tiny_run, "--dataset", f"npz:{rgb}"], ["3 x 28 x 28", "1 x 28 x 28"]),
        (["train", "--dataset", "no-such-set", "--out", tmp_path / "x"], ["no-such-set"]),
        (["data", "info", f"npz:{tmp_path / 'missing.npz'}"], ["missing.npz"]),
    ]
    for argv, fragments in cases:
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, *fragments)


def test_bad_option_values_are_refused_by_the_parser(capsys):
    for argv, fragment in [
        (["train", "--epochs", "0"], "--epochs: expected an int >= 1, got '0'"),
        (["train", "--lr", "-1"], "positive finite number"),
        (["train", "--lr", "inf"], "positive finite number"),
        (["train", "--lr", "nan"], "positive finite number"),
        (["train", "--seed", "18446744073709551616"], "an int in [0, 2**63)"),
        (["train", "--valid-size", "nan"], "count"),
        (["train", "--resume", ""], "non-empty"),
        (["train", "--dataset", ""], "non-empty"),
        (["evaluate", ""], "non-empty"),
        (["evaluate", "run", "--checkpoint", "last"], "best, newest or an epoch number"),
        (["train", "--image-size", "0x28"], "HxW"),
        (["train", "--dropout", "1.5"], "[0, 1)"),
        (["train", "--valid-size", "lots"], "count"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_a_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cnnkit", "evaluate", str(tmp_path / "missing-run")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("cnnkit: error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_convnn_checkpoint_is_evaluated_on_a_named_dataset(capsys, tmp_path, mnist_5k):
    from cnnkit import ConvNN

    train = mnist_5k.train
    path = (
        ConvNN(epochs=1, random_state=0)
        .fit(train.images[:300], train.labels[:300])
        .save(tmp_path / "m.safetensors")
    )
    code, _, err = run(capsys, "evaluate", path)
    assert_one_line_error(code, err, "trained on arrays", "--dataset")
    code, out, _ = run(capsys, "evaluate", path, "--dataset", "mnist-5k", "--json")
    assert code == 0 and json.loads(out)["n"] == 500


def test_train_with_no_dataset_downloads_mnist_and_trains_the_chapters_recipe(
    capsys, tmp_path, monkeypatch, server
):
    # The default dataset is full MNIST, fetched when absent: here from a server on 127.0.0.1 that serves
    # small IDX files this test makes, with their checksums standing in for the published ones.
    import dataclasses
    import hashlib

    from cnnkit.checkpoint import load_checkpoint
    from cnnkit.data import sources
    from cnnkit.data.idx import write_idx

    rng = np.random.default_rng(0)
    served = tmp_path / "served"
    served.mkdir()
    for name, array in {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (120, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(120, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.arange(30, dtype=np.uint8) % 10,
    }.items():
        write_idx(served / name, array)
    checksums = {  # in the published order: train images, train labels, test images, test labels
        name: "sha256:" + hashlib.sha256((served / name).read_bytes()).hexdigest()
        for name in sources.MNIST.checksums
    }
    sizes = {name: (served / name).stat().st_size for name in checksums}
    monkeypatch.setitem(
        sources.PUBLISHED, "mnist", dataclasses.replace(sources.MNIST, checksums=checksums, sizes=sizes)
    )
    for name in checksums:
        server.routes["/" + name] = ("ok", (served / name).read_bytes())
    monkeypatch.setenv("CNNKIT_MNIST_MIRRORS", server.url + "/")
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path / "cache"))
    code, out, err = run(capsys, "train", "--epochs", "1", "--out", tmp_path / "run")
    assert code == 0 and "training on mnist: 100 train / 20 valid" in out, err
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(checksums)
    record = load_checkpoint(tmp_path / "run").record
    assert record.dataset == "mnist" and record.config.batch_size == 64
    assert record.config.learning_rate == 1e-4 and record.architecture.dropout_rate == 0.5


def test_evaluate_leaves_the_batch_size_to_inference_unless_given():
    # None lets cnnkit.inference pick a cache-sized batch for the network and device (see default_batch_size).
    assert build_parser().parse_args(["evaluate", "run"]).batch_size is None
    assert build_parser().parse_args(["evaluate", "run", "--batch-size", "500"]).batch_size == 500


def test_main_called_from_python_restores_the_signal_handlers(capsys):
    import signal

    from cnnkit.cli import main

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["explain", "conv1d", "--out", "not-a-png.txt"]) == 2
    assert "cnnkit: error: --out 'not-a-png.txt'" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize(
    ("option", "name", "text"),
    [
        ("--shear", "shear", "79.5"),
        ("--shear", "shear", "80"),
        ("--lr", "learning_rate", "inf"),
        ("--dropout", "dropout_rate", "0.99"),
        ("--keep", "keep", "-1"),
        ("--augment", "augment", "elastic"),
    ],
)
def test_train_options_take_exactly_what_the_training_settings_take(option, name, text):
    """The options come from TrainConfig's field metadata: what one refuses, the other refuses."""
    from cnnkit.cli import build_parser
    from cnnkit.recipes import SETTINGS, TrainConfig

    try:
        value = SETTINGS[name].type(text) if SETTINGS[name].metadata["choices"] is None else text
        TrainConfig(**{name: value})
        accepted = True
    except (TypeError, ValueError):
        accepted = False
    try:
        args = build_parser().parse_args(["train", option, text])
        assert getattr(args, name) == value
        parsed = True
    except SystemExit:
        parsed = False
    assert parsed == accepted
