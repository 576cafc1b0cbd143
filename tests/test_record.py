"""The trained-model record and the checkpoint file: validation, old formats, bounded and checked reads."""

import json
import logging
import os
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnkit.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    load_network,
    load_optimizer_state,
    optimizer_path,
    read_record,
    resolve_checkpoint,
    save_checkpoint,
    tensors_sha256,
)
from cnnkit.data import Standardization
from cnnkit.errors import CheckpointError
from cnnkit.model import Architecture, build_model
from cnnkit.recipes import RECIPES
from cnnkit.record import FORMAT_VERSION, ModelRecord
from cnnkit.training import make_optimizer

V1 = "tests/data/v1"
TINY = Architecture(input_shape=(1, 13, 13), num_classes=3, conv_channels=(2, 3), hidden_units=8)


def tiny_record(**changes) -> ModelRecord:
    record = ModelRecord(
        architecture=TINY,
        class_names=("a", "b", "c"),
        standardization=Standardization((10.0,), (20.0,)),
        preprocessing="object",
        config=RECIPES["fast"],
        dataset="folder:/data/shapes",
        valid_size=5,
        epoch=2,
        history=({"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}),
        trainer_state={"best": {"epoch": 2, "valid_accuracy": 0.5}},
    )
    return record.replace(**changes)


def _saved(tmp_path, record=None, optimizer_steps=1):
    record = record or tiny_record()
    model = build_model(record.architecture, record.build, seed=0)
    optimizer = make_optimizer(model, 1e-3)
    for _ in range(optimizer_steps):
        model(torch.randn(2, *record.architecture.input_shape)).sum().backward()
        optimizer.step()
    return save_checkpoint(checkpoint_path(tmp_path, record.epoch), model, record, optimizer), model


def _rewrite_metadata(path, change):
    """Rewrite the cnnkit metadata of a checkpoint file in place: `change(meta) -> new meta (any JSON)`."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["cnnkit"] = json.dumps(change(json.loads(header["__metadata__"]["cnnkit"])))
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + length :])


def test_a_record_round_trips_through_a_checkpoint(tmp_path):
    path, model = _saved(tmp_path)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == path and ckpt.record == tiny_record()
    assert read_record(path) == tiny_record()
    loaded, _ = load_network(path)
    x = torch.randn(3, *TINY.input_shape)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    meta = json.loads(
        json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])["__metadata__"][
            "cnnkit"
        ]
    )
    assert meta["format_version"] == FORMAT_VERSION and meta["config"]["lr_schedule"] == "one-cycle"


def test_checkpoints_of_cnnkit_0_1_still_load():
    run = load_checkpoint(f"{V1}/epoch-002.safetensors").record
    assert (
        run.config.recipe == "fast"
        and run.config.lr_schedule == "one-cycle"
        and run.config.label_smoothing == 0.1
    )
    assert run.dataset == "npz:/tmp/v1/tiny.npz" and run.valid_size == 16 and run.epoch == 2
    assert run.class_names == tuple("0123456789") and run.preprocessing == "digit"
    convnn = load_checkpoint(f"{V1}/convnn.safetensors").record
    assert convnn.dataset is None and convnn.classes == ("a", "b", "c", "d") and convnn.config.seed == 3
    model, _ = load_network(f"{V1}/epoch-002.safetensors")
    assert (
        load_optimizer_state(f"{V1}/epoch-002.safetensors", model)["state"][0]["step"] == 2
    )  # one step an epoch


def test_checkpoint_best_newest_and_epoch_n(tmp_path):
    for epoch, best in ((1, 1), (2, 1), (3, 3)):
        _saved(tmp_path, tiny_record(epoch=epoch, trainer_state={"best": {"epoch": best}}))
    assert resolve_checkpoint(tmp_path) == checkpoint_path(tmp_path, 3)
    assert resolve_checkpoint(tmp_path, "best") == checkpoint_path(tmp_path, 3)
    assert resolve_checkpoint(tmp_path, "2") == checkpoint_path(tmp_path, 2)
    checkpoint_path(tmp_path, 2).unlink()
    with pytest.raises(CheckpointError, match=r"epoch 2 is not kept .*kept: 1, 3"):
        resolve_checkpoint(tmp_path, "2")
    _saved(tmp_path, tiny_record(epoch=4, trainer_state={}))
    with pytest.raises(CheckpointError, match="without a validation split"):
        resolve_checkpoint(tmp_path, "best")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: [m], "metadata is a JSON list"),
        (lambda m: "text", "metadata is a JSON str"),
        (lambda m: {**m, "format_version": "2"}, "format_version"),
        (lambda m: {**m, "class_names": ["a", "b"]}, "class_names"),
        (lambda m: {**m, "architecture": {**m["architecture"], "input_shape": [1, -13, 13]}}, "input_shape"),
        (lambda m: {**m, "architecture": {**m["architecture"], "num_classes": 3_000_000}}, "num_classes"),
        (lambda m: {**m, "architecture": {**m["architecture"], "hidden_units": 10**9}}, "hidden_units"),
        (lambda m: {**m, "valid_size": -1}, "valid_size"),
        (lambda m: {**m, "epoch": 1.5}, "epoch"),
        (lambda m: {**m, "config": {**m["config"], "learning_rate": "fast"}}, "config.learning_rate"),
        (lambda m: {**m, "config": {**m["config"], "learning_rate": 10**400}}, "config.learning_rate"),
        (lambda m: {**m, "config": {**m["config"], "epochs": 0}}, "config"),
        (lambda m: {**m, "preprocessing": "sharpen"}, "preprocessing"),
        (lambda m: {**m, "standardization": {"mean": [1.0], "std": [0.0]}}, "standardization"),
        (lambda m: {k: v for k, v in m.items() if k != "architecture"}, "architecture is missing"),
        (lambda m: {**m, "history": [[[[]]]]}, "history"),
        (lambda m: {**m, "history": [{"train_loss": 1.0}]}, "history[0].epoch is missing"),
        (lambda m: {**m, "history": [{"epoch": 1}, {"epoch": 3}]}, "history[1].epoch must be an epoch 1..2"),
        (lambda m: {**m, "history": [{"epoch": 1, "train_loss": "low"}]}, "history[0].train_loss"),
        (lambda m: {**m, "history": [{"epoch": 1, "valid_loss": float("nan")}]}, "history[0].valid_loss"),
        (lambda m: {**m, "history": [{"epoch": 1, "valid_accuracy": 1.5}]}, "history[0].valid_accuracy"),
        (lambda m: {**m, "history": [{"epoch": 1, "learning_rate": 10**400}]}, "history[0].learning_rate"),
        (lambda m: {**m, "trainer_state": [1]}, "trainer_state must be an object, got a JSON array"),
        (lambda m: {**m, "trainer_state": {"best": [2, 0.5]}}, "trainer_state.best must be an object"),
        (lambda m: {**m, "trainer_state": {"best": {"epoch": 0}}}, "trainer_state.best.epoch"),
        (lambda m: {**m, "trainer_state": {"best": {"epoch": 3}}}, "trainer_state.best.epoch"),
        (lambda m: {**m, "trainer_state": {"best": {"epoch": True}}}, "trainer_state.best.epoch"),
        (
            lambda m: {**m, "trainer_state": {"best": {"valid_accuracy": "0.9"}}},
            "trainer_state.best.valid_accuracy must be in [0, 1] or null, got '0.9'",
        ),
        (
            lambda m: {**m, "trainer_state": {"best": {"valid_accuracy": 2}}},
            "trainer_state.best.valid_accuracy",
        ),
        (
            lambda m: {**m, "trainer_state": {"early_stopping": {"best_loss": float("inf")}}},
            "trainer_state.early_stopping.best_loss must be a finite number or null",
        ),
        (
            lambda m: {**m, "trainer_state": {"early_stopping": {"wait": -1}}},
            "trainer_state.early_stopping.wait",
        ),
        (
            lambda m: {**m, "trainer_state": {"early_stopping": {"wait": None}}},
            "trainer_state.early_stopping.wait",
        ),
        (
            lambda m: {**m, "trainer_state": {"early_stopping": {"best_epoch": "1"}}},
            "trainer_state.early_stopping.best_epoch",
        ),
    ],
)
def test_malformed_metadata_is_one_error_naming_the_file_and_field(tmp_path, change, field):
    path, _ = _saved(tmp_path)
    _rewrite_metadata(path, change)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(str(path)) and field in message and "\n" not in message


def test_keys_a_later_cnnkit_may_add_are_dropped_and_missing_ones_are_defaults():
    meta = tiny_record().to_dict()
    meta["history"][0]["train_accuracy"] = float("nan")  # not strict JSON: could not be written back
    meta["trainer_state"] = {
        "best": {"epoch": 2, "valid_accuracy": 0.5, "since": "2031-01-01"},
        "early_stopping": {"wait": 1},
        "reduce_lr_on_plateau": {"factor": [0.1]},
    }
    record = ModelRecord.from_dict(meta, "m.safetensors")
    assert record.history[0] == {"epoch": 1, "train_loss": 1.0}
    assert record.trainer_state == {
        "best": {"epoch": 2, "valid_accuracy": 0.5},
        "early_stopping": {"wait": 1},
    }
    assert ModelRecord.from_dict({**meta, "trainer_state": None}, "m.safetensors").trainer_state == {}
    assert ModelRecord.from_dict({**meta, "trainer_state": {}}, "m.safetensors").best_epoch is None


def test_deeply_nested_metadata_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["cnnkit"] = "[" * 100_000 + "]" * 100_000
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + length :])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    meta=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
        max_leaves=20,
    )
)
def test_any_json_as_metadata_is_a_checkpoint_error_or_a_record(meta):
    try:
        ModelRecord.from_dict(meta, "m.safetensors")
    except CheckpointError as exc:
        assert str(exc).startswith("m.safetensors: ") and "\n" not in str(exc)


@settings(max_examples=40, deadline=None)
@given(
    field=st.sampled_from(["architecture", "config", "class_names", "standardization", "trainer_state"]),
    value=st.recursive(
        st.none() | st.integers() | st.floats() | st.text(max_size=4),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
        max_leaves=10,
    ),
)
def test_any_value_in_a_field_is_a_checkpoint_error_or_a_record(field, value):
    meta = {**tiny_record().to_dict(), field: value}
    try:
        ModelRecord.from_dict(meta, "m.safetensors")
    except CheckpointError as exc:
        assert "\n" not in str(exc)


def test_flipped_bits_in_the_tensors_fail_the_sha256(tmp_path):
    path, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def _without_sha256(path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    save_file(load_file(path), path, metadata={k: v for k, v in metadata.items() if k != "sha256"})


def test_a_format_2_file_without_its_sha256_is_refused_naming_it(tmp_path, cli):
    # Every file of format 2 was written with a SHA-256: one without it was altered, not old.
    path, model = _saved(tmp_path)
    _without_sha256(optimizer_path(path))
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors: no SHA-256 of its tensors"):
        load_optimizer_state(path, model)
    _without_sha256(path)
    with pytest.raises(CheckpointError, match=r"epoch-002.safetensors: no SHA-256 of its tensors"):
        load_checkpoint(path)
    image = tmp_path / "image.png"
    Image.new("L", (13, 13)).save(image)
    cli("predict", path, image).assert_one_line_error(str(path), "no SHA-256", "format 2")


def test_format_1_files_load_unchecked_with_a_one_line_notice_each(tmp_path, cli, caplog):
    weights = f"{V1}/epoch-002.safetensors"
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        model, ckpt = load_network(weights)
        load_optimizer_state(ckpt.path, model)
    notices = [record.getMessage() for record in caplog.records if record.name == "cnnkit"]
    assert notices == [
        f"{file}: written by cnnkit 0.1.0 (checkpoint format 1) without a SHA-256 of its tensors; loaded unchecked"
        for file in (weights, f"{V1}/epoch-002.optimizer.safetensors")
    ]
    image = tmp_path / "digit.png"
    digit = Image.new("L", (28, 28), 255)
    digit.paste(0, (12, 6, 16, 22))  # a dark stroke on white
    digit.save(image)
    result = cli("predict", weights, image)
    assert result.code == 0 and result.err.splitlines() == notices[:1], result.err


def test_tensors_that_do_not_fit_the_record_are_refused_before_reading(tmp_path):
    path, _ = _saved(tmp_path)
    _rewrite_metadata(path, lambda m: {**m, "architecture": {**m["architecture"], "hidden_units": 9}})
    with pytest.raises(CheckpointError, match="expected F32"):
        load_checkpoint(path)


def test_a_fifo_or_a_folder_is_not_a_checkpoint(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(fifo)


@pytest.mark.parametrize(
    "damage",
    [
        lambda t: {**t, "state.0.exp_avg": torch.zeros(3)},  # the segfault of the issue: moments too small
        lambda t: {k: v for k, v in t.items() if k != "state.1.exp_avg_sq"},
        lambda t: {**t, "state.0.step": torch.tensor(-1.0)},
        lambda t: {**t, "state.2.exp_avg": torch.full_like(t["state.2.exp_avg"], float("nan"))},
        lambda t: {**t, "state.0.exp_avg": t["state.0.exp_avg"].double()},
    ],
)
def test_optimizer_state_is_checked_against_the_parameters(tmp_path, damage):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path, model = _saved(tmp_path)
    opt = optimizer_path(path)
    with safe_open(opt, "pt") as f:
        metadata = f.metadata()
    damaged = damage(load_file(opt))  # with its SHA-256, so that the checks after it are what refuses it
    save_file(damaged, opt, metadata={**metadata, "sha256": tensors_sha256(damaged)})
    with pytest.raises(CheckpointError) as info:
        load_optimizer_state(path, model)
    assert str(info.value).startswith(str(opt))


def test_optimizer_state_of_another_network_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    other = build_model(
        Architecture(input_shape=(1, 13, 13), num_classes=4, conv_channels=(2, 3), hidden_units=8)
    )
    with pytest.raises(
        CheckpointError,
        match=r"optimizer.safetensors: tensor state.6.exp_avg is F32 \[3, 8\], expected F32 \[4, 8\]",
    ):
        load_optimizer_state(path, other)


def test_record_of_a_convnn_keeps_label_values(tmp_path):
    record = tiny_record(classes=(3, 7, 9), class_names=("3", "7", "9"), dataset=None)
    path, _ = _saved(tmp_path, record)
    assert read_record(path).classes == (3, 7, 9)
    assert np.asarray(read_record(path).classes).dtype.kind == "i"


def test_optimizer_state_saved_before_the_first_step_restores_nothing(tmp_path):
    path, model = _saved(tmp_path, optimizer_steps=0)
    assert load_optimizer_state(path, model) is None
