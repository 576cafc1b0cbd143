"""Training recipes: the chapter's constant schedule and the fast recipe's one-cycle schedule."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from cnnkit.checkpoint import load_checkpoint
from cnnkit.cli import main
from cnnkit.errors import CheckpointError
from cnnkit.recipes import RECIPES, TrainConfig, for_dataset, learning_rate_at
from cnnkit.runs import resume_run, start_run

quiet = {"log": lambda line: None, "show_progress": False}


def test_the_chapter_recipe_is_the_chapters():
    chapter = RECIPES["chapter"]
    assert (chapter.epochs, chapter.batch_size, chapter.learning_rate, chapter.dropout_rate) == (
        20,
        64,
        1e-4,
        0.5,
    )
    assert chapter.shuffle and chapter.lr_schedule == "constant" and chapter.label_smoothing == 0
    assert all(learning_rate_at(chapter, step, 1000) == 1e-4 for step in (0, 500, 999))


def test_one_cycle_warms_up_then_anneals():
    config = TrainConfig(learning_rate=1e-3, lr_schedule="one-cycle")
    total = 1000
    rates = [learning_rate_at(config, step, total) for step in range(total)]
    assert rates[0] == pytest.approx(1e-3 / 25)
    assert max(rates) == pytest.approx(1e-3, rel=1e-4) and rates.index(max(rates)) == 250
    assert rates[:251] == sorted(rates[:251]) and rates[250:] == sorted(rates[250:], reverse=True)
    assert rates[-1] < 1e-6


def test_bad_recipe_values_are_refused():
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)


def test_a_one_cycle_run_resumes_exactly_but_cannot_be_extended(tmp_path, small_npz):
    config = dataclasses.replace(RECIPES["fast"], epochs=3, batch_size=128, precision="fp32")
    start_run(small_npz, config, tmp_path / "straight", **quiet)
    start_run(small_npz, config, tmp_path / "resumed", **quiet)  # the same run, to be cut short below
    for epoch in (2, 3):
        for kind in ("", ".optimizer"):
            (tmp_path / "resumed" / "checkpoints" / f"epoch-00{epoch}{kind}.safetensors").unlink()
    resume_run(tmp_path / "resumed", **quiet)
    a = load_file(tmp_path / "straight" / "checkpoints" / "epoch-003.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoints" / "epoch-003.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    with pytest.raises(CheckpointError, match="one-cycle"):
        resume_run(tmp_path / "resumed", 5, **quiet)


def test_fast_recipe_from_the_command_line(capsys, tmp_path, small_npz):
    threads = torch.get_num_threads()
    try:
        code = main(
            [
                "train",
                "--dataset",
                small_npz,
                "--recipe",
                "fast",
                "--epochs",
                "1",
                "--out",
                str(tmp_path),
                "--threads",
                "1",
                "--valid-size",
                "100",
            ]
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and "epoch 1/1" in capsys.readouterr().out
    config = load_checkpoint(tmp_path).record.config
    assert config.recipe == "fast" and config.lr_schedule == "one-cycle" and config.batch_size == 256
    assert config.label_smoothing == 0.1 and config.dropout_rate == 0.3 and config.epochs == 1


def test_the_accurate_recipe_chooses_flips_and_epochs_by_the_dataset_unless_told():
    accurate = RECIPES["accurate"]
    assert (accurate.lr_schedule, accurate.learning_rate, accurate.augment) == ("one-cycle", 1e-3, "affine")
    digits = for_dataset(accurate, "digit", 4_500)
    assert digits.augment == "affine" and not digits.flip and digits.epochs == 53  # 240,000 images / 4,500
    clothes = for_dataset(accurate, "object", 58_000)
    assert clothes.augment == "none" and clothes.flip and clothes.epochs == 30  # never fewer than 30 epochs
    assert for_dataset(accurate, "object", 58_000, choose=("flip",)).augment == "affine"  # --augment given
    assert for_dataset(accurate, "resize", 100).epochs == 60  # nor more than 60
    assert for_dataset(accurate, "object", 58_000, choose=("epochs",)).flip is False  # --no-flip was given
    assert for_dataset(accurate, "object", 58_000, choose=()) == accurate
    assert for_dataset(RECIPES["fast"], "object", 100) == RECIPES["fast"]


def test_augmentation_options_from_the_command_line(cli, tmp_path, small_npz):
    args = ("train", "--dataset", small_npz, "--epochs", 1, "--valid-size", 0, "--threads", 1)
    result = cli(*args, "--shear", 5, "--flip", "--out", tmp_path / "run")
    assert result.code == 0, result.err
    assert "augmentation affine (rotate +-12 deg, shift +-2.5 px, scale 0.9-1.1, shear +-5 deg)" in result.out
    config = load_checkpoint(tmp_path / "run").record.config
    assert (config.recipe, config.augment, config.shear, config.flip) == ("chapter", "affine", 5.0, True)
    cli(*args, "--scale", "1.2,1.1", "--out", tmp_path / "x").assert_one_line_error("--scale", "LO <= HI")
    cli(*args, "--rotate", 200, "--out", tmp_path / "x").assert_one_line_error("--rotate", "0 to 180")
    cli(*args, "--augment", "elastic", "--out", tmp_path / "x").assert_one_line_error("--augment")
    resumed = cli("train", "--resume", tmp_path / "run", "--epochs", 2, "--augment", "none")
    resumed.assert_one_line_error("--augment", "cannot change when resuming")
