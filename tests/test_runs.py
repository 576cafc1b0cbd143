"""Run folders as a user meets them: folder datasets end to end, class names, callbacks, any directory, pipes."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, start_cnnkit
from PIL import Image

from cnnkit.checkpoint import list_checkpoints, load_checkpoint
from cnnkit.recipes import TrainConfig, default_valid_size
from cnnkit.runs import start_run
from cnnkit.training import EarlyStopping, EpochRecord

quiet = {"log": lambda line: None, "show_progress": False}


def _shape_image(kind: str, rng) -> Image.Image:
    """A 20x20 gray picture: a bright horizontal bar, vertical bar or dot on a dark field, jittered."""
    image = np.zeros((20, 20), np.uint8)
    a, b = rng.integers(4, 16, 2)
    if kind == "bar-h":
        image[a - 1 : a + 2, 2:18] = 230
    elif kind == "bar-v":
        image[2:18, b - 1 : b + 2] = 230
    else:
        image[a - 2 : a + 2, b - 2 : b + 2] = 230
    return Image.fromarray(np.clip(image + rng.integers(0, 25, image.shape), 0, 255).astype(np.uint8))


def _shapes_folder(root, splits, seed=0):
    """root/SPLIT/CLASS/i.png for {split: {class: count}}."""
    rng = np.random.default_rng(seed)
    for split, classes in splits.items():
        for kind, count in classes.items():
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                _shape_image(kind, rng).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    counts = {"bar-h": 60, "bar-v": 60, "dot": 60}
    return _shapes_folder(root / "shapes", {"train": counts, "test": dict.fromkeys(counts, 15)})


def test_a_folder_dataset_through_the_command_line(cli, tmp_path, shapes):
    run = tmp_path / "run"
    result = cli(
        "train",
        "--dataset",
        f"folder:{shapes}",
        "--epochs",
        6,
        "--lr",
        "1e-3",
        "--valid-size",
        30,
        "--out",
        run,
    )
    assert result.code == 0, result.err
    assert "1 x 20 x 20" in result.out and "parameters" in result.out
    full = json.loads(cli("evaluate", run, "--json", "--precision", "fp32").out)
    assert full["n"] == 45 and full["accuracy"] > 0.8
    # Another folder whose test split holds 2 of the 3 classes, so its own order is (bar-v, dot):
    other = _shapes_folder(tmp_path / "other", {"test": {"dot": 15, "bar-v": 15}}, seed=0)
    (other / "test" / "bar-v").rename(other / "test" / "bar-v")
    subset = json.loads(
        cli("evaluate", run, "--dataset", f"folder:{other}", "--json", "--precision", "fp32").out
    )
    assert subset["n"] == 30 and set(subset["per_class"]) == {"bar-h", "bar-v", "dot"}
    assert subset["per_class"]["bar-h"]["n"] == 0 and subset["per_class"]["dot"]["n"] == 15
    assert subset["accuracy"] > 0.8  # by position it would score the dots as bar-v: about 0 or 50%
    stars = _shapes_folder(tmp_path / "stars", {"test": {"dot": 3, "star": 3}})
    cli("evaluate", run, "--dataset", f"folder:{stars}").assert_one_line_error("'star'", "does not know")
    images = sorted((shapes / "test" / "dot").glob("*.png"))[:5]
    predicted = json.loads(cli("predict", run, *images, "--json").out)
    assert [p["class_name"] for p in predicted].count("dot") >= 4
    # The same dots drawn dark on light paper, as a user's photo would be: read as dots too.
    on_paper = []
    for image in images:
        on_paper.append(tmp_path / f"paper-{image.name}")
        Image.fromarray(255 - np.asarray(Image.open(image))).save(on_paper[-1])
    predicted = json.loads(cli("predict", run, *on_paper, "--json").out)
    assert [p["class_name"] for p in predicted].count("dot") >= 4
    summary = cli("summary", run)
    assert summary.code == 0 and "bar-h, bar-v, dot" in summary.out and "parameters" in summary.out


def test_a_run_works_from_any_directory(cli, tmp_path, small_npz):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    npz = small_npz.removeprefix("npz:")
    (here / "digits.npz").write_bytes(Path(npz).read_bytes())
    result = cli("train", "--dataset", "npz:digits.npz", "--epochs", 1, "--out", "run", "--quiet", cwd=here)
    assert result.code == 0, result.err
    assert load_checkpoint(here / "run").record.dataset == f"npz:{here / 'digits.npz'}"
    evaluated = cli("evaluate", here / "run", "--json", cwd=elsewhere)
    assert evaluated.code == 0 and json.loads(evaluated.out)["n"] == 200, evaluated.err
    resumed = cli("train", "--resume", here / "run", "--epochs", 2, "--quiet", cwd=elsewhere)
    assert resumed.code == 0, resumed.err
    assert load_checkpoint(here / "run").epoch == 2


@pytest.mark.slow  # a real process over seconds
def test_epoch_lines_reach_a_pipe_as_they_are_written(tmp_path, small_npz):
    proc = start_cnnkit("train", "--dataset", small_npz, "--epochs", "6", "--out", str(tmp_path), text=True)
    # An epoch's line is written once its checkpoint is on disk. Seen from here: the newest checkpoint
    # on disk when each line arrives. Printed as they are written, epoch 1's line comes while the run
    # is still at its first epochs; from a block buffer, every line would come at the end, after
    # epoch 6's checkpoint. (No clock: a busy machine only slows both sides.)
    newest_on_disk = {}
    for line in proc.stdout:
        if line.startswith("epoch "):
            running = proc.poll() is None
            checkpoints = list_checkpoints(tmp_path)
            newest_on_disk[line.split()[1]] = (int(checkpoints[-1].stem.split("-")[1]), running)
    assert proc.wait() == 0, proc.stderr.read()
    assert list(newest_on_disk) == [f"{k}/6" for k in range(1, 7)]
    for k, (newest, _) in enumerate(newest_on_disk.values(), start=1):
        assert newest >= k  # the line came after its checkpoint
    first, last = newest_on_disk["1/6"], newest_on_disk["6/6"]
    assert first[1], "the process had ended when epoch 1's line arrived"
    assert first[0] < last[0] == 6, "the lines arrived together, as a block buffer would give them"


def test_best_epoch_is_kept_beside_the_newest_and_addressable(cli, tiny_run):
    record = load_checkpoint(tiny_run).record
    best = record.best_epoch
    accuracies = [h["valid_accuracy"] for h in record.history]
    assert best == 1 + accuracies.index(max(accuracies))
    kept = sorted({best, 3})
    assert [p.name for p in list_checkpoints(tiny_run)] == [f"epoch-{e:03d}.safetensors" for e in kept]
    report = json.loads(cli("evaluate", tiny_run, "--checkpoint", "best", "--json").out)
    assert report["epoch"] == best and report["checkpoint"].endswith(f"epoch-{best:03d}.safetensors")
    cli("evaluate", tiny_run, "--checkpoint", "9").assert_one_line_error("epoch 9 is not kept")


def test_metrics_csv_has_one_row_per_epoch_with_keras_columns(tiny_run):
    with open(tiny_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "loss", "val_loss", "val_accuracy", "lr", "seconds"]
    history = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in history] == [1, 2, 3]
    assert [float(r["val_accuracy"]) for r in rows] == [h["valid_accuracy"] for h in history]
    assert all(float(r["lr"]) == 1e-3 for r in rows)


def test_early_stopping_counts_epochs_without_a_lower_validation_loss():
    stopping = EarlyStopping(patience=2)
    losses = [1.0, 0.8, 0.9, 0.85, 0.7, 0.75, 0.75]
    stops = [
        stopping.on_epoch_end(EpochRecord(i + 1, 1.0, loss, 0.5, 1e-3, 1.0, 1.0))
        for i, loss in enumerate(losses)
    ]
    assert stops == [False, False, False, True, False, False, True]
    assert "epoch 7" in stopping.reason and "best 0.7000 at epoch 5" in stopping.reason


def test_patience_stops_a_run_and_resume_continues_its_count_exactly(tmp_path, small_npz):
    # A learning rate of 1e-30 cannot move float32 weights: the validation loss never gets lower.
    config = TrainConfig(epochs=8, learning_rate=1e-30, patience=2, seed=0)
    lines = []
    run = start_run(
        small_npz, config, tmp_path / "a", architecture=TINY, log=lines.append, show_progress=False
    )
    assert [h["epoch"] for h in run.history] == [1, 2, 3]
    assert lines[-1].startswith("early stop after epoch 3: no lower valid_loss for 2 epochs")
    state = load_checkpoint(tmp_path / "a").record.trainer_state["early_stopping"]
    assert state["wait"] == 2 and state["best_epoch"] == 1


def test_the_fast_recipe_sets_aside_a_tenth_at_most_2000():
    assert default_valid_size("fast", 4500) == 450 and default_valid_size("fast", 60000) == 2000
    assert default_valid_size("chapter", 60000) == 10000 and default_valid_size("chapter", 4500) == 750


def test_keep_is_remembered_across_resume(cli, tmp_path, small_npz):
    run = tmp_path / "run"
    assert (
        cli(
            "train",
            "--dataset",
            small_npz,
            "--epochs",
            2,
            "--keep",
            1,
            "--valid-size",
            0,
            "--out",
            run,
            "--quiet",
        ).code
        == 0
    )
    assert cli("train", "--resume", run, "--epochs", 4, "--quiet").code == 0
    assert [p.name for p in list_checkpoints(run)] == ["epoch-004.safetensors"]
    assert load_checkpoint(run).record.config.keep == 1


def test_the_progress_bar_shows_eta_and_the_running_loss(capsys, small_npz):
    import torch

    from cnnkit.data import Standardization, load_dataset
    from cnnkit.model import Architecture, build_model
    from cnnkit.training import make_optimizer, train

    split = load_dataset(small_npz).train
    images = torch.from_numpy(Standardization.fit(split.images).apply(split.images))
    model = build_model(Architecture(**TINY), seed=0)
    config = TrainConfig(epochs=1, batch_size=16, learning_rate=1e-3)
    train(
        model,
        make_optimizer(model, 1e-3),
        (images, torch.from_numpy(split.labels)),
        config=config,
        show_progress=True,
    )
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "/40 [" in err and "<00:" in err  # tqdm's [elapsed<remaining]
    assert re.search(r", loss \d\.\d{4}\]", err), err


def test_a_network_over_100_mb_is_announced_with_a_hint():
    from cnnkit.model import Architecture
    from cnnkit.runs import _log_summary

    lines = []
    _log_summary(Architecture(input_shape=(3, 224, 224), num_classes=3), "layers", lines.append)
    assert "184,1" in lines[-2] or "parameters" in lines[-2]
    assert lines[-1].startswith("warning: the weights take") and "--image-size" in lines[-1]
    lines.clear()
    _log_summary(Architecture(), "layers", lines.append)
    assert not lines[-1].startswith("warning")


def test_evaluate_and_predict_take_device_and_threads(cli, tiny_run, tmp_path, mnist_5k):
    result = cli("evaluate", tiny_run, "--device", "cpu", "--threads", 1, "--json")
    assert result.code == 0 and json.loads(result.out)["device"] == "cpu", result.err
    path = tmp_path / "digit.png"
    Image.fromarray(mnist_5k.test.images[0, 0]).save(path)
    assert cli("predict", tiny_run, path, "--device", "cpu", "--threads", 1).code == 0


def _history_files_epochs(run) -> tuple[list, list]:
    """The epochs that RUN/history.jsonl and RUN/metrics.csv list."""
    history = [json.loads(line)["epoch"] for line in (run / "history.jsonl").read_text().splitlines()]
    with open(run / "metrics.csv") as f:
        return history, [int(row["epoch"]) for row in csv.DictReader(f)]


def test_the_history_files_never_list_an_epoch_whose_checkpoint_is_not_on_disk(
    tmp_path, small_npz, monkeypatch, one_torch_thread
):
    import errno

    from cnnkit import runs
    from cnnkit.runs import resume_run

    run, save = tmp_path / "run", runs.save_checkpoint

    def disk_full_at_epoch_2(path, *args, **kwargs):
        if path.name == "epoch-002.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(path, *args, **kwargs)

    monkeypatch.setattr(runs, "save_checkpoint", disk_full_at_epoch_2)
    config = TrainConfig(epochs=3, seed=0, learning_rate=1e-3)
    with pytest.raises(OSError, match="No space left"):
        start_run(small_npz, config, run, architecture=TINY, valid_size=64, **quiet)
    assert [p.name for p in list_checkpoints(run)] == ["epoch-001.safetensors"]
    assert _history_files_epochs(run) == ([1], [1])
    # Files that list more (left by an older cnnkit) are written afresh from the checkpoint on resume.
    with open(run / "history.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": 0.1}) + "\n")
    monkeypatch.setattr(runs, "save_checkpoint", save)
    resume_run(run, 2, **quiet)
    assert _history_files_epochs(run) == ([1, 2], [1, 2])
    assert [h["epoch"] for h in load_checkpoint(run).record.history] == [1, 2]


def test_a_run_folder_may_be_inside_a_folder_named_checkpoints_of_no_run(
    tmp_path, small_npz, one_torch_thread
):
    run = tmp_path / "checkpoints" / "run"
    start_run(small_npz, TrainConfig(epochs=1, seed=0), run, architecture=TINY, valid_size=0, **quiet)
    assert [p.name for p in list_checkpoints(run)] == ["epoch-001.safetensors"]
