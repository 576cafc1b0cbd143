"""Shared fixtures: small real datasets, one trained run, and a local HTTP server for download tests."""

import functools
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

# Training in this process, and in every child, with libgomp's short spin that `cnnkit.cli.main` sets on a
# busy machine (see cnnkit.threads): spinning threads beside another busy process ran one chapter epoch
# in 50 s instead of 12. Set before torch is imported; a value the user set wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from cnnkit.data import load_dataset


def pytest_collection_modifyitems(items):
    # Tests that need the chapter's network trained for 6 epochs (trained_run) check learning, not
    # plumbing: they are the suite's slow ones (`pytest -m "not slow"` skips them; CI runs them).
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cpp_extension():
    """cnnkit's compiled C++ kernels (cnnkit.extension), built (or found in the user's cache) once per
    session. Without a compiler the C++ tests are skipped, except under CI=true, where they fail."""
    import shutil

    from cnnkit.kernels import extension

    if not (shutil.which("g++") or shutil.which("c++")):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("no C++ compiler (g++ or c++) on PATH: the C++ kernels cannot be tested")
        pytest.skip("no C++ compiler (g++ or c++) on PATH")
    return extension._load_extension()


# Layer sizes of a tiny network for tests that check files and plumbing, not learning (start_run's
# `architecture`): about 20 times faster to train than the chapter's.
TINY = {"conv_channels": (4, 8), "hidden_units": 32}


@pytest.fixture(scope="session", autouse=True)
def fused_pooling_built():
    """Build the fused pooling's C++ kernels (cnnkit.pooling) once, up front: a first build takes 12-17 s,
    which would otherwise fall inside whichever test first runs the network, possibly in a child process
    with a timeout."""
    from cnnkit.kernels import pooling

    pooling.kernel_name()


@pytest.fixture
def one_torch_thread():
    """Tiny networks train fastest on one thread, and the CPU is shared; the count is restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mnist_5k():
    return load_dataset("mnist-5k")


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory, mnist_5k):
    """npz:FILE source with 640 training and 200 test digits (real MNIST, from mnist-5k), Keras layout."""
    path = tmp_path_factory.mktemp("data") / "small.npz"
    train, test = mnist_5k.train, mnist_5k.test
    np.savez(
        path,
        x_train=train.images[:640, 0],
        y_train=train.labels[:640],
        x_test=test.images[:200, 0],
        y_test=test.labels[:200],
    )
    return f"npz:{path}"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run folder holding the chapter's CNN trained for 6 epochs on mnist-5k (about 94% test accuracy), in
    fp32 on every CPU (precision "auto" would train another model where the CPU has bf16)."""
    from cnnkit.recipes import TrainConfig
    from cnnkit.runs import start_run

    run_dir = tmp_path_factory.mktemp("runs") / "mnist-5k"
    start_run("mnist-5k", TrainConfig(epochs=6, seed=0, precision="fp32"), run_dir, log=lambda line: None)
    return run_dir


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_npz):
    """A run folder of a tiny network trained 3 epochs on small_npz (640 train, 200 test digits), keep=1."""
    from cnnkit.recipes import TrainConfig
    from cnnkit.runs import start_run

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    config = TrainConfig(epochs=3, seed=0, keep=1, learning_rate=1e-3)
    start_run(small_npz, config, run_dir, architecture=TINY, valid_size=128, log=lambda line: None)
    return run_dir


# --- a local HTTP server: no test reaches the network ---


class _Handler(BaseHTTPRequestHandler):
    """Serves server.routes: path -> (behaviour, body). Behaviours: "ok"; "truncate" (promises the whole
    body, sends half and closes); "stall" (waits 1 s first); "no length" (no Content-Length: the body
    ends when the connection closes); "endless" (zeros until the client hangs up); "trickle" (one
    byte every 0.2 s)."""

    def do_GET(self):
        self.server.requests.append(self.path)
        behaviour, body = self.server.routes.get(self.path, ("missing", b""))
        if behaviour == "missing":
            self.send_error(404)
            return
        if behaviour == "stall":
            time.sleep(1.0)
        try:
            self.send_response(200)
            if behaviour not in ("no length", "endless"):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if behaviour == "endless":
                while True:
                    self.wfile.write(bytes(1 << 16))
            elif behaviour == "trickle":
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.wfile.write(body[: len(body) // 2] if behaviour == "truncate" else body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first (a timeout, a deadline, a size limit)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1: set `server.routes[path] = (behaviour, body)`; `server.url` is its base."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes, httpd.requests = {}, []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def refused_url():
    """A URL on a port nobody listens on: connections are refused, as with no network. The port stays
    bound (not listening) while the test runs, so no other process can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}/"


# --- the command line in a child process, with its exit code, output and peak memory ---


@dataclass
class CliRun:
    """A finished `python -m cnnkit ...`: exit code, stdout, stderr and the child's peak resident MB."""

    args: list
    code: int
    out: str
    err: str
    peak_mb: float

    def assert_one_line_error(self, *fragments, max_mb=1024):
        """Exit code 2, one line `cnnkit: error: ...` holding every fragment, no traceback, bounded memory."""
        lines = self.err.strip().splitlines()
        assert self.code == 2, (self.args, self.code, self.err[-2000:])
        assert "Traceback" not in self.err, self.err[-2000:]
        assert len(lines) == 1 and lines[0].startswith("cnnkit: error: "), (self.args, self.err[-2000:])
        for fragment in fragments:
            assert str(fragment) in lines[0], (fragment, lines[0])
        assert self.peak_mb < max_mb, (self.args, f"peak {self.peak_mb:.0f} MB")
        return lines[0]


# Runs cnnkit's entry module and, at exit, writes the process's own peak RSS (VmHWM) to $CNNKIT_TEST_PEAK.
# (The rusage of a child started by fork counts the parent's pages copied before exec: pytest's size.)
_CHILD = """
import atexit, os, runpy, sys
def _report_peak():
    with open("/proc/self/status") as status, open(os.environ["CNNKIT_TEST_PEAK"], "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM")).split()[1])
atexit.register(_report_peak)
sys.argv[0] = "cnnkit"
runpy.run_module("cnnkit", run_name="__main__", alter_sys=True)
"""


def run_cnnkit(*args, cwd=None, env=None, timeout=300, stdin=None) -> CliRun:
    """Run `python -m cnnkit ARGS` in a child process: exit code, output, and its own peak RSS in MB."""
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory() as scratch:
        peak_file = os.path.join(scratch, "peak")
        child_env = {**os.environ, **(env or {}), "CNNKIT_TEST_PEAK": peak_file}
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, *args],
            capture_output=True,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            cwd=cwd,
            env=child_env,
            timeout=timeout,
        )
        peak_kb = int(Path(peak_file).read_text()) if os.path.exists(peak_file) else float("inf")
    return CliRun(
        args,
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
        peak_kb / 1024,
    )


def start_cnnkit(*args, text=False) -> subprocess.Popen:
    """`python -m cnnkit ARGS` started in a child with stdout and stderr piped, for tests that read its
    output while it runs or send it signals."""
    return subprocess.Popen(
        [sys.executable, "-m", "cnnkit", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=text,
    )


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1])


@functools.cache
def _fresh_process_mb() -> float:
    """The peak resident MB of a fresh `python -m cnnkit` that has imported what a command imports: what
    an in-process run adds to its own peak, so that `max_mb` bounds the same thing in either case."""
    code = "import cnnkit.cli, torch, numpy, PIL.Image, safetensors.torch; print(open('/proc/self/status').read())"
    status = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def run_cnnkit_in_process(*args, cwd=None, env=None, stdin=None) -> CliRun:
    """`cnnkit ARGS` through `cnnkit.cli.main` in this process (no second import of torch): exit code,
    output, and the peak resident MB it reached, counted as a fresh process would (its own peak above
    the RSS at the start, reset through /proc/self/clear_refs, plus a fresh process's). Global state
    that `main` changes (environment, working folder, thread count, signal handlers, the "cnnkit"
    logger's output, which a process prints on stderr) is restored after."""
    import io
    import logging
    import signal
    from contextlib import redirect_stderr, redirect_stdout

    import torch

    from cnnkit.cli import main

    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    warnings_out = logging.StreamHandler(err)
    warnings_out.setLevel(logging.WARNING)
    cnnkit_logger = logging.getLogger("cnnkit")
    cnnkit_logger.addHandler(warnings_out)
    stdin_before = sys.stdin
    try:
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        sys.stdin = stdin if stdin is not None else io.StringIO("")
        with open("/proc/self/clear_refs", "w") as clear:  # VmHWM := VmRSS
            clear.write("5")
        start_kb = _status_kb("VmRSS")
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exit:  # argparse's usage errors
                code = exit.code if isinstance(exit.code, int) else 2
        peak_mb = (_status_kb("VmHWM") - start_kb) / 1024 + _fresh_process_mb()
    finally:
        sys.stdin = stdin_before
        cnnkit_logger.removeHandler(warnings_out)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return CliRun(args, code, out.getvalue(), err.getvalue(), peak_mb)


@pytest.fixture
def cli():
    """`cli("train", "--dataset", ...)`: the command line, run in this process (see
    `run_cnnkit_in_process`); with `timeout=` (a command that might hang) or --nproc-per-node, in a child
    process (see `run_cnnkit`). Tests where the process itself is the point (start-up, signals, pipes, torchrun)
    call `run_cnnkit` or `start_cnnkit`."""

    def run(*args, timeout=None, **kwargs):
        if timeout is not None or "--nproc-per-node" in args:  # torchrun's ranks write to the real stdout
            return run_cnnkit(*args, timeout=timeout or 300, **kwargs)
        return run_cnnkit_in_process(*args, **kwargs)

    return run


# --- more kinds of trained runs, for the report and its figures ---


@pytest.fixture(scope="session")
def rgb_folder_run(tmp_path_factory):
    """A run folder of a tiny network trained 2 epochs on folder:DIR of 20x20 RGB pictures (a coloured
    square on noise): 4 classes, one with a non-ASCII name, in train/ and test/, 8 validation images."""
    from PIL import Image

    from cnnkit.recipes import TrainConfig
    from cnnkit.runs import start_run

    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    colors = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (230, 0, 0), "λ yellow": (240, 220, 0)}
    for split, count in (("train", 16), ("test", 6)):
        for name, color in colors.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 60, (20, 20, 3)).astype(np.uint8)
                top, left = rng.integers(0, 10, 2)
                image[top : top + 10, left : left + 10] = color
                Image.fromarray(image, "RGB").save(root / split / name / f"{i}.png")
    run_dir = tmp_path_factory.mktemp("runs") / "rgb"
    config = TrainConfig(arch="chapter", epochs=2, seed=0, learning_rate=1e-3)
    start_run(f"folder:{root}", config, run_dir, architecture=TINY, valid_size=8, log=lambda line: None)
    return run_dir


@pytest.fixture(scope="session")
def three_class_run(tmp_path_factory):
    """A run folder of a tiny network trained 2 epochs without a validation split on an npz of 16x16
    gray images of 3 named classes (a square, a vertical bar, a horizontal bar on noise)."""
    from cnnkit.recipes import TrainConfig
    from cnnkit.runs import start_run

    rng = np.random.default_rng(1)

    def images(n):
        labels = np.arange(n) % 3
        x = rng.integers(0, 40, (n, 16, 16)).astype(np.uint8)
        for image, label in zip(x, labels, strict=True):
            if label == 0:
                image[4:12, 4:12] = 255
            elif label == 1:
                image[:, 7:9] = 255
            else:
                image[7:9, :] = 255
        return x, labels

    (x_train, y_train), (x_test, y_test) = images(90), images(30)
    path = tmp_path_factory.mktemp("data") / "three.npz"
    names = np.array(["square", "vertical bar", "horizontal bar"])
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=names)
    run_dir = tmp_path_factory.mktemp("runs") / "three"
    config = TrainConfig(epochs=2, seed=0, learning_rate=1e-3)
    start_run(f"npz:{path}", config, run_dir, architecture=TINY, valid_size=0, log=lambda line: None)
    return run_dir


@pytest.fixture
def held_predictions(monkeypatch):
    """cnnkit serve's predictions wait until `release` is set (at most 30 s); `started` is set when one
    begins: (release, started)."""
    from cnnkit.serve import app as serve_app

    release, started = threading.Event(), threading.Event()
    real = serve_app.predict_image

    def slow(*args):
        started.set()
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(serve_app, "predict_image", slow)
    yield release, started
    release.set()
