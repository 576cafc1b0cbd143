"""The second network, cnnkit.resnet: built, recorded, trained, resumed, scored, exported and shown through the
same code paths as the chapter's (the record says which network; nothing else special-cases it)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit import ConvNN
from cnnkit.augment import epoch_generator, random_crop
from cnnkit.checkpoint import load_checkpoint, load_model, load_network, read_record, resolve_checkpoint
from cnnkit.errors import CheckpointError
from cnnkit.layer_outputs import activations, filters, layers_of, stages_of
from cnnkit.model import Architecture, ResNet, ResNetArchitecture, architecture_from_dict, build_model
from cnnkit.quantize import quantize_int8
from cnnkit.recipes import RECIPES, TrainConfig, for_dataset, with_network
from cnnkit.record import ModelRecord
from cnnkit.runs import resume_run, start_run

SMALL = {"widths": (4, 8, 8, 8)}
quiet = {"log": lambda line: None, "show_progress": False}


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """folder:DIR of 12x12 RGB pictures: 3 classes (a red, green or blue square on noise), train/ and test/."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    colors = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (230, 0, 0)}
    for split, count in (("train", 24), ("test", 8)):
        for name, color in colors.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 60, (12, 12, 3)).astype(np.uint8)
                top, left = rng.integers(0, 6, 2)
                image[top : top + 6, left : left + 6] = color
                Image.fromarray(image, "RGB").save(root / split / name / f"{i}.png")
    return f"folder:{root}"


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, photo_folder):
    run_dir = tmp_path_factory.mktemp("runs") / "resnet"
    config = TrainConfig(epochs=2, seed=0, learning_rate=3e-3, precision="fp32")
    start_run(photo_folder, config, run_dir, architecture=SMALL, valid_size=9, **quiet)
    return run_dir


def test_the_architecture_counts_what_the_network_holds():
    for arch in (ResNetArchitecture(), ResNetArchitecture((1, 28, 28), 5, (8, 8, 16, 16), 0.2)):
        network = build_model(arch, seed=0)
        assert isinstance(network, ResNet)
        assert arch.num_parameters == sum(p.numel() for p in network.parameters())
        logits = network.eval()(torch.zeros(2, *arch.input_shape))
        assert logits.shape == (2, arch.num_classes)
        assert [shape for _, shape, _ in arch.layers()][-1] == (arch.num_classes,)
    # global average pooling: the parameter count does not grow with the image (the chapter's does)
    assert ResNetArchitecture((3, 64, 64)).num_parameters == ResNetArchitecture((3, 32, 32)).num_parameters
    assert Architecture((3, 64, 64)).num_parameters > 4 * Architecture((3, 32, 32)).num_parameters


def test_odd_and_tiny_images_fit_the_network():
    for size in ((1, 1), (7, 5), (33, 31)):
        arch = ResNetArchitecture((3, *size), 2, SMALL["widths"])
        assert build_model(arch, seed=0).eval()(torch.zeros(1, 3, *size)).shape == (1, 2)


def test_every_residual_block_starts_as_the_identity():
    network = build_model(ResNetArchitecture(), seed=0).eval()
    block = network.stage1[4]
    x = torch.randn(2, 32, 8, 8)
    assert torch.equal(block(x), x)  # its last batch norm's scale starts at 0


def test_the_record_names_the_network_and_old_records_mean_the_chapters():
    resnet = ResNetArchitecture((3, 16, 16), 4, (4, 8, 8, 8))
    assert resnet.to_dict()["network"] == "resnet"
    assert architecture_from_dict(json.loads(json.dumps(resnet.to_dict()))) == resnet
    old = {k: v for k, v in Architecture().to_dict().items() if k != "network"}
    assert architecture_from_dict(old) == Architecture()
    with pytest.raises(ValueError, match="unknown network 'vgg'"):
        architecture_from_dict({"network": "vgg"})


def test_a_record_with_a_bad_network_field_names_it(resnet_run):
    meta = read_record(resolve_checkpoint(resnet_run)).to_dict()
    for changes, message in (
        ({"network": "vgg"}, "architecture.network must be one of chapter, resnet"),
        ({"widths": [4, 8]}, "architecture.widths must be four counts"),
        ({"conv_channels": [4, 8]}, "architecture has unknown keys"),
    ):
        bad = {**meta, "architecture": {**meta["architecture"], **changes}}
        with pytest.raises(CheckpointError, match=message):
            ModelRecord.from_dict(bad, "x.safetensors")
    mismatch = {**meta, "config": {**meta["config"], "arch": "chapter"}}
    with pytest.raises(
        CheckpointError, match=r"config\.arch says 'chapter' but the architecture is 'resnet'"
    ):
        ModelRecord.from_dict(mismatch, "x.safetensors")


def test_auto_chooses_the_resnet_for_color_and_the_chapters_network_for_gray():
    assert with_network(TrainConfig(), 3).arch == "resnet"
    assert with_network(TrainConfig(), 1).arch == "chapter"
    assert with_network(TrainConfig(arch="chapter"), 3).arch == "chapter"
    # no --recipe: the photos recipe comes with the ResNet, for the settings not given
    chosen = with_network(TrainConfig(batch_size=32), 3, choose=("recipe", "epochs", "augment", "flip"))
    assert (chosen.recipe, chosen.augment, chosen.flip, chosen.batch_size) == ("photos", "crop", True, 32)
    assert with_network(TrainConfig(), 1, choose=("recipe", "epochs")).recipe == "chapter"
    # the photos recipe mirrors photos and objects, never digits; its epochs follow the dataset's size
    photos = RECIPES["photos"]
    assert for_dataset(photos, "digit", 50_000, choose=("flip",)).flip is False
    assert for_dataset(photos, "resize", 50_000, choose=("epochs",)).epochs == 24
    assert for_dataset(photos, "resize", 4_500, choose=("epochs",)).epochs == 120
    assert for_dataset(photos, "resize", 20_000, choose=("epochs",)).epochs == 60


def test_random_crop_moves_whole_pixels_within_the_padding():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    config = TrainConfig(augment="crop", pad=2, flip=False)
    out = random_crop(images, config, epoch_generator(0, 1))
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    for n in range(2):  # each output is a window of the padded image
        windows = [padded[n, :, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[n], w) for w in windows)
    again = random_crop(images, config, epoch_generator(0, 1))
    assert torch.equal(out, again)  # drawn from (seed, epoch) alone
    flipped = random_crop(images, TrainConfig(augment="crop", pad=2, flip=True), epoch_generator(0, 1))
    assert not torch.equal(flipped, out) or not torch.equal(flipped, flipped.flip(3))


def test_lowlevel_build_is_refused_for_the_resnet(cli, tmp_path, photo_folder):
    result = cli(
        "train", "--dataset", photo_folder, "--arch", "resnet", "--build", "lowlevel", "--out", str(tmp_path)
    )
    assert result.code == 2
    assert "--build lowlevel: the resnet network has only the layers build" in result.err


def test_the_first_line_says_which_network_and_why(cli, tmp_path, photo_folder):
    result = cli("train", "--dataset", photo_folder, "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet")
    assert result.code == 0, result.err
    record = read_record(resolve_checkpoint(tmp_path / "r"))
    assert (record.architecture.network, record.config.recipe, record.config.augment) == (
        "resnet",
        "photos",
        "crop",
    )
    result = cli("train", "--dataset", photo_folder, "--epochs", "1", "--out", str(tmp_path / "s"))
    first = next(line for line in result.out.splitlines() if line.startswith("training on"))
    assert (
        "network resnet (chosen for color images; --arch chapter for the chapter's CNN) with the photos recipe"
        in first
    )


@pytest.mark.parametrize(("precision", "optimizer"), [("fp32", "sgd"), ("bf16", "sgd"), ("fp32", "adam")])
def test_resume_2_plus_1_epochs_is_bit_identical_to_3_straight(tmp_path, photo_folder, precision, optimizer):
    config = TrainConfig(
        arch="resnet",
        epochs=3,
        seed=5,
        precision=precision,
        augment="crop",
        flip=True,
        optimizer=optimizer,
        weight_decay=5e-4,
        learning_rate=0.1 if optimizer == "sgd" else 1e-3,
    )
    kwargs = {"architecture": SMALL, "valid_size": 9, **quiet}
    start_run(photo_folder, config, tmp_path / "straight", **kwargs)
    start_run(photo_folder, TrainConfig(**{**config.to_dict(), "epochs": 2}), tmp_path / "resumed", **kwargs)
    resume_run(tmp_path / "resumed", 3, **quiet)
    straight = load_checkpoint(tmp_path / "straight").model_state
    resumed = load_checkpoint(tmp_path / "resumed").model_state
    assert straight.keys() == resumed.keys()
    assert any(name.endswith("running_mean") for name in straight)  # batch norm's statistics travel too
    assert not torch.equal(
        straight["head.3.weight"], load_checkpoint(tmp_path / "resumed", "1").model_state["head.3.weight"]
    )
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_layer_outputs_and_filters_follow_the_network(resnet_run):
    model, _ = load_model(resnet_run)
    names = list(layers_of(model))
    assert names[0] == "input" and names[-2:] == ["logits", "probabilities"]
    assert [name for _, stage in stages_of(model) for name in stage] == names[1:-2]
    pixels = np.random.default_rng(0).integers(0, 255, (3, 3, 12, 12)).astype(np.float32)
    maps = activations(model, pixels)
    assert list(maps) == names
    assert maps["block1"].shape == (3, 8, 6, 6) and maps["features"].shape == (3, 8)
    np.testing.assert_allclose(maps["features"], maps["block3"].mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        logits = model.eval()(torch.from_numpy(pixels))
    np.testing.assert_allclose(maps["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
    assert {name: kernels.shape for name, kernels in filters(model).items()} == {
        "conv0": (4, 3, 3, 3),
        "conv1": (8, 4, 3, 3),
        "conv2": (8, 8, 3, 3),
        "conv3": (8, 8, 3, 3),
    }


def test_int8_agrees_with_fp32(resnet_run, photo_folder):
    network, ckpt = load_network(resnet_run)
    from cnnkit.data import load_dataset

    data = load_dataset(photo_folder)
    images = ckpt.record.standardization.apply(np.concatenate([data.train.images, data.test.images]))
    int8 = quantize_int8(network, images)
    with torch.inference_mode():
        fp32 = network.eval()(torch.from_numpy(images)).argmax(1)
        quantized = int8(torch.from_numpy(images)).argmax(1)
    assert (fp32 == quantized).float().mean() >= 0.9


def test_the_commands_take_a_resnet_run(cli, resnet_run, tmp_path):
    for args in (
        ("evaluate", str(resnet_run)),
        ("evaluate", str(resnet_run), "--tta"),
        ("evaluate", str(resnet_run), "--precision", "int8"),
        ("summary", str(resnet_run)),
    ):
        result = cli(*args)
        assert result.code == 0, (args, result.err)
    assert "residual block" in cli("summary", str(resnet_run)).out
    assert "accuracy" in cli("evaluate", str(resnet_run), str(resnet_run)).out  # an ensemble of two


@pytest.mark.slow
def test_export_fp32_and_int8_keep_parity(cli, resnet_run, tmp_path):
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.onnx"
        result = cli("export", str(resnet_run), "--out", str(out), "--precision", precision)
        assert result.code == 0, result.err
        assert "max |logit difference|" in result.out
        scored = cli("evaluate", str(out))
        assert scored.code == 0, scored.err


def test_convnn_takes_the_resnet(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 255, (60, 3, 10, 10)).astype(np.float32)
    y = np.arange(60) % 3
    X[y == 0, 0] += 200  # a class the network can tell from its colour
    clf = ConvNN(
        epochs=3, arch="resnet", widths=(4, 8, 8, 8), batch_size=20, learning_rate=1e-2, random_state=0
    )
    clf.fit(X, y)
    assert isinstance(clf.model_, ResNet) and clf.config_.arch == "resnet"
    path = clf.save(tmp_path / "clf.safetensors")
    loaded = ConvNN.load(path)
    assert (loaded.arch, loaded.widths) == ("resnet", (4, 8, 8, 8))
    np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))
    gray = ConvNN(epochs=1, batch_size=20, conv_channels=(2, 2), kernel_size=3, hidden_units=8).fit(
        X[:, :1], y
    )
    assert not isinstance(gray.model_, ResNet)  # auto: the chapter's network for gray images


@pytest.mark.slow
def test_two_processes_train_the_resnet_and_say_how_batch_norm_works(cli, tmp_path, photo_folder):
    run = tmp_path / "run"
    result = cli(
        "train",
        "--dataset",
        photo_folder,
        "--arch",
        "resnet",
        "--epochs",
        1,
        "--batch-size",
        16,
        "--out",
        run,
        "--nproc-per-node",
        2,
    )
    assert result.code == 0, result.err[-3000:]
    assert "batch norm: each of the 2 ranks normalizes by its own share of the batch" in result.out
    state = load_checkpoint(run).model_state
    assert state["prep.1.num_batches_tracked"].item() > 0  # rank 0's running statistics were saved
    assert cli("evaluate", str(run)).code == 0


def test_the_report_draws_every_stage_of_the_resnet(resnet_run, tmp_path):
    from cnnkit.viz.report import write_report

    folder = write_report(resnet_run, tmp_path / "report", precision="fp32")
    numbers = json.loads((folder / "report.json").read_text())
    assert any("residual block" in layer["layer"] for layer in numbers["layers"])
    assert {"feature_maps_1.png", "filters.png", "network.png"} <= {f["file"] for f in numbers["figures"]}
