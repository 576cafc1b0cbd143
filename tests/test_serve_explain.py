"""cnnkit serve's arithmetic and epochs: /api/explain (how one value was made), /api/layers (an image by
its pixels or its place in the dataset, at any kept checkpoint), the checkpoints a run keeps, and every
refusal of a malformed request, in one line of JSON."""

import base64
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from fastapi.testclient import TestClient

from cnnkit.arithmetic import explain
from cnnkit.checkpoint import load_network
from cnnkit.evaluation import evaluation_split
from cnnkit.layer_outputs import activations, filters, reference_network
from cnnkit.serve import create_app, load_models
from cnnkit.serve.loaded import LoadedCheckpoints

ROOT = Path(__file__).resolve().parent.parent
SEVEN = ROOT / "examples" / "seven.png"


@pytest.fixture(scope="module")
def every_epoch_run(tmp_path_factory, small_npz):
    """A tiny network trained 2 epochs on small_npz, every checkpoint kept."""
    from cnnkit.recipes import TrainConfig
    from cnnkit.runs import start_run

    run_dir = tmp_path_factory.mktemp("runs") / "epochs"
    config = TrainConfig(epochs=2, seed=0, keep=0, learning_rate=1e-3)
    start_run(small_npz, config, run_dir, architecture=TINY, valid_size=128, log=lambda line: None)
    return run_dir


@pytest.fixture(scope="module")
def client(every_epoch_run):
    with TestClient(create_app(load_models([every_epoch_run]), workers=1)) as client:
        yield client


@pytest.fixture(scope="module")
def seven(client):
    """/api/activations's answer for examples/seven.png by the served checkpoint (epoch 2)."""
    response = client.post("/api/activations", files={"file": ("seven.png", SEVEN.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def pixels_of(answer) -> np.ndarray:
    shape = answer["pixels"]["shape"]
    return np.frombuffer(base64.b64decode(answer["pixels"]["data"]), "<f4").reshape(shape)


def refused(response, status, *fragments):
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"], body
    assert "Traceback" not in response.text
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])


def test_checkpoints_lists_the_epochs_the_run_keeps(client):
    assert client.get("/api/models/epochs/checkpoints").json() == {
        "model": "epochs",
        "served_epoch": 2,
        "epochs": [1, 2],
    }
    refused(client.get("/api/models/nope/checkpoints"), 404, "no model 'nope'")


def test_the_same_image_through_each_kept_checkpoint(client, every_epoch_run, seven):
    assert seven["epoch"] == 2
    for epoch in (1, 2):
        network, ckpt = load_network(every_epoch_run, str(epoch))
        want = activations(network, ckpt.record.standardization.apply(pixels_of(seven)[None]))[
            "probabilities"
        ][0]
        by_pixels = client.post("/api/layers", json={"pixels": seven["pixels"], "checkpoint": epoch}).json()
        by_file = client.post(
            "/api/activations",
            params={"checkpoint": epoch},
            files={"file": ("s.png", SEVEN.read_bytes(), "image/png")},
        ).json()
        for body in (by_pixels, by_file):
            assert body["epoch"] == epoch
            np.testing.assert_allclose(list(body["probabilities"].values()), want, rtol=1e-4, atol=1e-6)
        kernels = client.get("/api/models/epochs/filters", params={"checkpoint": epoch}).json()
        got = np.frombuffer(base64.b64decode(kernels["conv1"]["data"]), "<f4").reshape(
            kernels["conv1"]["shape"]
        )
        np.testing.assert_array_equal(got, filters(network)["conv1"])
    first, second = (
        client.post("/api/layers", json={"pixels": seven["pixels"], "checkpoint": e}).json() for e in (1, 2)
    )
    assert first["probabilities"] != second["probabilities"]  # training changed the network


def test_explain_gives_the_arithmetic_of_the_trained_network_for_this_image(client, every_epoch_run, seven):
    network, ckpt = load_network(every_epoch_run, "1")
    reference = reference_network(network)
    for layer, channel, y, x in (
        ("pool1", 2, 5, 6),
        ("conv2", 7, 1, 2),
        ("dense3", 9, 0, 0),
        ("probabilities", 7, 0, 0),
    ):
        request = {
            "pixels": seven["pixels"],
            "checkpoint": 1,
            "layer": layer,
            "channel": channel,
            "y": y,
            "x": x,
        }
        response = client.post("/api/explain", json=request)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["epoch"] == 1 and body["model"] == "epochs" and body["server_ms"] > 0
        want = explain(reference, pixels_of(seven), ckpt.record.standardization, layer, channel, y, x)
        assert body["steps"] == want["steps"] and body["value"] == want["value"]
    conv = client.post(
        "/api/explain", json={"pixels": seven["pixels"], "layer": "conv1", "channel": 0, "y": 9, "x": 9}
    ).json()
    assert conv["epoch"] == 2 and conv["steps"][0]["kind"] == "conv"
    as_file = {
        "image": base64.b64encode(SEVEN.read_bytes()).decode(),
        "layer": "conv1",
        "channel": 0,
        "y": 9,
        "x": 9,
    }
    assert client.post("/api/explain", json=as_file).json()["steps"] == conv["steps"]  # prepared the same


def test_a_dataset_image_is_shown_as_cnnkit_evaluate_numbers_it(client, every_epoch_run):
    _, ckpt = load_network(every_epoch_run)
    _, _, split = evaluation_split(ckpt.record, ckpt.path)
    body = client.post(
        "/api/layers", json={"dataset": {"split": "test", "index": 17}, "checkpoint": 1}
    ).json()
    assert body["dataset"]["index"] == 17 and body["dataset"]["count"] == len(split.images) == 200
    assert body["dataset"]["label"] == int(split.labels[17])
    assert body["dataset"]["class_name"] == ckpt.record.class_names[int(split.labels[17])]
    np.testing.assert_array_equal(pixels_of(body), split.images[17].astype(np.float32))  # as stored
    assert body["epoch"] == 1
    explained = client.post("/api/explain", json={"dataset": {"index": 17}, "layer": "logits", "channel": 3})
    assert explained.status_code == 200 and explained.json()["steps"][0]["kind"] == "dense"
    refused(
        client.post("/api/layers", json={"dataset": {"split": "test", "index": 200}}),
        422,
        "index 200 is past the end",
        "200 images (0 to 199)",
    )


def image(seven, **fields):
    return {"pixels": seven["pixels"], "layer": "conv1", "channel": 0, "y": 0, "x": 0} | fields


@pytest.mark.parametrize(
    ("change", "status", "fragment"),
    [
        ({"layer": "conv9"}, 422, "no layer 'conv9'"),
        ({"channel": 99}, 422, "channel must be 0..3"),
        ({"y": 24}, 422, "y 0..23"),
        ({"channel": -1}, 400, "channel: Input should be greater than or equal to 0"),
        ({"channel": True}, 400, "channel: Input should be a valid integer"),
        ({"channel": "1"}, 400, "channel: Input should be a valid integer"),
        ({"channel": 1.0}, 400, "channel: Input should be a valid integer"),
        ({"layer": None}, 400, "layer"),
        ({"checkpoint": 7}, 422, "no such epoch is kept"),
        ({"checkpoint": "1"}, 400, "checkpoint"),
        ({"model": "nope"}, 404, "no model 'nope'"),
        ({"extra": 1}, 400, "extra: Extra inputs are not permitted"),
        ({"image": "aGVsbG8="}, 400, "exactly one way"),
        ({"pixels": None}, 400, "exactly one way"),
        ({"pixels": {"shape": [1, 28, 28], "data": "AAAA"}}, 422, "holds 3 bytes"),
        ({"pixels": {"shape": [3, 28, 28], "data": "AAAA"}}, 422, "not the model's input shape"),
        ({"pixels": {"shape": [1, 28], "data": "AAAA"}}, 400, "pixels.shape"),
        ({"pixels": {"shape": [1, 28, 28], "data": "***"}}, 400, "pixels.data: not base64"),
        (
            {
                "pixels": {
                    "shape": [1, 28, 28],
                    "data": base64.b64encode(np.full(784, np.nan, "<f4").tobytes()).decode(),
                }
            },
            422,
            "finite",
        ),
        ({"pixels": None, "image": "not base64!"}, 400, "image: not base64"),
        ({"pixels": None, "image": base64.b64encode(b"not an image").decode()}, 422, "image"),
        ({"pixels": None, "dataset": {"split": "holdout", "index": 0}}, 400, "dataset.split"),
        ({"pixels": None, "dataset": {"index": -1}}, 400, "dataset.index"),
    ],
)
def test_a_malformed_explain_request_is_a_4xx_in_one_line(client, seven, change, status, fragment):
    refused(client.post("/api/explain", json=image(seven, **change)), status, fragment)


def test_a_body_that_is_not_a_json_object_is_400(client):
    refused(
        client.post("/api/explain", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "not JSON",
    )
    refused(client.post("/api/layers", json=[1, 2]), 400)
    refused(client.post("/api/layers", json={}), 400, "exactly one way", "got none")


def test_activations_refuse_a_checkpoint_the_run_does_not_keep(client):
    files = {"file": ("s.png", SEVEN.read_bytes(), "image/png")}
    refused(client.post("/api/activations", params={"checkpoint": 3}, files=files), 422, "kept: 1, 2")
    refused(client.post("/api/activations", params={"checkpoint": "x"}, files=files), 400, "checkpoint")
    refused(client.get("/api/models/epochs/filters", params={"checkpoint": 9}), 422, "kept: 1, 2")


def test_a_checkpoint_outside_a_run_folder_is_its_only_epoch(every_epoch_run, tmp_path):
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes((every_epoch_run / "checkpoints" / "epoch-001.safetensors").read_bytes())
    with TestClient(create_app(load_models([alone]), workers=1)) as client:
        assert client.get("/api/models/alone/checkpoints").json()["epochs"] == [1]
        refused(
            client.post("/api/layers", json={"dataset": {"index": 0}, "checkpoint": 2}),
            422,
            "not in a run folder",
        )
        assert client.post("/api/layers", json={"dataset": {"index": 0}, "checkpoint": 1}).status_code == 200


def test_loaded_checkpoints_stay_within_their_bound_and_the_served_one_is_kept(every_epoch_run):
    first, second = sorted((every_epoch_run / "checkpoints").glob("epoch-00?.safetensors"))
    network, ckpt = load_network(every_epoch_run)
    held = LoadedCheckpoints(max_bytes=1)  # room for one checkpoint besides the pinned
    pinned = held.pin(network, ckpt.record, second)
    loaded = held.get(first)
    assert held.get(first) is loaded and held.get(second) is pinned
    assert loaded.epoch == 1 and loaded.reference() is loaded.reference()
    other = every_epoch_run / "copy.safetensors"
    other.write_bytes(first.read_bytes())
    try:
        held.get(other)
        assert list(held.recent) == [other] and held.held == held.recent[other].nbytes()
    finally:
        other.unlink()


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A narrow ResNet (batch norm, residual blocks) trained 2 epochs on 64 random 32 x 32 RGB images."""
    from cnnkit.recipes import TrainConfig
    from cnnkit.runs import start_run

    folder = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = np.arange(64) % 2
    np.savez(folder / "rgb.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    config = TrainConfig(arch="resnet", epochs=2, seed=0, keep=0, learning_rate=1e-3)
    start_run(
        f"npz:{folder / 'rgb.npz'}",
        config,
        folder / "run",
        architecture={"widths": (4, 6, 8, 10)},
        log=lambda line: None,
    )
    return folder / "run"


def test_a_second_network_is_served_layer_by_layer_and_explained_value_by_value(resnet_run):
    """The page and API know no layer names: a ResNet's stages, layers and arithmetic come through as they are."""
    with TestClient(create_app(load_models([resnet_run]), workers=1)) as client:
        model = client.get("/api/models").json()[0]
        assert model["stages"] and all(stage["title"] and stage["layers"] for stage in model["stages"])
        body = client.post("/api/layers", json={"dataset": {"index": 3}, "checkpoint": 1}).json()
        names = [layer["name"] for layer in body["layers"]]
        assert {name for stage in model["stages"] for name in stage["layers"]} <= set(names)
        kinds = set()
        for layer in body["layers"]:
            where = {"channel": 1} | ({"y": 2, "x": 0} if len(layer["shape"]) == 3 else {})
            response = client.post(
                "/api/explain",
                json={"pixels": body["pixels"], "checkpoint": 1, "layer": layer["name"], **where},
            )
            assert response.status_code == 200, (layer["name"], response.text)
            kinds.update(step["kind"] for step in response.json()["steps"])
        assert {
            "conv",
            "batchnorm",
            "relu",
            "maxpool",
            "add",
            "average",
            "dense",
            "softmax",
            "standardize",
        } <= kinds


def test_explanations_asked_at_once_each_get_their_own_arithmetic(every_epoch_run, seven):
    """The workers share one unfused network per checkpoint: its hooks record one request at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from cnnkit.serve.app import ExplainRequest, json_explain
    from cnnkit.serve.loaded import LoadedSplits

    served = load_models([every_epoch_run])[0]
    held, splits = LoadedCheckpoints(), LoadedSplits()
    held.pin(served.model, served.record, served.checkpoint.path)
    queries = [
        ExplainRequest(pixels=seven["pixels"], layer=layer, channel=k, y=k % 3, x=k % 5)
        for k in range(4)
        for layer in ("conv1", "pool1", "conv2", "relu2")
    ]
    alone = [json_explain(served, held, splits, q)["steps"] for q in queries]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda q: json_explain(served, held, splits, q)["steps"], queries * 3))
    assert together == alone * 3
