"""The training loop and run folders: true mean loss, validation on the validation split, exact resume."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from safetensors.torch import load_file

from cnnkit.checkpoint import list_checkpoints, load_checkpoint, load_network
from cnnkit.data import Standardization, load_dataset
from cnnkit.errors import CheckpointError
from cnnkit.inference import evaluate
from cnnkit.model import Architecture, build_model
from cnnkit.recipes import TrainConfig
from cnnkit.runs import resume_run, start_run
from cnnkit.training import FusedAdam, train_epoch

quiet = {"log": lambda line: None, "show_progress": False}
tiny = {**quiet, "architecture": TINY}


def _weights(run_dir, epoch):
    return load_file(run_dir / "checkpoints" / f"epoch-{epoch:03d}.safetensors")


def test_epoch_loss_is_the_true_mean_over_images_partial_batch_included(mnist_5k):
    # With a zero learning rate and no dropout the weights never move, so the epoch's mean loss must
    # equal the loss of the whole set at once; 100 images in batches of 64 leaves a partial batch of 36.
    split = mnist_5k.train
    std = Standardization.fit(split.images)
    images = torch.from_numpy(std.apply(split.images[:100]))
    labels = torch.from_numpy(split.labels[:100])
    model = build_model(Architecture(dropout_rate=0.0), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batches = [np.arange(0, 64), np.arange(64, 100)]
    mean_loss = train_epoch(model, optimizer, images, labels, batches)
    assert mean_loss == pytest.approx(evaluate(model, images, labels).loss, rel=1e-5)


@pytest.mark.parametrize(
    ("precision", "augmentation"),
    [
        ("fp32", {}),
        ("bf16", {}),
        ("fp32", {"augment": "affine", "flip": True}),
        ("bf16", {"augment": "affine"}),
    ],
)
def test_resume_2_plus_1_epochs_is_bit_identical_to_3_straight(tmp_path, small_npz, precision, augmentation):
    config = TrainConfig(epochs=3, seed=5, precision=precision, **augmentation)
    start_run(small_npz, config, tmp_path / "straight", device="cpu", **tiny)
    start_run(
        small_npz,
        TrainConfig(**{**config.to_dict(), "epochs": 2}),
        tmp_path / "resumed",
        device="cpu",
        **tiny,
    )
    resume_run(tmp_path / "resumed", 3, device="cpu", **quiet)
    straight, resumed = _weights(tmp_path / "straight", 3), _weights(tmp_path / "resumed", 3)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    history = [json.loads(line) for line in (tmp_path / "resumed" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "resumed").record.config.epochs == 3


def test_a_different_seed_learns_different_weights(tmp_path, small_npz):
    for seed in (1, 2):
        start_run(small_npz, TrainConfig(epochs=1, seed=seed), tmp_path / str(seed), device="cpu", **tiny)
    a, b = _weights(tmp_path / "1", 1), _weights(tmp_path / "2", 1)
    assert not torch.equal(a["classifier.4.weight"], b["classifier.4.weight"])


def test_each_epoch_checkpoints_and_reports_validation_measured_on_the_validation_split(tmp_path, small_npz):
    run = start_run(
        small_npz, TrainConfig(epochs=2, seed=0, precision="fp32"), tmp_path, valid_size=128, **tiny
    )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-001.safetensors", "epoch-002.safetensors"]
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert lines == run.history
    dataset = load_dataset(small_npz).split_validation(128)
    assert len(dataset.valid) == 128 and len(dataset.train) == 512
    for epoch in (1, 2):
        model, ckpt = load_network(tmp_path / "checkpoints" / f"epoch-{epoch:03d}.safetensors")
        std = ckpt.record.standardization
        result = evaluate(model, std.apply(dataset.valid.images), dataset.valid.labels)
        assert lines[epoch - 1]["valid_accuracy"] == pytest.approx(result.accuracy)
        assert lines[epoch - 1]["valid_loss"] == pytest.approx(result.loss, rel=1e-5)
        assert lines[epoch - 1]["images_per_s"] > 0
    record = ckpt.record
    assert record.class_names == tuple(str(d) for d in range(10))
    assert record.architecture.input_shape == (1, 28, 28)
    assert record.standardization == Standardization.fit(dataset.train.images)
    assert record.config.batch_size == 64 and record.valid_size == 128
    assert record.preprocessing == "digit" and record.epoch == 2 and len(record.history) == 2


def test_keep_prunes_old_checkpoints(tmp_path, small_npz):
    start_run(small_npz, TrainConfig(epochs=3, seed=0, keep=1), tmp_path, valid_size=0, **tiny)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-003.safetensors"]


def test_lowlevel_build_trains_and_resumes_too(tmp_path, small_npz):
    start_run(small_npz, TrainConfig(epochs=1, seed=0, build="lowlevel"), tmp_path, **tiny)
    resume_run(tmp_path, 2, **quiet)
    model, ckpt = load_network(tmp_path)
    assert ckpt.record.build == "lowlevel" and ckpt.epoch == 2
    assert tuple(model.conv_1_weights.shape) == (5, 5, 1, 4)


def test_training_refuses_to_overwrite_a_run_and_resume_refuses_an_old_checkpoint(tmp_path, small_npz):
    start_run(small_npz, TrainConfig(epochs=2, seed=0), tmp_path / "run", **tiny)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        start_run(small_npz, TrainConfig(epochs=2), tmp_path / "run", **tiny)
    old = tmp_path / "run" / "checkpoints" / "epoch-001.safetensors"
    with pytest.raises(CheckpointError, match="not the newest"):
        resume_run(old, 3, **quiet)
    branch = resume_run(old, 2, run_dir=tmp_path / "branch", **quiet)
    assert [h["epoch"] for h in branch.history] == [1, 2]
    with pytest.raises(CheckpointError, match="already at epoch 2"):
        resume_run(tmp_path / "run", **quiet)


@pytest.mark.slow
def test_the_network_learns(trained_run):
    history = load_checkpoint(trained_run).record.history
    losses = [h["train_loss"] for h in history]
    assert losses == sorted(losses, reverse=True), "training loss should fall every epoch"
    assert history[-1]["valid_accuracy"] > 0.9


def test_fp32_training_is_bit_reproducible(tmp_path, small_npz):
    for name in ("a", "b"):
        start_run(
            small_npz, TrainConfig(epochs=1, seed=9, precision="fp32"), tmp_path / name, device="cpu", **tiny
        )
    a, b = _weights(tmp_path / "a", 1), _weights(tmp_path / "b", 1)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_overwrite_starts_a_run_folder_afresh(tmp_path, small_npz):
    start_run(small_npz, TrainConfig(epochs=2, seed=0), tmp_path, **tiny)
    (tmp_path / "checkpoints" / ".epoch-003.safetensors.x1y2.tmp").write_bytes(b"left by a killed writer")
    start_run(small_npz, TrainConfig(epochs=1, seed=1), tmp_path, overwrite=True, **tiny)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-001.safetensors"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "epoch-001.optimizer.safetensors",
        "epoch-001.safetensors",
    ]
    assert load_checkpoint(tmp_path).record.config.seed == 1
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 1


def test_no_augmentation_trains_exactly_as_a_plain_pytorch_loop(
    tmp_path, small_npz, one_torch_thread, monkeypatch
):
    """augment="none" is the chapter's loop with nothing added: the same weights, bit for bit on the CPU
    at hand, as a plain loop written here with PyTorch's own ops (F.conv2d, F.max_pool2d, F.relu,
    torch.optim.Adam(fused=True)) over the same batches and dropout seeds. (It once compared a SHA-256
    taken on one CPU; oneDNN sums in another order on another CPU.)"""
    from cnnkit import device, model
    from cnnkit.data import minibatch_indices
    from cnnkit.kernels import conv_pool
    from cnnkit.training import epoch_seed

    # The dense layers' fp32 products in MKL and the first convolution in oneDNN, as the plain loop does
    # (the fused first layer sums in another order); the fused pooling is bit-identical to PyTorch's.
    monkeypatch.setattr(device, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(
        conv_pool, "fuses", lambda *args: False
    )  # oneDNN's convolution, then the fused pooling
    config = TrainConfig(epochs=2, seed=5, precision="fp32", augment="none")
    start_run(small_npz, config, tmp_path / "run", device="cpu", valid_size=128, **tiny)

    data = load_dataset(small_npz).split_validation(128)
    std = Standardization.fit(data.train.images)
    images = torch.from_numpy(std.apply(data.train.images)).contiguous(memory_format=torch.channels_last)
    labels = torch.from_numpy(data.train.labels).long()
    arch = Architecture(input_shape=(1, 28, 28), num_classes=10, dropout_rate=config.dropout_rate, **TINY)
    net = build_model(arch, "layers", seed=config.seed, fused=False).to(memory_format=torch.channels_last)
    conv1, conv2 = (m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    dense = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    adam = torch.optim.Adam(net.parameters(), lr=config.learning_rate, fused=True)
    for epoch in (1, 2):
        torch.manual_seed(epoch_seed(config.seed, epoch))
        for batch in minibatch_indices(len(labels), config.batch_size, True, config.seed, epoch):
            idx = torch.from_numpy(batch)
            x = F.relu(F.max_pool2d(conv1(images.index_select(0, idx)), 2, 2, ceil_mode=True))
            x = F.relu(F.max_pool2d(conv2(x), 2, 2, ceil_mode=True)).flatten(1)
            x = model.dropout(
                F.relu(dense[0](x)), config.dropout_rate
            )  # cnnkit's mask from torch's generator
            loss = F.cross_entropy(dense[1](x), labels.index_select(0, idx))
            adam.zero_grad(set_to_none=True)
            loss.backward()
            adam.step()
    trained = _weights(tmp_path / "run", 2)
    assert set(trained) == set(net.state_dict())
    for name, value in net.state_dict().items():
        assert torch.equal(trained[name], value), name


def test_augmentation_changes_what_is_learned_and_is_stored_in_the_record(tmp_path, small_npz):
    for name, extra in (("plain", {}), ("affine", {"augment": "affine", "rotate": 20.0})):
        start_run(
            small_npz, TrainConfig(epochs=1, seed=5, precision="fp32", **extra), tmp_path / name, **tiny
        )
    plain, affine = _weights(tmp_path / "plain", 1), _weights(tmp_path / "affine", 1)
    assert not torch.equal(plain["features.0.weight"], affine["features.0.weight"])
    config = load_checkpoint(tmp_path / "affine").record.config
    assert (config.augment, config.rotate, config.shift) == ("affine", 20.0, 2.5)


@pytest.mark.parametrize("kernel", ["torch._fused_adam_", "missing"])
def test_fused_adam_takes_the_same_steps_as_torchs_fused_adam(monkeypatch, kernel):
    # Same bits, same state_dict: checkpoints from either resume in the other. Where a torch has no
    # torch._fused_adam_ (private), FusedAdam is Adam.step all along.
    from cnnkit import training

    calls = []
    real = training._fused_adam_kernel()
    monkeypatch.setattr(
        training,
        "_fused_adam_kernel",
        lambda: None if kernel == "missing" else (lambda *a, **k: calls.append(1) or real(*a, **k)),
    )

    def train(make):
        model = build_model(Architecture(**TINY), seed=0).to(memory_format=torch.channels_last)
        optimizer = make(model.parameters())
        generator = torch.Generator().manual_seed(0)
        torch.manual_seed(0)  # dropout
        for step in range(6):
            images = torch.randn(8, 1, 28, 28, generator=generator)
            labels = torch.randint(0, 10, (8,), generator=generator)
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * (1 + step % 3)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        return model, optimizer.state_dict()

    ours, our_state = train(lambda params: FusedAdam(params, lr=1e-3))
    assert len(calls) == (5 if kernel != "missing" else 0)  # every step but the first, which makes the state
    torchs, torch_state = train(lambda params: torch.optim.Adam(params, lr=1e-3, fused=True))
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), torchs.parameters(), strict=True))
    assert our_state["param_groups"] == torch_state["param_groups"]
    for index, moments in torch_state["state"].items():
        assert all(torch.equal(moments[name], our_state["state"][index][name]) for name in moments)


def test_fp32_products_through_onednn_stay_fp32():
    # cnnkit.device sends fp32 dense layers to oneDNN on CPUs without AMX, where "medium" precision must
    # not mean bf16 (whose error here would be about 0.6).
    from cnnkit.device import autocast

    a, b = torch.randn(64, 1024), torch.randn(1024, 1024)
    with autocast(torch.device("cpu"), "fp32"):
        product = a @ b
    assert torch.get_float32_matmul_precision() == "highest"  # restored
    assert (product.double() - a.double() @ b.double()).abs().max() < 1e-3


def _train_before_and_after(tmp_path, small_npz, monkeypatch, precision):
    """A tiny run trained by the fast path and by what it replaced: oneDNN's convolutions, PyTorch's
    max_pool2d and ReLU, Adam through Optimizer.step on float32 weights cast by autocast, fp32 products
    in MKL. Returns both runs' histories."""
    from cnnkit import device, training
    from cnnkit.kernels import conv_pool, master_weights

    config = TrainConfig(epochs=3, seed=5, precision=precision, learning_rate=1e-3)
    start_run(small_npz, config, tmp_path / "after", device="cpu", **tiny)
    with monkeypatch.context() as patch:
        patch.setattr(conv_pool, "fuses", lambda *args: False)  # oneDNN's first convolution
        patch.setattr(training, "FusedAdam", lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True))
        patch.setattr(device, "cpu_has_amx", lambda: True)
        patch.setattr(master_weights, "_kernels_for", lambda *args: None)
        start_run(small_npz, config, tmp_path / "before", device="cpu", **tiny)
    return [
        [json.loads(line) for line in (tmp_path / run / "history.jsonl").read_text().splitlines()]
        for run in ("before", "after")
    ]


def test_the_fast_bf16_path_learns_what_the_old_one_did_within_rounding(tmp_path, small_npz, monkeypatch):
    # The fused first layer sums its 25 products in another order than oneDNN (its bf16 outputs differed
    # in 2 of 294,912 values for a batch of 64 digits); everything else in the fast path is bit-identical
    # (tests/test_master_weights.py, test_pooling.py). Measured here: the weights after 3 epochs differed
    # by 6e-8 at most, and each epoch's validation accuracy was the same (12%, 25%, 41%).
    before, after = _train_before_and_after(tmp_path, small_npz, monkeypatch, "bf16")
    weights = _weights(tmp_path / "before", 3), _weights(tmp_path / "after", 3)
    assert max((weights[0][name] - weights[1][name]).abs().max().item() for name in weights[0]) < 1e-2
    accuracies = [[epoch["valid_accuracy"] for epoch in run] for run in (before, after)]
    assert np.abs(np.subtract(*accuracies)).max() <= 1 / 106  # one validation image at most
    assert after[-1]["valid_accuracy"] > 0.3  # it learned something to compare


def test_fp32_products_in_onednn_learn_what_mkl_did_within_rounding(tmp_path, small_npz, monkeypatch):
    # Only the order of the dense layers' and the first convolution's sums differs: measured, the weights
    # after 3 epochs (24 Adam steps at lr 1e-3, weights of scale 0.1-1) differed by 4.5e-7 at most, and
    # each epoch's validation accuracy (106 images; 12%, 26%, 42%) was the same.
    before, after = _train_before_and_after(tmp_path, small_npz, monkeypatch, "fp32")
    weights = _weights(tmp_path / "before", 3), _weights(tmp_path / "after", 3)
    assert max((weights[0][name] - weights[1][name]).abs().max().item() for name in weights[0]) < 1e-5
    assert [epoch["valid_accuracy"] for epoch in before] == [epoch["valid_accuracy"] for epoch in after]
    assert after[-1]["valid_accuracy"] > 0.3  # it learned something to compare


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_warm_up_before_epoch_1_changes_nothing_of_the_run(precision):
    """It runs a copy of the model on one batch: the weights, their gradients and the random generator
    are as they were."""
    from cnnkit.training import warm_up

    model = build_model(Architecture(**TINY), seed=0).to(memory_format=torch.channels_last)
    images = torch.randn(20, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(20) % 10
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    warm_up(model, (images, labels), TrainConfig(batch_size=8, precision=precision))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
