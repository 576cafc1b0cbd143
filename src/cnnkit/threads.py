"""How many CPU threads to train with, and how they wait: decided before torch is imported.

PyTorch's pip wheel runs its CPU kernels on GNU OpenMP (libgomp). Between two parallel regions a
libgomp worker spins for GOMP_SPINCOUNT iterations (300,000 by default, milliseconds) before it sleeps.
When another process is busy on the same cores, a spinning thread burns the time slice that the thread
it waits for needs, and two threads ran 10-20x slower than one; never spinning (OMP_WAIT_POLICY=PASSIVE,
GOMP_SPINCOUNT=0) avoids that but costs about a third of the idle speed, since every parallel region
then waits for a wake-up. A short spin (WAIT_ENV: 1,000 iterations, tens of microseconds) then sleep keeps two threads from
collapsing beside a busy neighbour, but measured about a quarter below the default spin on an idle
machine. So `configure_threads` looks at the machine when the command starts: with other processes
running on the CPUs it sets the short spin, otherwise it leaves libgomp's default (benchmarks/
bench_threads.py measures both). The wait policy changes only how threads wait, never the arithmetic,
and the thread count does not depend on how busy the machine is: results stay bit-reproducible for a
given count. libgomp reads the policy only when it is loaded, so this must run before `import torch`.
"""

import os
import time

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"

# Set before torch loads when other processes are busy, and only where the user has set neither.
WAIT_ENV = {"GOMP_SPINCOUNT": "1000"}
PROC_STAT = "/proc/stat"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpus(quota: str | None, period: str | None) -> float | None:
    """quota / period in CPUs; None for no limit ("max", -1) or an unreadable file."""
    try:
        cpus = int(quota) / int(period)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return cpus if cpus > 0 else None


def _cgroup_dirs(root: str, proc_self_cgroup: str, controller: str | None) -> list[str]:
    """This process's cgroup folder and its ancestors up to `root` (or just `root` when unknown).

    `controller` None means the cgroup v2 (unified) line "0::/path"; else the v1 line naming it.
    """
    relative = None
    for line in (_read(proc_self_cgroup) or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if (controller is None and hierarchy == "0" and controllers == "") or (
            controller is not None and controller in controllers.split(",")
        ):
            relative = path
            break
    dirs = [root]
    parts = [p for p in (relative or "").split("/") if p]
    for i in range(1, len(parts) + 1):
        dirs.append(os.path.join(root, *parts[:i]))
    return dirs[::-1]


def cgroup_cpu_limit(root: str = CGROUP_ROOT, proc_self_cgroup: str = PROC_SELF_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (quota / period), or None when there is none.

    Reads cgroup v2's cpu.max ("max 100000" or "200000 100000") and cgroup v1's cpu.cfs_quota_us /
    cpu.cfs_period_us (quota -1 = none), in this process's cgroup and its ancestors; the smallest wins.
    """
    limits = []
    for folder in _cgroup_dirs(root, proc_self_cgroup, None):
        fields = (_read(os.path.join(folder, "cpu.max")) or "").split()
        if len(fields) == 2:
            limits.append(_cpus(fields[0], fields[1]))
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for folder in _cgroup_dirs(os.path.join(root, mount), proc_self_cgroup, "cpu"):
            quota = _read(os.path.join(folder, "cpu.cfs_quota_us"))
            period = _read(os.path.join(folder, "cpu.cfs_period_us"))
            limits.append(_cpus(quota, period))
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def available_cpus(root: str = CGROUP_ROOT, proc_self_cgroup: str = PROC_SELF_CGROUP) -> int:
    """The CPUs this process may use: its affinity mask, capped by the cgroup CPU quota (rounded up
    for a fraction, so 1.5 CPUs gives 2), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_self_cgroup)
    if limit is not None:
        cpus = min(cpus, -int(-limit // 1))
    return max(cpus, 1)


def busy_neighbours(samples: int = 10, interval: float = 0.005, proc_stat: str = PROC_STAT) -> int:
    """How many other processes keep the CPUs busy now: the fewest runnable tasks (procs_running in
    /proc/stat) over `samples` readings, less this process; 0 where it cannot tell. The fewest, so a
    kernel thread that runs for a moment does not count: a busy neighbour is runnable in every reading."""
    counts = []
    for i in range(samples):
        for line in (_read(proc_stat) or "").splitlines():
            if line.startswith("procs_running "):
                counts.append(int(line.split()[1]) - 1)
        if i + 1 < samples:
            time.sleep(interval)
    return max(min(counts), 0) if counts else 0


def configure_threads(
    requested: int | None = None, log=None, cpus: int | None = None, busy: int | None = None
) -> int:
    """Decide the CPU thread count and set libgomp's wait policy; call before `import torch`.

    Returns `requested` capped at `cpus` (default: available_cpus()), or that count when `requested`
    is None; the caller passes it to torch.set_num_threads. `log` receives one line when the request
    is capped. When other processes are running (`busy`, default: busy_neighbours()), sets WAIT_ENV
    in os.environ, so threads sleep soon instead of spinning; a user's OMP_WAIT_POLICY / GOMP_SPINCOUNT
    win (libgomp's OMP_WAIT_POLICY=ACTIVE or PASSIVE also
    sets the spin count, so WAIT_ENV is left out when the user set a wait policy). Once torch is
    loaded the wait policy no longer changes; the thread count still applies.
    """
    cpus = available_cpus() if cpus is None else cpus
    threads = cpus if requested is None else min(requested, cpus)
    if requested is not None and requested > cpus and log is not None:
        log(f"--threads {requested} is more than the {cpus} CPUs this process may use; using {cpus}")
    chosen = "OMP_WAIT_POLICY" in os.environ or any(name in os.environ for name in WAIT_ENV)
    if not chosen and threads > 1 and (busy_neighbours() if busy is None else busy) > 0:
        os.environ.update(WAIT_ENV)
    return threads
