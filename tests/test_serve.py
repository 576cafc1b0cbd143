"""cnnkit serve: the JSON API through an in-process client (every answer and every refusal), and the
command in a child process (its URL, Ctrl-C, bad arguments)."""

import base64
import dataclasses
import io
import json
import shutil
import signal
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import run_cnnkit, start_cnnkit
from fastapi.testclient import TestClient
from PIL import Image

from cnnkit.checkpoint import load_network
from cnnkit.images import ImageBytes, read_image_for_model
from cnnkit.inference import predict_proba
from cnnkit.layer_outputs import LAYERS, activations, filters
from cnnkit.serve import app as serve_app
from cnnkit.serve import create_app, load_models

ROOT = Path(__file__).resolve().parent.parent
SEVEN = ROOT / "examples" / "seven.png"
TWO = ROOT / "examples" / "two.png"


def png_bytes(array, mode=None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def models(tiny_run):
    """The tiny run served twice (ids "tiny" and "tiny-2")."""
    return load_models([tiny_run, tiny_run])


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models, workers=1)) as client:
        yield client


def upload(client, data, route="/api/predict", name="digit.png", **params):
    return client.post(route, files={"file": (name, data, "image/png")}, params=params)


def refused(response, status, *fragments):
    """The response is `status` with one JSON `{"error": ...}` holding every fragment, and no traceback."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and body["error"], body
    assert "Traceback" not in response.text
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])
    return body["error"]


# --- the models ---


def test_models_lists_each_model_with_dataset_epoch_classes_and_accuracy(client, tiny_run):
    listed = client.get("/api/models").json()
    assert [m["id"] for m in listed] == ["tiny", "tiny-2"]
    _, ckpt = load_network(tiny_run)
    record = ckpt.record
    entry = listed[0]
    assert entry["dataset"] == record.dataset and entry["dataset"].startswith("npz:")
    assert entry["epoch"] == record.epoch == 3 and entry["epochs"] == 3
    assert entry["class_names"] == list(record.class_names)
    assert entry["accuracy"] == pytest.approx(record.history[-1]["valid_accuracy"], rel=1e-5)
    assert entry["input_shape"] == [1, 28, 28] and entry["preprocessing"] == "digit"
    assert entry["checkpoint"] == str(ckpt.path)
    assert [layer["shape"] for layer in entry["layers"]][:2] == [[1, 28, 28], [4, 24, 24]]


def test_a_model_trained_without_validation_has_no_accuracy(models):
    served = models[0]
    record = served.record.replace(
        history=tuple({**h, "valid_accuracy": None} for h in served.record.history)
    )
    checkpoint = dataclasses.replace(served.checkpoint, record=record)
    assert dataclasses.replace(served, checkpoint=checkpoint).describe()["accuracy"] is None


# --- predict and activations ---


def expected_proba(tiny_run, path):
    model, ckpt = load_network(tiny_run)
    record = ckpt.record
    raw = read_image_for_model(path, record.architecture.input_shape, record.preprocessing)[None]
    return predict_proba(model, record.standardization.apply(raw))[0], model, record, raw


def test_predict_answers_as_cnnkit_predict_does(client, tiny_run):
    proba, _, record, _ = expected_proba(tiny_run, SEVEN)
    body = upload(client, SEVEN.read_bytes()).json()
    assert set(body) == {"label", "class_name", "confidence", "probabilities", "model"}
    assert body["model"] == "tiny"
    assert body["label"] == int(proba.argmax()) and body["class_name"] == record.class_names[body["label"]]
    assert list(body["probabilities"]) == list(record.class_names)
    np.testing.assert_allclose(list(body["probabilities"].values()), proba, rtol=1e-5, atol=1e-7)
    assert body["confidence"] == pytest.approx(proba.max(), rel=1e-5)


def test_predict_uses_the_model_asked_for(client):
    assert upload(client, TWO.read_bytes(), model="tiny-2").json()["model"] == "tiny-2"
    refused(upload(client, TWO.read_bytes(), model="nope"), 404, "no model 'nope'", "tiny, tiny-2")


def test_activations_return_every_layer_of_cnnkit_layer_outputs_compactly(client, tiny_run):
    proba, model, record, raw = expected_proba(tiny_run, TWO)
    body = upload(client, TWO.read_bytes(), route="/api/activations").json()
    assert body["label"] == int(proba.argmax()) and body["model"] == "tiny"
    # the input as the model receives it, before standardization
    assert body["input"]["shape"] == [1, 28, 28]
    prepared = np.frombuffer(base64.b64decode(body["input"]["data"]), np.uint8).reshape(1, 28, 28)
    np.testing.assert_array_equal(prepared, np.round(raw[0]).astype(np.uint8))
    expected = activations(model, record.standardization.apply(raw))
    assert [layer["name"] for layer in body["layers"]] == list(LAYERS)
    for layer in body["layers"]:
        want = expected[layer["name"]][0]
        assert layer["shape"] == list(want.shape) and layer["description"]
        if want.ndim == 1:
            np.testing.assert_allclose(layer["values"], want, rtol=1e-5, atol=1e-6)
            continue
        q = np.frombuffer(base64.b64decode(layer["data"]), np.uint8).reshape(len(want), -1)
        low, high = np.array(layer["min"]), np.array(layer["max"])
        decoded = low[:, None] + q / 255.0 * (high - low)[:, None]
        step = (high - low)[:, None] / 255.0
        assert np.all(
            np.abs(decoded - want.reshape(len(want), -1)) <= step / 2 + 1e-5 * (1 + np.abs(high[:, None]))
        )
    np.testing.assert_allclose(list(body["probabilities"].values()), proba, rtol=1e-4, atol=1e-6)
    assert body["server_ms"] > 0


def test_filters_are_the_models_convolution_kernels_exactly(client, models):
    body = client.get("/api/models/tiny/filters").json()
    for name, kernels in filters(models[0].model).items():
        assert body[name]["shape"] == list(kernels.shape)
        got = np.frombuffer(base64.b64decode(body[name]["data"]), "<f4").reshape(kernels.shape)
        np.testing.assert_array_equal(got, kernels)
    refused(client.get("/api/models/nope/filters"), 404, "no model 'nope'")


# --- the training view's history ---


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return Path(shutil.copytree(tiny_run, tmp_path / "copy", ignore=shutil.ignore_patterns(".lock")))


def test_history_is_read_afresh_so_it_follows_a_run_still_training(run_copy):
    with TestClient(create_app(load_models([run_copy]), workers=1)) as client:
        body = client.get("/api/models/copy/history").json()
        assert body["live"] and body["source"] == str(run_copy / "history.jsonl")
        assert [h["epoch"] for h in body["history"]] == [1, 2, 3]
        assert body["served_epoch"] == 3 and body["epochs"] == 3
        first = body["history"][0]
        assert set(first) >= {"train_loss", "valid_loss", "valid_accuracy", "learning_rate", "epoch_seconds"}
        # `cnnkit train` writes another epoch (and a torn or foreign line is skipped, not an error)
        with open(run_copy / "history.jsonl", "a") as f:
            f.write(
                json.dumps({**first, "epoch": 4, "valid_accuracy": float("nan")}) + "\n{not json\n[1, 2]\n"
            )
        body = client.get("/api/models/copy/history").json()
        assert [h["epoch"] for h in body["history"]] == [1, 2, 3, 4]
        assert body["history"][-1]["valid_accuracy"] is None  # NaN is not JSON


def test_history_of_a_checkpoint_outside_a_run_comes_from_its_record(tiny_run, tmp_path):
    single = tmp_path / "model.safetensors"
    shutil.copy(next((tiny_run / "checkpoints").glob("epoch-003.safetensors")), single)
    with TestClient(create_app(load_models([single]), workers=1)) as client:
        assert client.get("/api/models").json()[0]["id"] == "model"
        body = client.get("/api/models/model/history").json()
        assert not body["live"] and body["source"] == str(single)
        assert [h["epoch"] for h in body["history"]] == [1, 2, 3]


def test_a_history_that_is_not_a_file_falls_back_to_the_checkpoints_record(run_copy):
    (run_copy / "history.jsonl").unlink()
    (run_copy / "history.jsonl").mkdir()  # a folder where the file should be
    with TestClient(create_app(load_models([run_copy]), workers=1)) as client:
        body = client.get("/api/models/copy/history").json()
        assert not body["live"] and len(body["history"]) == 3  # falls back to the checkpoint's record


# --- refusals: never a 500, always {"error": ...} ---


def test_a_request_without_an_image_is_400_saying_how_to_send_one(client):
    refused(client.post("/api/predict"), 400, "file", "multipart form field named 'file'")
    refused(client.post("/api/predict", data={"other": "x"}), 400, "file")
    refused(client.post("/api/predict", json={"file": "seven.png"}), 400, "file")
    refused(upload(client, b""), 400, "empty")


def test_a_malformed_multipart_body_is_400(client):
    response = client.post(
        "/api/predict",
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\nabc',
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert response.status_code == 400 and "error" in response.json()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"just some text", "not an image file"),
        (png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64)))[:2000], "truncated"),
        (png_bytes(np.full((40, 40), 255)), "blank"),
        (png_bytes(np.full((40, 40, 3), 90), "RGB"), "blank"),
    ],
    ids=["not-an-image", "truncated", "blank-white", "blank-gray"],
)
@pytest.mark.parametrize("route", ["/api/predict", "/api/activations"])
def test_an_image_cnnkit_cannot_read_is_422_naming_the_upload(client, route, data, fragment):
    refused(upload(client, data, route=route, name="mine.png"), 422, "mine.png: ", fragment)


def test_an_image_over_the_pixel_limit_is_422_before_it_is_decoded(client):
    big = io.BytesIO()
    Image.new("1", (8000, 7000)).save(big, "PNG")  # 56 megapixels in a few kilobytes
    assert len(big.getvalue()) < 1_000_000
    refused(upload(client, big.getvalue()), 422, "56 megapixels is over cnnkit's limit of 50 megapixels")


def test_a_body_over_the_limit_is_413_by_its_length_or_as_it_streams(models):
    with TestClient(create_app(models, workers=1, max_body_bytes=2000)) as client:
        refused(upload(client, bytes(3000)), 413, "over the limit")

        def chunks():  # no Content-Length: the limit is counted as the body arrives
            for _ in range(10):
                yield bytes(500)

        response = client.post(
            "/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
        )
        assert "content-length" not in response.request.headers
        refused(response, 413, "over the limit")
        assert upload(client, png_bytes(np.eye(28) * 255)).status_code == 200  # under it: answered


def test_a_content_length_that_is_not_a_number_is_400(client):
    response = client.post("/api/predict", content=b"abc", headers={"content-length": "lots"})
    refused(response, 400, "Content-Length")


def test_unknown_routes_and_methods_are_json_errors(client):
    refused(client.get("/api/nothing"), 404, "Not Found")
    refused(client.get("/api/predict"), 405, "Method Not Allowed")
    refused(client.get("/api/models/tiny/nothing"), 404)


def test_an_unexpected_failure_is_500_json_without_a_traceback(models, monkeypatch):
    def broken(*args):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(serve_app, "predict_image", broken)
    with TestClient(create_app(models, workers=1), raise_server_exceptions=False) as client:
        message = refused(upload(client, SEVEN.read_bytes()), 500, "internal error (RuntimeError)")
        assert "secret internals" not in message


def test_a_burst_beyond_the_queue_is_503_while_the_pool_is_busy(models, held_predictions):
    release, started = held_predictions
    app = create_app(models, workers=1, max_waiting=1)
    with TestClient(app) as client:
        first = {}
        thread = threading.Thread(target=lambda: first.update(r=upload(client, SEVEN.read_bytes())))
        thread.start()
        assert started.wait(30)
        refused(upload(client, SEVEN.read_bytes()), 503, "busy")
        release.set()
        thread.join(30)
        assert first["r"].status_code == 200
        assert upload(client, SEVEN.read_bytes()).status_code == 200  # the queue drained


# --- the page, its files and the docs ---


def test_the_page_and_its_files_are_served_and_fetch_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    static = Path(serve_app.STATIC)
    for path in static.iterdir():
        response = client.get(f"/static/{path.name}")
        assert response.status_code == 200, path.name
        assert (
            "http://" not in response.text
            and "https://" not in response.text
            and "//cdn" not in response.text
        )
    for name in ("app.js", "style.css"):
        assert f"/static/{name}" in page.text
    refused(client.get("/static/../app.py"), 404)


def test_api_docs_work_offline_from_openapi_json(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/docs.js" in docs.text and "cdn" not in docs.text
    spec = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/activations", "/api/models"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]


def test_static_files_ship_in_the_package():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"cnnkit.serve" = ["static/*"]' in text
    assert {"index.html", "app.js", "style.css", "docs.html", "docs.js"} <= {
        p.name for p in Path(serve_app.STATIC).iterdir()
    }


# --- the command: a child process ---


def serve_child(*args):
    """Start `cnnkit serve ARGS --port 0`; return the process and the URL it printed."""
    proc = start_cnnkit("serve", *args, "--port", "0", text=True)
    line = proc.stdout.readline()
    assert " at http://" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.split(" at ")[1].split()[0]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_binds_localhost_answers_and_stops_cleanly(tiny_run, stop):
    proc, url = serve_child(tiny_run)
    try:
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "api/models", timeout=30).json()[0]["id"] == "tiny"
        response = httpx.post(url + "api/predict", files={"file": ("s.png", SEVEN.read_bytes())}, timeout=30)
        assert response.status_code == 200 and response.json()["label"] in range(10)
        big = httpx.post(url + "api/predict", files={"file": ("b.png", bytes(6 * 2**20))}, timeout=30)
        assert big.status_code == 413
    finally:
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["cnnkit: interrupted"], err  # one line, no traceback
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/"))))


def test_serve_refuses_a_port_in_use_in_one_line(tiny_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run_cnnkit("serve", tiny_run, "--port", port, timeout=120).assert_one_line_error(
            f"127.0.0.1:{port} is already in use", "--port"
        )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["{missing}"], ["no such checkpoint file or run folder"]),
        (["{run}", "--host", "no-such-host.invalid"], ["--host no-such-host.invalid", "not an address"]),
        (["{run}", "--port", "65536"], ["argument --port", "0..65535"]),
        (["{run}", "--workers", "0"], ["argument --workers"]),
        ([], ["RUN_OR_CHECKPOINT"]),
    ],
    ids=["missing-run", "bad-host", "bad-port", "bad-workers", "no-run"],
)
def test_serve_refuses_bad_arguments_in_one_line(tiny_run, tmp_path, args, fragments):
    args = [a.format(missing=tmp_path / "none", run=tiny_run) for a in args]
    result = run_cnnkit("serve", *args, timeout=120)  # a hang (no refusal) fails here, as TimeoutExpired
    result.assert_one_line_error(*fragments)
    assert result.out == "", result.out  # refused before it served: no URL was printed


# --- a colour model: the file is resized, not made a digit ---


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """A tiny network trained 1 epoch on 64 random 32 x 32 RGB images of two classes."""
    from cnnkit.recipes import TrainConfig
    from cnnkit.runs import start_run

    folder = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = np.arange(64) % 2
    np.savez(folder / "rgb.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    config = TrainConfig(arch="chapter", epochs=1, seed=0, learning_rate=1e-3)
    architecture = {"conv_channels": (4, 8), "hidden_units": 16}
    start_run(
        f"npz:{folder / 'rgb.npz'}", config, folder / "run", architecture=architecture, log=lambda line: None
    )
    return folder / "run"


def test_a_colour_model_gets_the_uploaded_file_resized_in_colour(rgb_run):
    model, ckpt = load_network(rgb_run)
    assert ckpt.record.preprocessing == "resize"
    photo = png_bytes(np.random.default_rng(1).integers(0, 256, (50, 70, 3)), "RGB")
    raw = read_image_for_model(ImageBytes(photo, "photo.png"), (3, 32, 32), "resize")[None]
    expected = predict_proba(model, ckpt.record.standardization.apply(raw))[0]
    with TestClient(create_app(load_models([rgb_run]), workers=1)) as client:
        assert client.get("/api/models").json()[0]["input_shape"] == [3, 32, 32]
        body = upload(client, photo, route="/api/activations").json()
        assert body["input"]["shape"] == [3, 32, 32]
        prepared = np.frombuffer(base64.b64decode(body["input"]["data"]), np.uint8).reshape(3, 32, 32)
        np.testing.assert_array_equal(prepared, raw[0].astype(np.uint8))
        np.testing.assert_allclose(list(body["probabilities"].values()), expected, rtol=1e-4, atol=1e-6)
        assert client.get("/api/models/run/filters").json()["conv1"]["shape"] == [4, 3, 5, 5]
