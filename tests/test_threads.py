"""Thread count and OpenMP wait policy: the CPUs a process may use, the --threads cap, env set only when absent."""

import json
import os
import subprocess
import sys

import pytest

from cnnkit import threads
from cnnkit.threads import WAIT_ENV, available_cpus, cgroup_cpu_limit, configure_threads


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


def _cgroup(tmp_path, files: dict, own="0::/\n"):
    """A fake cgroup tree under tmp_path/cg, and a fake /proc/self/cgroup naming this process's group."""
    root = tmp_path / "cg"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(own)
    return str(root), str(proc)


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", 4),
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),
        ("50000 100000\n", 1),
        ("800000 100000\n", 4),
    ],
)
def test_cgroup_v2_quota_caps_the_affinity_mask(tmp_path, four_cpus, cpu_max, expected):
    root, proc = _cgroup(tmp_path, {"cpu.max": cpu_max})
    assert available_cpus(root, proc) == expected


def test_no_cgroup_files_means_the_affinity_mask(tmp_path, four_cpus):
    root, proc = _cgroup(tmp_path, {})
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(root, proc) == 4


@pytest.mark.parametrize(("quota", "expected"), [("-1", 4), ("100000", 1), ("300000", 3)])
def test_cgroup_v1_cfs_quota_caps_the_affinity_mask(tmp_path, four_cpus, quota, expected):
    root, proc = _cgroup(
        tmp_path,
        {"cpu,cpuacct/cpu.cfs_quota_us": quota, "cpu,cpuacct/cpu.cfs_period_us": "100000"},
        own="4:cpu,cpuacct:/\n0::/\n",
    )
    assert available_cpus(root, proc) == expected


def test_the_smallest_quota_of_the_own_cgroup_and_its_ancestors_wins(tmp_path, four_cpus):
    root, proc = _cgroup(
        tmp_path,
        {"cpu.max": "max 100000", "job/cpu.max": "100000 100000", "job/step/cpu.max": "300000 100000"},
        own="0::/job/step\n",
    )
    assert cgroup_cpu_limit(root, proc) == 1.0
    assert available_cpus(root, proc) == 1


def test_available_cpus_on_this_machine_is_at_least_one_and_at_most_the_affinity_mask():
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_threads_above_the_available_cpus_are_capped_with_one_log_line(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # configure_threads may set WAIT_ENV
    lines = []
    assert configure_threads(8, log=lines.append, cpus=2) == 2
    assert len(lines) == 1 and "8" in lines[0] and "2" in lines[0]


def test_threads_within_the_available_cpus_are_kept_silently(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    lines = []
    assert configure_threads(1, log=lines.append, cpus=2) == 1
    assert configure_threads(2, log=lines.append, cpus=2) == 2
    assert [line for line in lines if "--threads" in line] == []


def test_the_default_is_every_available_cpu(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.setattr(threads, "available_cpus", lambda: 3)
    assert configure_threads() == 3


def _environment_after_configure(extra_env: dict, busy: int = 2) -> dict:
    """Call configure_threads in a fresh process (as the CLI does, before torch) and read back its env."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(extra_env)
    code = (
        "import json, os, sys\n"
        "from cnnkit.threads import configure_threads\n"
        f"configure_threads(cpus=2, busy={busy})\n"
        "print(json.dumps({'torch_loaded': 'torch' in sys.modules,"
        " 'OMP_WAIT_POLICY': os.environ.get('OMP_WAIT_POLICY'),"
        " 'GOMP_SPINCOUNT': os.environ.get('GOMP_SPINCOUNT')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_beside_busy_processes_the_short_spin_is_set_before_torch_loads():
    seen = _environment_after_configure({}, busy=2)
    assert seen["torch_loaded"] is False
    assert seen["OMP_WAIT_POLICY"] is None
    assert seen["GOMP_SPINCOUNT"] == WAIT_ENV["GOMP_SPINCOUNT"]


def test_on_an_idle_machine_libgomps_default_spin_is_kept():
    seen = _environment_after_configure({}, busy=0)
    assert seen["GOMP_SPINCOUNT"] is None and seen["OMP_WAIT_POLICY"] is None


def test_busy_neighbours_reads_the_runnable_count_less_this_process(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 3\nprocs_blocked 0\n")
    assert threads.busy_neighbours(samples=3, interval=0, proc_stat=str(stat)) == 2
    stat.write_text("procs_running 1\n")
    assert threads.busy_neighbours(samples=1, proc_stat=str(stat)) == 0
    assert threads.busy_neighbours(samples=1, proc_stat=str(tmp_path / "missing")) == 0


def test_a_users_spin_count_is_kept():
    assert _environment_after_configure({"GOMP_SPINCOUNT": "123"})["GOMP_SPINCOUNT"] == "123"


@pytest.mark.parametrize("policy", ["PASSIVE", "ACTIVE"])
def test_a_users_wait_policy_is_kept_and_not_overridden_by_a_spin_count(policy):
    # libgomp lets GOMP_SPINCOUNT override OMP_WAIT_POLICY, so setting it here would undo the user's choice.
    seen = _environment_after_configure({"OMP_WAIT_POLICY": policy})
    assert seen["OMP_WAIT_POLICY"] == policy
    assert seen["GOMP_SPINCOUNT"] is None
