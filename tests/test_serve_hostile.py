"""cnnkit serve against hostile input: a huge history file, huge uploads, idle and slow connections, a
foreign Host header, garbage on the socket, a model whose record cannot be described. Each input is
made here at test time; servers run in child processes on 127.0.0.1, and their memory is read from
/proc/PID/status."""

import base64
import contextlib
import dataclasses
import io
import json
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from cnnkit.serve import app as serve_app
from cnnkit.serve import create_app, load_models
from cnnkit.serve.connections import FD_RESERVE

pytestmark = pytest.mark.slow  # real servers, sockets and uploads for seconds

ROOT = Path(__file__).resolve().parent.parent
SEVEN = ROOT / "examples" / "seven.png"


# --- a server in a child process, and its memory ---


def start_server(run, *args, nofile=None):
    """`cnnkit serve RUN ARGS --port 0` in a child (with RLIMIT_NOFILE `nofile`); (process, URL)."""

    def limit_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", "serve", str(run), *map(str, args), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_files if nofile else None,
    )
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        pytest.fail(f"cnnkit serve did not start: {line!r} {proc.communicate(timeout=30)[1][-2000:]}")
    return proc, line.split(" at ")[1].split()[0]


def stop_server(proc) -> str:
    """Stop the child with SIGTERM; its stderr."""
    proc.terminate()
    return proc.communicate(timeout=60)[1]


def status_mb(pid, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) / 1024


def reset_peak(pid) -> float:
    """Set the process's peak resident memory (VmHWM) to its present one (VmRSS); that, in MB."""
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")
    return status_mb(pid, "VmRSS")


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return Path(shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns(".lock")))


# --- the history ---


def test_a_huge_history_is_answered_small_in_bounded_memory(run_copy):
    lines = 31 * 2**20 // 12  # 31 MB of one tiny entry a line, under the 32 MB a history may have
    with open(run_copy / "history.jsonl", "ab") as f:
        f.write(b'{"epoch":1}\n' * lines)
    proc, url = start_server(run_copy)
    try:
        before = reset_peak(proc.pid)
        started = time.monotonic()
        response = httpx.get(url + "api/models/run/history", timeout=120)
        seconds = time.monotonic() - started
        growth = status_mb(proc.pid, "VmHWM") - before
    finally:
        stop_server(proc)
    assert response.status_code == 200, response.text[:500]
    assert len(response.content) < 300_000, len(response.content)  # was 341 MB
    assert growth < 100, f"the server grew by {growth:.0f} MB reading it"  # was 1,450 MB
    assert seconds < 60, seconds
    body = response.json()
    assert body["entries"] == 3 + lines
    history = body["history"]
    assert len(history) <= serve_app.MAX_HISTORY_POINTS
    assert history[0]["epoch"] == 1 and history[0]["train_loss"] is not None  # the first, kept


def test_a_history_keeps_its_first_and_last_entries_evenly_thinned():
    for count in (0, 1, 2, 999, 1000, 1001, 2500, 100_000):
        kept, seen = serve_app.thin(range(count), 1000)
        assert seen == count and len(kept) <= 1000
        if count < 1000:
            assert kept == list(range(count))
            continue
        assert kept[0] == 0 and kept[-1] == count - 1 and len(kept) > 500
        assert len(set(np.diff(kept[:-1]))) == 1, count  # evenly spaced, but for the last


def test_history_lines_too_long_too_deep_or_not_entries_are_skipped(run_copy):
    junk = [
        '{"epoch": 9, "train_loss": "' + "x" * 100_000 + '"}',  # over the 64 KB a line may have
        "[" * 50_000,  # nesting deeper than the JSON parser's recursion
        '{"epoch": true}',
        '{"epoch": -1}',
        '{"epoch": 1e400}',
        '{"epoch": 4, "train_loss": Infinity, "valid_loss": NaN}',
    ]
    with open(run_copy / "history.jsonl", "a") as f:
        f.write("\n".join(junk) + "\n")
    with TestClient(create_app(load_models([run_copy]), workers=1)) as client:
        response = client.get("/api/models/run/history")
    assert response.status_code == 200, response.text[:500]
    assert "NaN" not in response.text and "Infinity" not in response.text
    history = response.json()["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] is None and history[-1]["valid_loss"] is None


def test_a_history_over_the_size_limit_is_refused_unread(run_copy, monkeypatch):
    monkeypatch.setattr(serve_app, "MAX_HISTORY_BYTES", 1000)
    with open(run_copy / "history.jsonl", "ab") as f:
        f.write(b"\n" * 1000)
    with TestClient(create_app(load_models([run_copy]), workers=1)) as client:
        response = client.get("/api/models/run/history")
    assert response.status_code == 422 and "not a run's history" in response.json()["error"]


# --- uploads ---


def digit_image(mode, size, fmt) -> bytes:
    """A `size` image in `mode` showing one thick stroke (a "1"), saved as `fmt`."""
    ink, paper = {"L": (0, 255), "LA": ((0, 255), (255, 255)), "RGB": ("black", "white")}[mode]
    img = Image.new(mode, size, paper)
    width, height = size
    ImageDraw.Draw(img).line(
        [(width // 2, height // 6), (width // 2, 5 * height // 6)], fill=ink, width=width // 20
    )
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def post_images(url, images, route="api/activations"):
    """POST each of `images` (name, bytes) at once, each from its own thread; the responses in order."""
    answers = [None] * len(images)

    def post(i, name, data):
        answers[i] = httpx.post(url + route, files={"file": (name, data)}, timeout=300)

    threads = [threading.Thread(target=post, args=(i, *image)) for i, image in enumerate(images)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_big_uploads_are_decoded_reduced_or_refused_in_bounded_memory(tiny_run):
    huge_png = digit_image("L", (8000, 6000), "PNG")  # 48 megapixels, decoded whole: refused
    huge_jpeg = digit_image("L", (8000, 6000), "JPEG")  # 48 megapixels, decoded at 1/8: answered
    large_png = digit_image("LA", (4000, 3990), "PNG")  # just under 16 megapixels, 64 MB as RGBA
    proc, url = start_server(tiny_run, "--workers", 4)  # more workers than images decoded at once
    try:
        before = reset_peak(proc.pid)
        refusals = post_images(url, [("huge.png", huge_png)] * 4)
        growth_refused = status_mb(proc.pid, "VmHWM") - before
        started = time.monotonic()
        answers = post_images(url, [("huge.jpg", huge_jpeg)] * 4 + [("large.png", large_png)] * 4)
        seconds = time.monotonic() - started
        growth = status_mb(proc.pid, "VmHWM") - before
    finally:
        stop_server(proc)
    for response in refusals:
        assert response.status_code == 422, response.text[:300]
        assert "huge.png: 8000x6000 = 48 megapixels is over the 16 megapixels" in response.json()["error"]
    for response in answers:
        assert response.status_code == 200, response.text[:300]
        assert response.json()["class_name"] is not None
    assert growth_refused < 50, f"refusing grew the server by {growth_refused:.0f} MB"
    # 2 decoded at a time: about 290 MB; with all 4 workers decoding at once, 500 MB
    assert growth < 350, f"8 large uploads at once grew the server by {growth:.0f} MB"
    assert seconds < 120, seconds


def test_a_large_upload_is_prepared_from_a_reduced_image_like_a_small_one(client):
    small = digit_image("L", (400, 300), "PNG")
    large = digit_image("L", (4000, 3000), "PNG")  # 12 megapixels: reduced 4 times to under 1
    answers = [upload(client, data, route="/api/activations").json() for data in (small, large)]
    small_input, large_input = (
        np.frombuffer(base64.b64decode(a["input"]["data"]), np.uint8) for a in answers
    )
    assert large_input.max() == 255 and (large_input > 0).sum() > 20  # a digit, not a blank
    assert np.abs(small_input.astype(int) - large_input.astype(int)).mean() < 10  # nearly the same one


def test_uploads_beyond_the_memory_held_for_bodies_wait_for_none_and_get_503(models, held_predictions):
    release, started = held_predictions
    seven = SEVEN.read_bytes()
    with TestClient(create_app(models, workers=1, max_bodies_bytes=len(seven) + 1000)) as client:
        first = {}
        thread = threading.Thread(target=lambda: first.update(r=upload(client, seven)))
        thread.start()
        assert started.wait(30)
        response = upload(client, seven)  # the first one's body is still held
        release.set()
        thread.join(30)
        assert response.status_code == 503 and "busy" in response.json()["error"], response.text
        assert first["r"].status_code == 200
        assert upload(client, seven).status_code == 200  # its body was given back


# --- connections ---


def open_idle(port, count, first=b"G"):
    """`count` connections to 127.0.0.1:`port`, each having sent `first`."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(first)
        sockets.append(sock)
    return sockets


def closed_by_server(sock, within: float) -> bytes | None:
    """What the server sent before closing `sock` within `within` seconds; None if it stayed open."""
    sock.settimeout(0.2)
    received, deadline = b"", time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data
    return None


def test_idle_sockets_do_not_lock_out_a_client_under_a_low_file_limit(tiny_run):
    nofile = FD_RESERVE + 80  # room for 80 connections
    proc, url = start_server(tiny_run, nofile=nofile)
    most_fds, done = [0], threading.Event()

    def count_fds():
        while not done.is_set():
            with contextlib.suppress(OSError):  # the server has just exited
                most_fds[0] = max(most_fds[0], len(os.listdir(f"/proc/{proc.pid}/fd")))
            time.sleep(0.005)

    watcher = threading.Thread(target=count_fds, daemon=True)
    watcher.start()
    idle = []
    try:
        idle = open_idle(port_of(url), nofile + 50)  # more sockets than the process may open
        started = time.monotonic()
        response = httpx.get(url + "api/models", timeout=30)
        seconds = time.monotonic() - started
    finally:
        done.set()
        watcher.join()
        for sock in idle:
            sock.close()
        err = stop_server(proc)
    assert response.status_code == 200 and seconds < 10, (response.status_code, seconds)
    assert most_fds[0] < nofile, most_fds[0]
    assert "Too many open files" not in err and "Traceback" not in err, err[-2000:]


def test_idle_and_slow_connections_are_closed_after_the_timeout(tiny_run):
    proc, url = start_server(tiny_run, "--timeout", 1)
    port = port_of(url)
    try:
        silent, one_byte = open_idle(port, 1, b""), open_idle(port, 1, b"G")
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        started = time.monotonic()
        slow.sendall(b"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(3):  # a header byte now and then, never the end of the headers
            time.sleep(0.3)
            slow.sendall(b"X")
        answer = closed_by_server(slow, 10)
        seconds = time.monotonic() - started
        assert answer is not None and seconds < 5, seconds  # was never closed
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"application/json" in head
        assert "did not arrive within 1 s" in json.loads(body)["error"]
        assert closed_by_server(silent[0], 5) == b""  # closed without a word
        assert closed_by_server(one_byte[0], 5).startswith(b"HTTP/1.1 408")
        # after an answer, a kept-alive connection that sends nothing more is closed too
        kept = socket.create_connection(("127.0.0.1", port), timeout=30)
        kept.sendall(b"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = closed_by_server(kept, 5)
        assert answer is not None and answer.startswith(b"HTTP/1.1 200")
    finally:
        err = stop_server(proc)
    assert "Traceback" not in err, err[-2000:]


def test_garbage_on_the_socket_gets_a_json_400(tiny_run):
    proc, url = start_server(tiny_run)
    try:
        for garbage in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n"):
            (sock,) = open_idle(port_of(url), 1, garbage)
            head, _, body = closed_by_server(sock, 10).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head, head
            assert "malformed HTTP request" in json.loads(body)["error"]
    finally:
        err = stop_server(proc)
    assert "Traceback" not in err, err[-2000:]


# --- the Host header ---


def test_a_foreign_host_header_is_refused_with_json_unless_allowed(tiny_run):
    proc, url = start_server(tiny_run, "--allow-host", "Lab.Example")
    port = port_of(url)
    try:

        def get(host):
            return httpx.get(url + "api/models", headers={"host": host}, timeout=30)

        for host in ("rebind.attacker.example", f"rebind.attacker.example:{port}", "localhost.attacker"):
            response = get(host)
            assert response.status_code == 400, (host, response.text)
            error = response.json()["error"]
            assert "is not a name this server answers to" in error and "--allow-host" in error
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"[::1]:{port}",
            "LOCALHOST.",
            f"lab.example:{port}",
        ):
            assert get(host).status_code == 200, host
        assert get("192.168.1.10").status_code == 200  # an address cannot be rebound
    finally:
        stop_server(proc)


def test_host_names_are_read_without_port_brackets_case_or_final_dot():
    assert serve_app.host_name("[::1]:8000") == "::1"
    assert serve_app.host_name("LocalHost.:80") == "localhost"
    assert serve_app.host_name("example.org") == "example.org"
    assert serve_app.host_name("::1") == "::1"


# --- one bad model ---


@pytest.fixture(scope="module")
def models(tiny_run):
    return load_models([tiny_run])


@pytest.fixture(scope="module")
def client(models):
    with TestClient(create_app(models, workers=1)) as client:
        yield client


def upload(client, data, route="/api/predict", **params):
    return client.post(route, files={"file": ("digit.png", data, "image/png")}, params=params)


def with_record(served, model_id, **changes):
    record = served.record.replace(**changes)
    return dataclasses.replace(
        served, id=model_id, checkpoint=dataclasses.replace(served.checkpoint, record=record)
    )


def test_a_model_whose_record_cannot_be_described_does_not_break_the_others(models):
    good = models[0]
    broken = with_record(good, "broken", architecture=None)
    with TestClient(create_app([broken, good], workers=1)) as client:
        listed = client.get("/api/models")
        assert listed.status_code == 200, listed.text
        bad, fine = listed.json()
        assert set(bad) == {"id", "source", "checkpoint", "error"} and bad["id"] == "broken"
        assert "'broken'" in bad["error"] and "cannot be served" in bad["error"] and "\n" not in bad["error"]
        assert fine["id"] == "tiny" and fine["class_names"]
        for response in (upload(client, SEVEN.read_bytes()), client.get("/api/models/broken/history")):
            assert response.status_code == 500 and response.json() == {"error": bad["error"]}
        assert upload(client, SEVEN.read_bytes(), model="tiny").status_code == 200
        assert client.get("/api/models/tiny/history").status_code == 200


@pytest.mark.parametrize(
    "trainer_state",
    [{"best": [1]}, {"best": {"epoch": float("nan")}}, {"best": {"epoch": "3"}}, {"best": None}],
    ids=["best-a-list", "epoch-nan", "epoch-a-string", "best-null"],
)
def test_a_model_with_a_malformed_trainer_state_never_makes_a_500_for_the_others(models, trainer_state):
    odd = with_record(models[0], "odd", trainer_state=trainer_state)
    with TestClient(create_app([models[0], odd], workers=1)) as client:
        response = client.get("/api/models")
        assert response.status_code == 200, response.text
        assert "NaN" not in response.text
        fine, other = response.json()
        assert fine["id"] == "tiny" and "error" not in fine
        assert "error" in other or other["best_epoch"] is None, other  # described, or refused alone


def test_no_answer_holds_a_bare_nan():
    body = serve_app.json_bytes({"a": [1.0, float("nan")], "b": {"c": -math.inf}, "d": (float("inf"),)})
    assert json.loads(body) == {"a": [1.0, None], "b": {"c": None}, "d": [None]}
    assert serve_app.JSONAnswer({"x": float("nan")}).body == b'{"x":null}'
