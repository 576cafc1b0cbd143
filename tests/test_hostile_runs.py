"""Hostile inputs and faults around run folders and checkpoints, through the command line in a child process.

Each case checks what a user sees: exit code 2 (or the stated one), one line naming the file or argument,
no traceback, the child's peak memory under 1 GB, and the run folder unchanged where it should be.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import start_cnnkit
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cnnkit.checkpoint import (
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    optimizer_path,
    tensors_sha256,
)
from cnnkit.runs import run_folder_lock


def _snapshot(folder):
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def run_copy(tmp_path, tiny_run):
    """A private copy of the tiny run (3 epochs, newest + best kept), safe to damage."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def _rewrite_optimizer(path, change):
    opt = optimizer_path(path)
    with safe_open(opt, "pt") as f:
        metadata = f.metadata()
    tensors = change(load_file(opt))  # with their SHA-256, so that the checks after it are what refuses them
    save_file(tensors, opt, metadata={**metadata, "sha256": tensors_sha256(tensors)})


def test_moments_that_do_not_fit_the_parameters_are_one_line_not_a_segfault(cli, run_copy):
    # The repro: every exp_avg replaced by zeros(3); fused Adam used to write past the buffers.
    newest = list_checkpoints(run_copy)[-1]
    _rewrite_optimizer(
        newest, lambda t: {k: torch.zeros(3) if k.endswith("exp_avg") else v for k, v in t.items()}
    )
    before = _snapshot(run_copy)
    result = cli("train", "--resume", run_copy, "--epochs", 4)
    result.assert_one_line_error("optimizer.safetensors", "exp_avg", "expected F32")
    assert _snapshot(run_copy) == before


def test_a_second_writer_is_refused_naming_the_holder(cli, run_copy):
    before = _snapshot(run_copy)
    with run_folder_lock(run_copy):
        result = cli("train", "--resume", run_copy, "--epochs", 4)
        result.assert_one_line_error(str(run_copy), f"pid {os.getpid()}", "another cnnkit process")
        result = cli("train", "--dataset", "mnist-5k", "--out", run_copy, "--overwrite")
        result.assert_one_line_error(f"pid {os.getpid()}")
    assert _snapshot(run_copy) == before


def test_a_killed_writer_leaves_no_stuck_lock(tmp_path):
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from cnnkit.runs import run_folder_lock\nwith run_folder_lock({str(tmp_path)!r}):\n print('held', flush=True)\n import time; time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    assert child.stdout.readline().strip() == b"held"
    child.kill()
    child.wait()
    with run_folder_lock(tmp_path):
        pass


def test_resume_into_another_runs_folder_is_refused_without_overwrite(cli, tmp_path, run_copy, tiny_run):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    before = _snapshot(other)
    cli("train", "--resume", run_copy, "--epochs", 4, "--out", other).assert_one_line_error(
        str(other), "another run", "--overwrite"
    )
    assert _snapshot(other) == before
    result = cli("train", "--resume", run_copy, "--epochs", 4, "--out", other, "--overwrite", "--quiet")
    assert result.code == 0, result.err
    assert [p.name for p in list_checkpoints(other)][-1] == "epoch-004.safetensors"


def test_metadata_declaring_millions_of_classes_is_refused_before_allocating(cli, tmp_path, run_copy):
    path = list_checkpoints(run_copy)[-1]
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    meta = json.loads(header["__metadata__"]["cnnkit"])
    meta["architecture"]["num_classes"] = 3_000_000
    meta["class_names"] = [str(i) for i in range(400_000)]
    header["__metadata__"]["cnnkit"] = json.dumps(meta)
    new = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + length :])
    assert bad.stat().st_size > 3_000_000  # the was 4.4 MB
    cli("evaluate", bad).assert_one_line_error("bad.safetensors", "num_classes", "10,000")


def test_a_huge_checkpoint_file_is_not_read_whole(cli, tmp_path, run_copy):
    # 3 GB on disk (sparse), with a header that lies about one tensor's size: refused from the header.
    path = list_checkpoints(run_copy)[-1]
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    name = "classifier.1.weight"
    start = header[name]["data_offsets"][0]
    header[name]["data_offsets"][1] = start + 3 * 2**30
    new = json.dumps(header).encode()
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as f:
        f.write(struct.pack("<Q", len(new)) + new + data[8 + length :])
        f.truncate(3 * 2**30)
    cli("evaluate", huge).assert_one_line_error("huge.safetensors", name, max_mb=600)


def test_a_fifo_given_as_a_checkpoint_does_not_hang(cli, tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    cli("evaluate", fifo, timeout=60).assert_one_line_error("model.safetensors", "not a regular file")


def test_flipped_bits_in_a_checkpoint_are_caught(cli, run_copy):
    path = list_checkpoints(run_copy)[-1]
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x01
    path.write_bytes(bytes(data))
    cli("evaluate", run_copy).assert_one_line_error(str(path), "SHA-256")


def test_a_convnn_checkpoint_resumes_only_with_a_dataset_and_says_so(cli, tmp_path, small_npz):
    import dataclasses

    from cnnkit import ConvNN
    from cnnkit.data import load_dataset

    train = load_dataset(small_npz).train
    model = ConvNN(epochs=1, random_state=0).fit(train.images[:200], train.labels[:200])
    path = model.save(tmp_path / "m.safetensors")
    cli("train", "--resume", path, "--epochs", 2, "--out", tmp_path / "r").assert_one_line_error("--dataset")
    assert list_checkpoints(tmp_path / "r") == []
    result = cli(
        "train", "--resume", path, "--epochs", 2, "--out", tmp_path / "r", "--dataset", small_npz, "--quiet"
    )
    assert result.code == 0, result.err
    record = load_checkpoint(tmp_path / "r").record
    # Resumed, not started over: the ConvNN's epoch 1, its recipe and its standardization (of its 200
    # images, not the dataset's 640) carry on, and the named dataset is recorded for the run.
    assert record.epoch == 2 and [h["epoch"] for h in record.history] == [1, 2]
    assert record.history[0] == model.history_[0]
    assert record.config == dataclasses.replace(model.config_, epochs=2)
    assert record.standardization == model.standardization_
    assert record.dataset == small_npz


@pytest.mark.parametrize(
    ("make_out", "fragment"),
    [
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "file"),
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "run", "file/run"),
    ],
)
def test_an_out_folder_that_cannot_be_one(cli, tmp_path, small_npz, make_out, fragment):
    out = make_out(tmp_path)
    cli("train", "--dataset", small_npz, "--epochs", 1, "--out", out).assert_one_line_error(fragment)


def test_a_full_disk_is_one_line(capsys, tmp_path, small_npz, monkeypatch):
    import errno

    from cnnkit import atomic
    from cnnkit.cli import main

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    code = main(["train", "--dataset", small_npz, "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err, err
    assert "history.jsonl" in err or "safetensors" in err


def test_a_diverging_run_stops_naming_epoch_and_step_and_keeps_strict_json(cli, tmp_path, small_npz):
    result = cli("train", "--dataset", small_npz, "--epochs", 2, "--lr", "1e30", "--out", tmp_path / "run")
    lines = result.err.strip().splitlines()
    assert result.code == 1 and len(lines) == 1 and "Traceback" not in result.err, result.err
    assert "epoch 1, step" in lines[0] and "no checkpoint was written" in lines[0].lower()
    assert list_checkpoints(tmp_path / "run") == []
    history = (tmp_path / "run" / "history.jsonl").read_text()
    assert "NaN" not in history and "Infinity" not in history


@pytest.mark.slow  # a real process over seconds
def test_an_interrupted_run_says_what_is_on_disk(tmp_path, small_npz):
    proc = start_cnnkit(
        "train", "--dataset", small_npz, "--epochs", "200", "--out", str(tmp_path / "run"), text=True
    )
    while "epoch 001/200" not in proc.stdout.readline():
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    [line] = err.strip().splitlines()
    newest = list_checkpoints(tmp_path / "run")[-1]
    assert f"newest checkpoint is {newest}" in line
    load_checkpoint(newest)


def test_an_interrupt_before_the_first_epoch_says_no_checkpoint(tmp_path, small_npz):
    proc = start_cnnkit("train", "--dataset", small_npz, "--out", str(tmp_path / "run"), text=True)
    while "parameters" not in proc.stdout.readline():
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "no checkpoint was written" in err.lower(), (
        err
    )


def test_sigint_while_the_command_loads_is_never_a_traceback():
    # From the moment cnnkit's entry module runs, an interrupt exits with 130 and no traceback (the
    # first ~25 ms belong to Python's own start-up, before any of cnnkit's code).
    code = "import os, signal, cnnkit.__main__; os.kill(os.getpid(), signal.SIGINT); import torch"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and result.stderr == "", result.stderr


def _wait_until_mapped(proc, library: str, seconds=120):
    """Wait until the running child `proc` has a shared library whose path holds `library` mapped."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with open(f"/proc/{proc.pid}/maps") as maps:
                if library in maps.read():
                    return
        except OSError:  # gone already: the check below says so
            pass
        assert proc.poll() is None, f"the command ended ({proc.returncode}) before it loaded {library}"
        assert time.monotonic() < deadline, f"no {library} loaded after {seconds} s"
        time.sleep(0.001)


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_sigint_at_start_up_is_never_a_traceback(delay):
    # The interrupt lands while the command starts, `delay` seconds after NumPy's library is mapped: an
    # event, not a time since the start, which on a busy machine could still fall in Python's own
    # start-up (before cnnkit's entry module runs; nothing loads NumPy before it sets its handler).
    proc = start_cnnkit("data", "info", "mnist-5k")
    _wait_until_mapped(proc, "numpy")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, err.decode()
    if proc.returncode == 0:  # it finished before the signal came: the whole table, nothing on stderr
        assert b"mnist-5k" in out and err == b"", err.decode()
    else:  # quietly while loading, or through main's one line
        assert proc.returncode == 130 and err in (b"", b"cnnkit: interrupted\n"), (proc.returncode, err)


@pytest.mark.slow  # a real process over seconds
def test_output_into_a_closed_pipe_keeps_training(tmp_path, small_npz):
    # `cnnkit train ... | head -1`: the reader goes away after one line; the run must still finish.
    proc = start_cnnkit("train", "--dataset", small_npz, "--epochs", "2", "--out", str(tmp_path / "run"))
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "epoch-002.safetensors"


def test_stale_temp_files_of_a_killed_run_are_removed_on_resume(cli, run_copy):
    stale = [
        run_copy / ".history.jsonl.abc123.tmp",
        run_copy / "checkpoints" / ".epoch-004.safetensors.x.tmp",
    ]
    for path in stale:
        path.write_text("left by kill -9")
    result = cli("train", "--resume", run_copy, "--epochs", 4, "--quiet")
    assert result.code == 0, result.err
    assert not any(path.exists() for path in stale)


# `python -m cnnkit ARGS` that, at exit, writes the thread count torch ran with as its last stderr line.
_REPORT_TORCH_THREADS = """
import atexit, runpy, sys
atexit.register(lambda: print(f"torch threads: {sys.modules['torch'].get_num_threads()}", file=sys.stderr))
sys.argv[0] = "cnnkit"
runpy.run_module("cnnkit", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow  # a child process over seconds
def test_too_many_threads_are_capped(tmp_path, small_npz):
    from cnnkit.threads import available_cpus

    args = ["train", "--dataset", small_npz, "--epochs", "1", "--threads", "10000", "--out", tmp_path / "run"]
    result = subprocess.run(
        [sys.executable, "-c", _REPORT_TORCH_THREADS, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    cpus = available_cpus()  # the child's: the same affinity mask and cgroup as this process
    assert result.stderr.splitlines() == [
        f"cnnkit: --threads 10000 is more than the {cpus} CPUs this process may use; using {cpus}",
        f"torch threads: {cpus}",
    ], result.stderr
    assert checkpoint_path(tmp_path / "run", 1).exists()


def _write_source(tmp_path, kind, images, labels):
    """The same images as an npz:, idx: or folder: source."""
    from cnnkit.data.idx import write_idx

    if kind == "npz":
        path = tmp_path / "data.npz"
        np.savez(path, x_train=images, y_train=labels)
        return f"npz:{path}"
    if kind == "idx":
        write_idx(tmp_path / "train-images-idx3-ubyte", images)
        write_idx(tmp_path / "train-labels-idx1-ubyte", labels.astype(np.uint8))
        return f"idx:{tmp_path}"
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (tmp_path / str(label)).mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / str(label) / f"{i}.png")
    return f"folder:{tmp_path}"


@pytest.mark.parametrize("kind", ["npz", "idx", "folder"])
@pytest.mark.parametrize(
    ("side", "labels", "fragment"),
    [(12, [0, 1] * 10, "at least 13x13"), (28, [0] * 20, "1 class; training needs at least 2")],
)
def test_data_the_network_cannot_learn_from_is_one_line(cli, tmp_path, kind, side, labels, fragment):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (len(labels), side, side), dtype=np.uint8)
    (tmp_path / "data").mkdir()
    source = _write_source(tmp_path / "data", kind, images, np.array(labels))
    cli("train", "--dataset", source, "--epochs", 1, "--out", tmp_path / "run").assert_one_line_error(
        fragment
    )


def test_convnn_load_raises_only_cnnkit_errors(tmp_path):
    from cnnkit import ConvNN
    from cnnkit.errors import CheckpointError

    for name, data in [("empty", b""), ("garbage", b"\x10" + bytes(100)), ("text", b"{}" * 10)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError):
            ConvNN.load(tmp_path / name)
    with pytest.raises(CheckpointError):
        ConvNN.load(tmp_path)


# --- round three: the whole record validated, FIFOs, start-up interrupts, nested run folders ---


def _rewrite_newest(run, change):
    """Rewrite the record of `run`'s newest checkpoint: `change(meta) -> new meta`; returns the file."""
    from test_record import _rewrite_metadata

    path = list_checkpoints(run)[-1]
    _rewrite_metadata(path, change)
    return path


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: {**m, "trainer_state": {**m["trainer_state"], "best": [3, 0.9]}}, "trainer_state.best"),
        (
            lambda m: {**m, "trainer_state": {"best": {"epoch": 3, "valid_accuracy": "0.9"}}},
            "trainer_state.best.valid_accuracy",
        ),
        (
            lambda m: {**m, "trainer_state": {"early_stopping": {"best_loss": 0.3, "wait": "1"}}},
            "trainer_state.early_stopping.wait",
        ),
        (
            lambda m: {**m, "history": [*m["history"][:2], {**m["history"][2], "valid_accuracy": "0.9"}]},
            "history[2].valid_accuracy",
        ),
    ],
)
def test_a_malformed_record_is_one_line_naming_the_field_in_every_command(
    cli, tmp_path, run_copy, change, field
):
    # trainer_state.best as a list used to end summary, report and resume in an AttributeError, and a
    # string best accuracy a resume in a TypeError after it had trained an epoch.
    path = _rewrite_newest(run_copy, change)
    before = _snapshot(run_copy)
    for command in (
        ["summary", run_copy],
        ["evaluate", run_copy],
        ["report", run_copy, "--out", tmp_path / "report"],
        ["train", "--resume", run_copy, "--epochs", 4],
    ):
        cli(*command).assert_one_line_error(str(path), f"field {field} ")
    assert _snapshot(run_copy) == before and not (tmp_path / "report").exists()


@pytest.mark.slow  # a child process over seconds
def test_a_fifo_as_an_npz_dataset_is_refused_not_waited_on(cli, tmp_path, run_copy):
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    error = (f"{fifo}: not a regular file",)
    cli("data", "info", f"npz:{fifo}", timeout=60).assert_one_line_error(*error)
    cli("evaluate", run_copy, "--dataset", f"npz:{fifo}", timeout=60).assert_one_line_error(*error)
    _rewrite_newest(run_copy, lambda m: {**m, "dataset": f"npz:{fifo}"})  # the dataset the run recorded
    cli("evaluate", run_copy, timeout=60).assert_one_line_error(*error)
    cli("report", run_copy, "--out", tmp_path / "report", timeout=60).assert_one_line_error(*error)


@pytest.mark.parametrize("value", [np.inf, 1e300, np.nan])
def test_pixel_values_out_of_range_are_one_line_without_warnings(cli, tmp_path, value):
    images = np.random.default_rng(0).random((20, 28, 28))
    images[3, 4, 5] = value
    np.savez(tmp_path / "bad.npz", x_train=images, y_train=np.arange(20) % 2)
    result = cli("data", "info", f"npz:{tmp_path / 'bad.npz'}")
    result.assert_one_line_error("bad.npz", "x_train", "finite pixel values")
    assert len(result.err.splitlines()) == 1, result.err  # no RuntimeWarning before it


# A module that, while it is imported, is interrupted and (as a compiled module's import does, NumPy's)
# raises an error of its own in place of whatever the interrupt raised.
_INTERRUPTED_IMPORT = """
import os, signal, time
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(10)
except BaseException as exc:
    raise ImportError(f"could not load ({type(exc).__name__})") from None
"""


@pytest.mark.parametrize(
    ("code", "err"),
    [
        ("import cnnkit.__main__; import interrupted_import", ""),  # before main takes over
        (
            "from cnnkit.cli import learn, main; learn.run_data_info = lambda args: __import__('interrupted_import'); "
            "main(['data', 'info', 'mnist-5k'])",
            "cnnkit: interrupted\n",
        ),
    ],
)
def test_sigint_inside_an_import_is_never_a_traceback(tmp_path, code, err):
    (tmp_path / "interrupted_import.py").write_text(_INTERRUPTED_IMPORT)
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); {code}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (130, err), result.stderr


def test_an_out_inside_a_runs_checkpoints_folder_is_refused(cli, run_copy, small_npz):
    before = _snapshot(run_copy)
    for out in (run_copy / "checkpoints", run_copy / "checkpoints" / "nested"):
        for command in (["--resume", run_copy, "--epochs", 4], ["--dataset", small_npz, "--epochs", 1]):
            cli("train", *command, "--out", out).assert_one_line_error(
                f"{out}: inside {run_copy / 'checkpoints'}, the checkpoints folder of the run {run_copy}",
                "--out",
            )
    assert _snapshot(run_copy) == before


def test_a_class_name_of_a_million_characters_is_drawn_cut_short(cli, tmp_path, three_class_run):
    # Pillow refuses to draw a text of over 1,000,000 characters, and matplotlib took minutes to lay one
    # out: the figures draw the first characters and an ellipsis; report.json keeps the whole name.
    import shutil

    long = "a" * 1_000_001
    run = tmp_path / "run"
    shutil.copytree(three_class_run, run)
    record = load_checkpoint(run).record
    with np.load(record.dataset.removeprefix("npz:")) as data:
        arrays = {key: data[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    names = [long.encode(), *(name.encode() for name in record.class_names[1:])]
    np.savez(tmp_path / "long.npz", **arrays, class_names=np.array(names))
    _rewrite_newest(run, lambda m: {**m, "class_names": [long, *m["class_names"][1:]]})
    result = cli("report", run, "--dataset", f"npz:{tmp_path / 'long.npz'}", "--out", tmp_path / "report")
    assert result.code == 0 and "Traceback" not in result.err, result.err[-2000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["class_names"][0] == long


@pytest.mark.slow  # two ranks over seconds
def test_ctrl_c_on_a_nproc_per_node_job_is_one_line_saying_what_is_on_disk(tmp_path, small_npz):
    # Ctrl-C reaches the launcher and every rank: each rank used to print its own line, and the
    # launcher a third (exit 2); the launcher now speaks for the job, in rank 0's words.
    import contextlib

    run = tmp_path / "run"
    train = ["train", "--dataset", small_npz, "--epochs", 100, "--out", run, "--quiet", "--nproc-per-node", 2]
    job = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", *map(str, train)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's job
    )
    try:
        deadline = time.monotonic() + 180
        while not checkpoint_path(run, 2).exists():
            assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGINT)
        err = job.communicate(timeout=60)[1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    [line] = err.strip().splitlines()
    assert job.returncode == 130, err
    assert line.startswith(
        f"cnnkit: error: interrupted. The newest checkpoint is {run / 'checkpoints'}/epoch-"
    ), err
