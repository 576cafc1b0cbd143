"""Checkpoints: round trips, optimizer state, atomic writes under kill -9, corrupt files, pruning."""

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cnnkit.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_network,
    load_optimizer_state,
    optimizer_path,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from cnnkit.data import Standardization
from cnnkit.errors import CheckpointError
from cnnkit.model import Architecture, build_model
from cnnkit.recipes import TrainConfig
from cnnkit.record import ModelRecord
from cnnkit.training import restore_optimizer

SMALL = Architecture(input_shape=(1, 13, 13), num_classes=3, hidden_units=8, conv_channels=(2, 3))


def _trained_pair(arch=SMALL, build="layers"):
    model = build_model(arch, build, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(torch.randn(4, *arch.input_shape)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def _meta(arch=SMALL, build="layers", epoch=1):
    return ModelRecord(
        architecture=arch,
        class_names=tuple("abcdefghij"[: arch.num_classes]),
        standardization=Standardization((0.0,), (1.0,)),
        preprocessing="resize",
        config=TrainConfig(build=build),
        epoch=epoch,
    )


@pytest.mark.parametrize("build", ["layers", "lowlevel"])
def test_weights_metadata_and_optimizer_round_trip(tmp_path, build):
    model, optimizer = _trained_pair(build=build)
    path = save_checkpoint(checkpoint_path(tmp_path, 3), model, _meta(build=build, epoch=3), optimizer)
    assert path == tmp_path / "checkpoints" / "epoch-003.safetensors"
    ckpt = load_checkpoint(tmp_path)  # a run folder means its newest checkpoint
    assert ckpt.epoch == 3 and ckpt.record.class_names == ("a", "b", "c")
    assert ckpt.record.cnnkit_version
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.model_state[name], tensor)
    fresh = build_model(SMALL, build)
    restored = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    restore_optimizer(restored, load_optimizer_state(path, fresh))
    original, loaded = optimizer.state_dict(), restored.state_dict()
    for pid, entries in original["state"].items():
        for key, value in entries.items():
            assert torch.equal(loaded["state"][pid][key], value), (pid, key)


def test_load_model_rebuilds_the_network(tmp_path):
    model, _ = _trained_pair()
    save_checkpoint(tmp_path / "m.safetensors", model, _meta())
    loaded, _ = load_network(tmp_path / "m.safetensors")
    assert not loaded.training
    x = torch.randn(2, *SMALL.input_shape)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-5, atol=1e-6)  # channels_last on a CPU


def test_newest_checkpoint_is_chosen_by_epoch_number(tmp_path):
    model, _ = _trained_pair()
    for epoch in (2, 10, 9):
        save_checkpoint(checkpoint_path(tmp_path, epoch), model, _meta(epoch=epoch))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "epoch-002.safetensors",
        "epoch-009.safetensors",
        "epoch-010.safetensors",
    ]
    assert resolve_checkpoint(tmp_path).name == "epoch-010.safetensors"


def test_prune_keeps_the_newest_n_with_their_optimizer_state(tmp_path):
    model, optimizer = _trained_pair()
    for epoch in range(1, 6):
        save_checkpoint(checkpoint_path(tmp_path, epoch), model, _meta(epoch=epoch), optimizer)
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == [f"epoch-00{i}.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch-004.optimizer.safetensors",
        "epoch-004.safetensors",
        "epoch-005.optimizer.safetensors",
        "epoch-005.safetensors",
    ]


def test_missing_checkpoint_and_empty_run_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="has no checkpoints"):
        load_checkpoint(tmp_path)


def test_corrupt_and_foreign_files_raise_checkpoint_error_naming_the_file(tmp_path):
    model, _ = _trained_pair()
    good = save_checkpoint(tmp_path / "good.safetensors", model, _meta())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    for path, message in [(truncated, "corrupt"), (garbage, "corrupt"), (foreign, "not a cnnkit checkpoint")]:
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)


def test_weights_of_another_architecture_are_refused(tmp_path):
    model, _ = _trained_pair()
    other = Architecture(input_shape=(1, 13, 13), num_classes=5, hidden_units=8, conv_channels=(2, 3))
    path = save_checkpoint(tmp_path / "m.safetensors", model, _meta(arch=other))
    with pytest.raises(CheckpointError, match="expected F32"):
        load_network(path)


def test_missing_optimizer_state(tmp_path):
    model, _ = _trained_pair()
    path = save_checkpoint(tmp_path / "m.safetensors", model, _meta())
    assert load_optimizer_state(path, model, required=False) is None
    with pytest.raises(CheckpointError, match="cannot resume"):
        load_optimizer_state(path, model)


def _versions(folder) -> dict:
    """Each checkpoint file in `folder` with its inode and modification time: a new one when it is replaced."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in list_checkpoints(folder)}


@pytest.mark.slow  # a real process over seconds
def test_kill_9_while_saving_leaves_every_checkpoint_loadable(tmp_path):
    # A child saves checkpoints as fast as it can; we kill it at several moments mid-write.
    script = textwrap.dedent(
        f"""
        import sys, torch
        from cnnkit.checkpoint import checkpoint_path, save_checkpoint
        from cnnkit.data import Standardization
        from cnnkit.model import Architecture, build_model
        from cnnkit.record import ModelRecord
        from cnnkit.recipes import TrainConfig
        arch = Architecture()
        model = build_model(arch, seed=0)
        opt = torch.optim.Adam(model.parameters())
        model(torch.zeros(1, 1, 28, 28)).sum().backward()
        opt.step()
        record = ModelRecord(arch, tuple("0123456789"), Standardization((0.0,), (1.0,)), "digit", TrainConfig())
        print("ready", flush=True)
        for epoch in range(1, 10**6):
            save_checkpoint(checkpoint_path({str(tmp_path)!r}, epoch % 3 + 1), model, record.replace(epoch=epoch), opt)
        """
    )
    for delay in (0.0, 0.13, 0.31):
        saved = _versions(tmp_path)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"ready"
        # Killed while it writes: once this child has replaced a checkpoint (an event, not a time since
        # its start, which a busy machine could spend before the first save), then `delay` s later.
        deadline = time.monotonic() + 120
        while _versions(tmp_path) == saved:
            assert child.poll() is None and time.monotonic() < deadline, "the child saved no checkpoint"
            time.sleep(0.005)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        for path in list_checkpoints(tmp_path):
            model, _ = load_network(path)
            load_optimizer_state(path, model)
    assert optimizer_path(list_checkpoints(tmp_path)[-1]).exists()


def test_checkpoint_files_get_ordinary_permissions(tmp_path):
    model, _ = _trained_pair()
    path = save_checkpoint(tmp_path / "m.safetensors", model, _meta())
    assert path.stat().st_mode & 0o644 == 0o644


def test_load_model_takes_images_as_stored_and_load_network_standardized_ones(tiny_run, mnist_5k):
    """load_model's model standardizes inside (as an export does); load_network's network does not."""
    from cnnkit.checkpoint import load_model
    from cnnkit.layer_outputs import activations

    model, ckpt = load_model(tiny_run)
    network, _ = load_network(tiny_run)
    images = mnist_5k.test.images[:16]
    standardized = ckpt.record.standardization.apply(images)
    with torch.inference_mode():
        raw_logits = model(torch.from_numpy(images))
        logits = network(torch.from_numpy(standardized))
    assert torch.allclose(raw_logits, logits, atol=1e-5)
    assert not torch.allclose(network(torch.from_numpy(images.astype("float32"))), logits, atol=1e-2)
    assert np.allclose(
        activations(model, images)["logits"], activations(network, standardized)["logits"], atol=1e-5
    )
