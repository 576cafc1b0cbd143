"""Training on several processes (torchrun + DDP, gloo on 127.0.0.1): equal to one process, one writer,
resumable in any world size, and faults that end the job with one line instead of a hang.

The jobs run in child processes: `python -m torch.distributed.run` (torchrun) or `cnnkit train
--nproc-per-node 2`, and for the fault without torchrun's agent, two ranks started by hand with the
env:// variables torchrun would set.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cnnkit
from distributed_rank import VALID_SIZE, train
from safetensors.torch import load_file

from cnnkit import distributed
from cnnkit.checkpoint import list_checkpoints, load_checkpoint
from cnnkit.errors import CnnkitError
from cnnkit.training import epoch_seed

WORKER = Path(__file__).parent / "distributed_rank.py"
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
# 2 ranks against 1 process after 27 Adam steps at lr 1e-3 (tiny network, fp32, no dropout): the largest
# weight difference measured was 1.0e-7 (the weights' own scale is about 0.2-0.9).
EQUAL_WITHIN = 1e-6
SHORT_TIMEOUT_S = 10  # $CNNKIT_DIST_TIMEOUT for the fault tests


def _free_port() -> int:
    """A port free now, for torchrun's static rendezvous only, which needs its number up front (its
    ranks are told the --master-port given, not the one bound). Elsewhere the process that listens
    binds port 0 and `_listening_port` reads the port the system gave it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_port(proc: subprocess.Popen, seconds=180) -> int:
    """The TCP port that the child `proc` listens on, once it does (it bound port 0: the system picked
    a free one). Read from /proc: the listening sockets of this network namespace that `proc` holds."""
    deadline = time.monotonic() + seconds
    while True:
        inodes = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[len("socket:[") : -1])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for row in f.read().splitlines()[1:]:
                    fields = row.split()
                    if fields[3] == "0A" and fields[9] in inodes:  # state 0A: LISTEN
                        return int(fields[1].rsplit(":", 1)[1], 16)
        assert proc.poll() is None, f"the process ended ({proc.returncode}) before it listened"
        assert time.monotonic() < deadline, f"no listening socket after {seconds} s"
        time.sleep(0.05)


def _command(module: str, *args) -> list[str]:
    """`python -m MODULE ARGS` in this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


def _torchrun(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command("torch.distributed.run", *args),
        capture_output=True,
        text=True,
        env={**os.environ, **LOOPBACK},
        timeout=timeout,
    )


def _wait_for(path: Path, proc: subprocess.Popen, seconds=180):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the job ended ({proc.returncode}) before {path.name} was written"
        assert time.monotonic() < deadline, f"no {path.name} after {seconds} s"
        time.sleep(0.1)


def _ranks_of(launcher_pid: int) -> dict:
    """rank -> pid of the processes torchrun (running as `launcher_pid`) started."""
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    ranks = {}
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def _kill_job(job: subprocess.Popen):
    """Kill a job started with start_new_session=True: the launcher and every process it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def _epochs(run) -> list[int]:
    return [json.loads(line)["epoch"] for line in (Path(run) / "history.jsonl").read_text().splitlines()]


# --- the pieces, in one process ---


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 5, 63, 64])
def test_the_ranks_shards_tile_the_global_batch_in_order(world, size):
    batch = np.arange(100, 100 + size)
    shards = [distributed.shard(batch, rank, world) for rank in range(world)]
    assert np.array_equal(np.concatenate(shards), batch)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    if size % world == 0:
        assert {len(s) for s in shards} == {size // world}


def test_a_batch_size_that_does_not_divide_among_the_ranks_is_refused():
    distributed.check_batch_size(64, 4)
    with pytest.raises(CnnkitError, match=r"--batch-size 63 does not divide among 2 processes.*62 or 64"):
        distributed.check_batch_size(63, 2)


def test_rank_0_draws_the_single_process_dropout_and_each_other_rank_its_own():
    single = int(np.random.SeedSequence([123, 4, 0xD80]).generate_state(1, np.uint64)[0] >> 1)
    assert epoch_seed(123, 4) == epoch_seed(123, 4, rank=0) == single
    assert len({epoch_seed(123, 4, rank) for rank in range(8)}) == 8


def test_without_torchrun_a_process_is_rank_0_of_1_with_all_its_cpus(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.local_world_size()) == (0, 1, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.local_world_size() == 2  # its share of the machine's CPUs: half


def test_the_timeout_comes_from_the_environment_and_is_checked(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_s() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed.timeout_s() == 2.5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "-1")
    with pytest.raises(CnnkitError, match="CNNKIT_DIST_TIMEOUT"):
        distributed.timeout_s()


def test_nproc_per_node_refuses_a_batch_that_does_not_divide_before_starting_anything(
    cli, small_npz, tmp_path
):
    result = cli(
        "train", "--dataset", small_npz, "--batch-size", 63, "--nproc-per-node", 2, "--out", tmp_path
    )
    result.assert_one_line_error("--batch-size 63 does not divide among 2 processes", "62 or 64")
    assert not list_checkpoints(tmp_path)


# --- jobs of two ranks ---


@pytest.mark.slow
def test_two_ranks_learn_what_one_process_learns_and_agree_bit_for_bit(tmp_path, small_npz, one_torch_thread):
    job = _torchrun(
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",  # torchrun binds a free port and tells its ranks
        "--rdzv-id=two-ranks",
        WORKER,
        small_npz,
        tmp_path / "ddp" / "run",
        3,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    rank0 = load_file(tmp_path / "ddp" / "rank-0.safetensors")
    rank1 = load_file(tmp_path / "ddp" / "rank-1.safetensors")
    written = load_file(list_checkpoints(tmp_path / "ddp" / "run")[-1])
    train(small_npz, tmp_path / "one" / "run", 3)  # the same recipe in this process, one thread
    one = load_file(list_checkpoints(tmp_path / "one" / "run")[-1])
    assert rank0.keys() == rank1.keys() == one.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], written[name]), name
        assert torch.allclose(rank0[name], one[name], rtol=0, atol=EQUAL_WITHIN), (
            name,
            float((rank0[name] - one[name]).abs().max()),
        )
    history = [
        json.loads(line) for line in (tmp_path / "ddp" / "run" / "history.jsonl").read_text().splitlines()
    ]
    alone = [
        json.loads(line) for line in (tmp_path / "one" / "run" / "history.jsonl").read_text().splitlines()
    ]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for ours, theirs in zip(history, alone, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)
        assert ours["valid_loss"] == pytest.approx(theirs["valid_loss"], rel=1e-6)
    record = load_checkpoint(tmp_path / "ddp" / "run").record
    assert (
        record.valid_size == VALID_SIZE
        and record.config == load_checkpoint(tmp_path / "one" / "run").record.config
    )


@pytest.mark.slow
def test_a_distributed_run_resumes_in_one_process_and_in_two(cli, tmp_path, small_npz):
    run = tmp_path / "run"
    first = cli("train", "--dataset", small_npz, "--epochs", 1, "--out", run, "--nproc-per-node", 2)
    assert first.code == 0, first.err[-3000:]
    assert "2 processes, each training on 32 images of every batch" in first.out
    assert first.out.count("epoch 1/1") == 1 and first.out.count("checkpoint: ") == 1  # rank 0 alone speaks
    assert first.err == ""
    assert load_checkpoint(run).record.config.batch_size == 64  # the global batch, as one process records it
    second = cli("train", "--resume", run, "--epochs", 2, "--quiet")  # one process
    assert second.code == 0, second.err[-3000:]
    third = cli("train", "--resume", run, "--epochs", 3, "--nproc-per-node", 2, "--quiet")
    assert third.code == 0, third.err[-3000:]
    assert _epochs(run) == [1, 2, 3] and load_checkpoint(run).epoch == 3
    cli("train", "--resume", run, "--epochs", 4, "--nproc-per-node", 3).assert_one_line_error(
        "--batch-size 64 does not divide among 3 processes"
    )


@pytest.mark.slow
def test_two_nodes_on_loopback_train_one_run(tmp_path, small_npz):
    run, port, nodes = tmp_path / "run", 0, []
    for node in (0, 1):
        nodes.append(
            subprocess.Popen(
                _command(
                    "torch.distributed.run",
                    "--nnodes=2",
                    f"--node-rank={node}",
                    "--nproc-per-node=1",
                    "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=127.0.0.1:{port}",
                    "--rdzv-id=loopback",
                    "-m",
                    "cnnkit",
                    "train",
                    "--dataset",
                    small_npz,
                    "--epochs",
                    2,
                    "--out",
                    run,
                    "--quiet",
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **LOOPBACK},
            )
        )
        if node == 0:
            # Node 0's torchrun hosts the rendezvous (and so outlives the other) on a port the system
            # picks; node 1 starts once it listens there, and joins it.
            port = _listening_port(nodes[0])
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum(out.count("checkpoint: ") for out, _ in outputs) == 1  # one writer, on either node
    assert _epochs(run) == [1, 2] and load_checkpoint(run).epoch == 2


# --- faults ---


# `python -m cnnkit ARGS` once a line on stdin has said MASTER_PORT: torch is loaded meanwhile, so that
# the rank then joins about as soon as one started with the others would.
_AWAIT_MASTER_PORT = """
import os, runpy, sys
import torch
os.environ["MASTER_PORT"] = sys.stdin.readline().strip()
sys.argv[0] = "cnnkit"
runpy.run_module("cnnkit", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_rank_that_dies_or_hangs_ends_the_others_with_one_line_within_the_timeout(
    tmp_path, small_npz, fault
):
    # No torchrun agent here (it would stop the others itself): on another machine only the process
    # group tells a rank that its peer is gone, at once for a closed connection, or by the timeout.
    # Rank 0 hosts the store on a port the system picks (MASTER_PORT=0); rank 1 starts beside it and,
    # once rank 0 listens, is told the port on its stdin (see _AWAIT_MASTER_PORT).
    run, ranks = tmp_path / "run", []
    train = ["train", "--dataset", small_npz, "--epochs", 100, "--out", run, "--quiet"]
    for rank in (0, 1):
        env = {
            **os.environ,
            **LOOPBACK,
            **dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, MASTER_PORT=0),
            "MASTER_ADDR": "127.0.0.1",
            distributed.TIMEOUT_ENV: str(SHORT_TIMEOUT_S),
        }
        command = (
            _command("cnnkit", *train) if rank == 0 else [sys.executable, "-c", _AWAIT_MASTER_PORT, *train]
        )
        ranks.append(
            subprocess.Popen(
                [str(a) for a in command],
                stdin=subprocess.PIPE if rank else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env={k: str(v) for k, v in env.items()},
            )
        )
    try:
        ranks[1].stdin.write(f"{_listening_port(ranks[0])}\n")
        ranks[1].stdin.close()
        _wait_for(run / "checkpoints" / "epoch-002.safetensors", ranks[0])
        os.kill(ranks[1].pid, getattr(signal, fault))
        start = time.monotonic()
        err = ranks[0].communicate(timeout=SHORT_TIMEOUT_S + 30)[1]
        took = time.monotonic() - start
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    lines = err.strip().splitlines()
    assert ranks[0].returncode == 2 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("cnnkit: error: rank 0 of 2: lost contact with another rank"), lines[0]
    assert f"The newest checkpoint is {run / 'checkpoints'}/epoch-" in lines[0]
    assert f"within {SHORT_TIMEOUT_S} s" in lines[0]
    assert took < SHORT_TIMEOUT_S + 15, took
    if fault == "SIGSTOP":  # a hung peer is waited for: the timeout, not sooner
        assert took > SHORT_TIMEOUT_S - 5 and "time" in lines[0].lower(), (took, lines[0])
    assert load_checkpoint(run).epoch >= 2  # the finished epochs are on disk


@pytest.mark.slow
def test_a_killed_rank_ends_a_nproc_per_node_job_with_a_line_naming_it(tmp_path, small_npz):
    run = tmp_path / "run"
    job = subprocess.Popen(
        _command(
            "cnnkit",
            "train",
            "--dataset",
            small_npz,
            "--epochs",
            100,
            "--out",
            run,
            "--quiet",
            "--nproc-per-node",
            2,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _wait_for(run / "checkpoints" / "epoch-002.safetensors", job)
        victim = _ranks_of(job.pid)[1]
        os.kill(victim, signal.SIGKILL)
        err = job.communicate(timeout=60)[1]
    finally:
        _kill_job(job)
    # One line for the job: the launcher's, with what rank 0 last had on disk (rank 0, stopped by torchrun
    # or by the lost connection, leaves its own line to the launcher instead of printing it).
    [line] = err.strip().splitlines()
    assert job.returncode == 1, err[-3000:]
    # torchrun stops rank 0 with SIGTERM once rank 1 is gone; when it saw that first, the line names both
    assert line.startswith("cnnkit: error: killed: ") and "; the job stopped. " in line, line
    assert f"rank 1 (pid {victim}) by SIGKILL" in line.split("; the job stopped. ")[0], line
    newest = Path(line.split("The newest checkpoint is ")[-1].removesuffix(" (the last finished epoch)"))
    assert newest.parent == run / "checkpoints" and newest.is_file(), line


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_restarts_resume_from_the_newest_checkpoint_exactly(tmp_path, small_npz, rendezvous):
    # Within a world size the run is bit-exact: a job killed and restarted by torchrun --max-restarts
    # ends with the weights of one that never stopped. The static rendezvous keeps one store for every
    # attempt (a restart once met the killed attempt's keys there and hung), c10d makes a new one.
    args = ["--dataset", small_npz, "--epochs", 4, "--dropout", 0.3]
    straight = run_cnnkit("train", *args, "--out", tmp_path / "straight", "--quiet", "--nproc-per-node", 2)
    assert straight.code == 0, straight.err[-3000:]
    run = tmp_path / "restarted"
    if rendezvous == "static":
        where = ["--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    else:  # torchrun binds a free port and tells its ranks
        where = ["--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--rdzv-id=restarts"]
    launch = ["torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1", *where, "-m", "cnnkit"]
    job = subprocess.Popen(
        _command(*launch, "train", *args, "--out", run),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **LOOPBACK},
        start_new_session=True,  # so that a failed test stops torchrun's ranks too
    )
    try:
        _wait_for(run / "checkpoints" / "epoch-002.safetensors", job)
        os.kill(_ranks_of(job.pid)[1], signal.SIGKILL)
        out, err = job.communicate(timeout=120)
    finally:
        _kill_job(job)
    assert job.returncode == 0, err[-3000:]
    assert "restart 1: continuing" in out, out
    assert _epochs(run) == [1, 2, 3, 4]
    a, b = load_file(list_checkpoints(tmp_path / "straight")[-1]), load_file(list_checkpoints(run)[-1])
    assert all(torch.equal(a[name], b[name]) for name in a)
