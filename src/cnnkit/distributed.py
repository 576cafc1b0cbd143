"""Training on several processes or machines with PyTorch's own engine: torch.distributed and DDP, under torchrun.

torchrun starts one process per rank and tells each who it is in environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). `cnnkit train` then joins the
job with `process_group` (gloo on the CPU, nccl on GPUs), the training loop wraps the network in
DistributedDataParallel (which averages each step's gradients across ranks) and gives each rank its
`shard` of every mini-batch, and only rank 0 validates and writes (checkpoints, history, log lines).
Without torchrun nothing here happens: one process, rank 0 of a world of 1.

Reading the environment needs no torch (the command line sets the thread count before torch loads);
the rest imports torch when called.
"""

import contextlib
import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

from cnnkit.errors import ArgumentError, CnnkitError, one_line, positive_number_from_env

# How long a rank waits for the others (to join, or in a collective) before it gives up. Only rank 0
# validates and writes a checkpoint between two collectives, so this must cover those.
TIMEOUT_ENV = "CNNKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 120
# The folder where the ranks of `--nproc-per-node` (launch_here) leave their reports for the launcher,
# which speaks for the job in one line: each rank's last line and exit code, and what rank 0 has on disk.
REPORTS_ENV = "CNNKIT_RANK_REPORTS"


class PeerLost(CnnkitError):
    """Another rank stopped answering (its process died, or its machine did): this one stops too."""


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or any launcher setting its env:// variables) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_count(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default


def local_world_size() -> int:
    """How many ranks torchrun started on this machine (1 without torchrun): they share its CPUs."""
    return max(_env_count("LOCAL_WORLD_SIZE", 1), 1) if launched_by_torchrun() else 1


def restart_count() -> int:
    """How many times torchrun (`--max-restarts`) has restarted this job's ranks; 0 the first time."""
    return _env_count("TORCHELASTIC_RESTART_COUNT", 0)


def timeout_s() -> float:
    """The process-group timeout in seconds: $CNNKIT_DIST_TIMEOUT, else DEFAULT_TIMEOUT_S."""
    value = positive_number_from_env(TIMEOUT_ENV, "seconds")
    return DEFAULT_TIMEOUT_S if value is None else value


def rank() -> int:
    """This process's global rank: 0 for the one that writes, and outside a distributed run."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """How many ranks train together: 1 outside a distributed run."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0, the one rank that validates, logs and writes the run folder."""
    return rank() == 0


def check_batch_size(batch_size: int, world: int):
    """The global batch is split equally among the ranks: refuse one that does not divide."""
    if batch_size % world:
        lower, higher = batch_size // world * world, (batch_size // world + 1) * world
        hint = f"{lower} or {higher}" if lower else f"{higher}"
        raise ArgumentError(
            f"--batch-size {batch_size} does not divide among {world} processes (the batch is the global "
            f"one, split equally); use a multiple of {world}, e.g. {hint}"
        )


def shard(batch, rank: int, world: int):
    """Rank `rank`'s slice of a global mini-batch (an index array): equal consecutive slices, the
    first ranks one image more when a short last batch does not divide (possibly none at all)."""
    if world == 1:
        return batch
    base, extra = divmod(len(batch), world)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (rank < extra)]


@contextlib.contextmanager
def process_group(device):
    """Join the torchrun job this process belongs to, if any; yields the device to train on.

    Backend gloo on the CPU, nccl on CUDA (each rank on GPU LOCAL_RANK). Every collective waits at most
    `timeout_s()`: a rank that dies or hangs makes the others stop with a one-line PeerLost, never
    hang. On the way out, whatever still holds the DDP wrapper or the optimizer is dropped and
    collected before the process group is destroyed: with gloo, a DDP wrapper outliving its process
    group aborted processes at exit (SIGABRT) in 4 of 6 runs.
    """
    if not launched_by_torchrun():
        yield device
        return
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        local, gpus = _env_count("LOCAL_RANK", 0), torch.cuda.device_count()
        if local >= gpus:
            raise ArgumentError(
                f"rank {os.environ['RANK']} is local rank {local}, but this machine has {gpus} GPU(s): one "
                f"rank per GPU, so start at most {gpus} here (or train on the CPU with --device cpu)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    timeout = timeout_s()
    try:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout),
            device_id=device if device.type == "cuda" else None,
            **_attempt_store(timeout),
        )
    except (dist.DistError, RuntimeError, ValueError) as exc:
        raise PeerLost(
            f"rank {os.environ['RANK']}: could not join the other ranks at {where} within {timeout:g} s "
            f"({one_line(exc)})"
        ) from None
    try:
        yield device
    except BaseException as exc:
        # This rank is stopping and its error says why: the SIGTERM torchrun sends the ranks left when
        # one failed must not replace that error (as a KeyboardInterrupt) while the group is taken down.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        # The failed run's frames hold the DDP wrapper and the optimizer; let them go before the group.
        traceback.clear_frames(exc.__traceback__)
        lost = peer_lost(exc)
        if lost is not None:
            raise lost from None
        raise
    finally:
        gc.collect()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _attempt_store(timeout: float) -> dict:
    """init_process_group's store, rank and world size when the ranks meet in torchrun's own store:
    that store under a prefix no earlier attempt of this job used; else {} (the env:// default).

    torchrun's static rendezvous (--master-addr/--master-port, or none: one machine) keeps one store
    for all of a job's attempts, and torch (2.13 here) no longer prefixes the keys with the
    attempt. A job restarted by --max-restarts then found the killed attempt's addresses in it: its
    ranks failed to connect, or waited in init_process_group past any timeout. Each rank counts its
    own joins in the store: with a fresh store (the c10d rendezvous makes one each round) every rank
    counts 1, and in a kept store every rank of attempt k counts k + 1. (TORCHELASTIC_RESTART_COUNT
    is not used: each machine's torchrun keeps its own, and under c10d they can differ.)
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    import torch.distributed as dist

    me, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timedelta(seconds=timeout),
    )
    joins = store.add(f"cnnkit/joins/rank-{me}", 1)
    return {"store": dist.PrefixStore(f"cnnkit/join-{joins}", store), "rank": me, "world_size": world}


# What gloo's RuntimeErrors say when a peer is gone: a closed or reset connection, or its timeout
# (which it words as "Timed out ..." or, seen in CI, "Application timeout caused pair closure").
_GLOO_LOST = ("gloo", "pair closure", "timed out", "timeout", "connection reset", "connection closed")


def peer_lost(exc: BaseException, on_disk="The newest checkpoint is the last finished epoch"):
    """A one-line PeerLost for `exc` when it is the error of a collective whose peer is gone (gloo
    raises RuntimeError from the backward pass, for a closed connection or its timeout; nccl and the
    store raise DistError), saying `on_disk`; else None."""
    import torch.distributed as dist

    lost = isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(words in str(exc).lower() for words in _GLOO_LOST)
    )
    if not lost or not dist.is_initialized():
        return None
    return PeerLost(
        f"rank {dist.get_rank()} of {dist.get_world_size()}: lost contact with another rank, which died or "
        f"did not answer within {timeout_s():g} s ({_cause(exc)}). {on_disk}"
    )


def _cause(exc: BaseException) -> str:
    """The first sentence of a gloo or nccl error, without its source-file prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", one_line(exc, 1000))
    return text.split(". ")[0].rstrip(".")[:160]


def wrap(model):
    """`model` in DistributedDataParallel in a distributed run (each step's gradients averaged across
    ranks, the weights broadcast from rank 0 at the start), else `model` itself. On CUDA its batch norm
    layers become SyncBatchNorm (statistics over the global batch); see `batch_norm_note`."""
    if world_size() == 1:
        return model
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def batch_norm_note(model, device) -> str | None:
    """How batch norm works across the ranks of a distributed run (None: one process, or no batch norm).

    PyTorch's SyncBatchNorm runs on GPUs only: on CPUs each rank normalizes by the statistics of its own
    share of the global batch, and DDP gives every rank rank 0's running statistics at each step, so the
    checkpoint holds one set."""
    from torch import nn

    if world_size() == 1 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    if str(device).startswith("cuda"):
        return "batch norm: synchronized across ranks (SyncBatchNorm: statistics of the global batch)"
    return (
        f"batch norm: each of the {world_size()} ranks normalizes by its own share of the batch "
        "(PyTorch's SyncBatchNorm needs GPUs); the running statistics are rank 0's"
    )


def sum_over_ranks(tensor):
    """`tensor` summed over every rank (in place; returned)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def min_over_ranks(tensor):
    """`tensor`'s element-wise minimum over every rank (in place; returned)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def rank_zero_says(flag: bool, device) -> bool:
    """Rank 0's `flag`, on every rank (the others wait here while rank 0 validates and writes)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


# --- `cnnkit train --nproc-per-node N`: torchrun's own launcher, on this machine ---


def launch_here(nproc: int, command_line: list[str]) -> int:
    """Run `python -m cnnkit COMMAND_LINE` as `nproc` ranks on this machine with torch.distributed.run
    (torchrun), rendezvous on 127.0.0.1 at a free port; returns the exit code of the job.

    Each rank repeats `command_line` and sees torchrun's variables, so it trains instead of launching.
    A failed rank ends the job. The launcher speaks for the job in one line: a rank killed by a signal
    (which cannot say why) named with what rank 0 last had on disk, else the first error line of a
    rank (or rank 0's interrupt), which the ranks leave in their reports instead of printing (see
    report_to_launcher). torchrun's own log lines are left out.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from cnnkit.threads import available_cpus

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this machine's loopback
    os.environ.setdefault("OMP_NUM_THREADS", str(max(available_cpus() // nproc, 1)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = torchrun.parse_args(
        [
            "--nnodes=1",
            f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "--module",
            "cnnkit",
            *command_line,
        ]
    )
    reports = tempfile.mkdtemp(prefix="cnnkit-ranks-")
    os.environ[REPORTS_ENV] = reports
    failures, interrupted = {}, False
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        failures = exc.failures
    except (SignalException, KeyboardInterrupt):  # Ctrl-C or SIGTERM: torchrun stopped the ranks
        interrupted = True
    except Exception as exc:  # torchrun itself failed: a rendezvous error, no free port, ...
        raise ArgumentError(f"torchrun could not run the {nproc} processes: {one_line(exc)}") from None
    finally:
        del os.environ[REPORTS_ENV]
        said = _read_reports(reports)
        shutil.rmtree(reports, ignore_errors=True)
    killed = sorted((r, f) for r, f in failures.items() if f.exitcode < 0)
    last_lines = {r: report for r, report in said.items() if "line" in report}
    if killed:
        names = ", ".join(f"rank {r} (pid {f.pid}) by {f.signal_name()}" for r, f in killed)
        on_disk = said.get(0, {}).get("on_disk", "The newest checkpoint is the last finished epoch")
        line, code = f"cnnkit: error: killed: {names}; the job stopped. {on_disk}", 1
    elif last_lines:
        # The first error said (the others' followed from it: a lost peer, torchrun's stop), else rank 0's
        # interrupt (Ctrl-C reaches every rank).
        errors = [r for r, report in last_lines.items() if report.get("code") != 130]
        first = min(errors, key=lambda r: last_lines[r].get("time", 0)) if errors else min(last_lines)
        line, code = last_lines[first]["line"], last_lines[first].get("code", 1)
    elif interrupted:
        line, code = "cnnkit: interrupted", 130
    else:  # done, or a rank that failed without a line has printed its traceback itself
        return min(failures.items())[1].exitcode if failures else 0
    print(line, file=sys.stderr)
    return code


def report_to_launcher(**fields) -> bool:
    """In a rank of `--nproc-per-node`, add `fields` to its report for the launcher (see launch_here):
    `line` and `code` (its last line and exit code, which it then does not print), `on_disk` (rank 0:
    which checkpoint is on disk), each report stamped with the `time` of its last change. False,
    writing nothing, in any other process."""
    folder = os.environ.get(REPORTS_ENV)
    if not folder or not launched_by_torchrun():
        return False
    path = Path(folder) / f"rank-{os.environ['RANK']}.json"
    try:
        report = json.loads(path.read_text()) if path.exists() else {}
        with open(f"{path}.tmp", "w") as f:
            json.dump({**report, **fields, "time": time.time()}, f)
        os.replace(f"{path}.tmp", path)  # whole, even when this rank is killed while writing it
    except (OSError, ValueError):
        return False
    return True


def _read_reports(folder) -> dict:
    """rank -> the report it left in `folder` (see report_to_launcher)."""
    reports = {}
    for path in Path(folder).glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError):
            reports[int(path.stem.removeprefix("rank-"))] = json.loads(path.read_text())
    return reports
