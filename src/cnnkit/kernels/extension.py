"""cnnkit's C++ kernels (csrc/*.cpp): compiled at first use, cached, and optional.

`load()` returns the compiled module, whose submodules are the kernels (`pool_relu`: fused max pooling
and ReLU, used by cnnkit.pooling; `conv_pool`: the first layer, convolution to ReLU, for one-channel
images, used by cnnkit.conv_pool; `winograd`: the transforms of the second convolution's Winograd form,
used by cnnkit.kernels.winograd; `adam`: Adam on float32 master weights with bfloat16 weights, used by
cnnkit.master_weights), or None where they cannot be built or CNNKIT_MAX_ISA=pytorch asks for none. Then
each user falls back on PyTorch's own ops, which compute the same bits (the first layer: the same
sums in another order), more slowly, and one warning line on the "cnnkit" logger says so.

Which instructions the kernels use is decided at run time: the best this CPU has (`machine_isa()`),
capped by the environment variable CNNKIT_MAX_ISA, as oneDNN's ONEDNN_MAX_CPU_ISA caps oneDNN, so that
every path can be forced and tested on one machine. The levels, best first (`ISA_LEVELS`):
avx512_bf16 (AVX-512 with VDPBF16PS), avx512, avx2 (with FMA), portable (the compiler's default
target: C++ with no vector extension chosen) and pytorch (no C++ kernels at all; CNNKIT_PURE_PYTORCH=1
means the same). A cap also stops `precision="auto"` from choosing bf16 below avx512_bf16, so that a
capped run takes the path a CPU without those instructions would take. `isa()` is the level in force.

The module is compiled with torch.utils.cpp_extension (g++ or another C++ compiler, Python's headers,
and ninja, a dependency from PyPI) into $CNNKIT_CACHE_DIR/extensions (default
~/.cache/cnnkit/extensions) under a name that hashes the sources, torch, Python and the CPU, so a
change of any rebuilds it; processes starting together (DDP ranks) build it once.
"""

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["ISA_LEVELS", "building_message", "isa", "isa_cap", "load", "machine_isa", "start_loading"]

logger = logging.getLogger("cnnkit")

SOURCES = sorted(Path(__file__).with_name("csrc").glob("*.cpp"))
HEADERS = sorted(Path(__file__).with_name("csrc").glob("*.h"))
# -ffp-contract=off: no multiply-add is fused unless the source says so (csrc/adam.cpp reproduces
# torch's rounding); -fno-math-errno: sqrt vectorises.
CFLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: one thread pool.
LDFLAGS = ["-fopenmp"]

ISA_LEVELS = ("avx512_bf16", "avx512", "avx2", "portable", "pytorch")  # best first
# What each level adds to CFLAGS on x86-64 when it is below what the CPU has: the CPU's own target less
# the instructions above the level (GCC's -mno-avx512f turns off every AVX-512 extension).
_CAPPED_X86_FLAGS = {
    "avx512_bf16": ["-march=native"],
    "avx512": ["-march=native", "-mno-avx512bf16"],
    "avx2": ["-march=native", "-mno-avx512f"],
    "portable": [],
}

_NOT_LOADED = object()
_loaded = _NOT_LOADED
_load_lock = threading.Lock()
_background = None  # (thread, start time) of the build `start_loading` began


def machine_isa() -> str:
    """The best level of ISA_LEVELS this CPU runs: read from /proc/cpuinfo's flags on x86-64; "portable"
    on every other processor (the kernels' vector code is written for x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "portable"
    flags = set(_cpu_flags().split())
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "avx512_bf16" if "avx512_bf16" in flags else "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "portable"


def isa_cap() -> str | None:
    """The level CNNKIT_MAX_ISA asks for (CNNKIT_PURE_PYTORCH=1: "pytorch"), or None when unset; an
    unknown value raises ArgumentError naming the variable."""
    if os.environ.get("CNNKIT_PURE_PYTORCH", "").strip() not in ("", "0"):
        return "pytorch"
    cap = os.environ.get("CNNKIT_MAX_ISA", "").strip().lower()
    if not cap:
        return None
    if cap not in ISA_LEVELS:
        from cnnkit.errors import ArgumentError

        raise ArgumentError(f"CNNKIT_MAX_ISA={cap!r}: expected one of {', '.join(ISA_LEVELS)}")
    return cap


def isa() -> str:
    """The level the kernels are built for: the CPU's best, or the cap where that is lower."""
    machine, cap = machine_isa(), isa_cap()
    if cap is None:
        return machine
    return max(machine, cap, key=ISA_LEVELS.index)


def building_message() -> str | None:
    """The line to show before the kernels are built for the first time, or None where no build will run
    (already built for these sources and this CPU, or no kernels wanted)."""
    level = isa()
    if _loaded is not _NOT_LOADED or level == "pytorch":
        return None
    directory = _build_location(_sources(), level)[1]
    if (directory / "built").exists():
        return None
    return f"building cnnkit's C++ kernels ({level}) once, about 20 s; cached in {directory.parent}"


def load():
    """The compiled kernels, built the first time (about 20 s on 2 cores), or None: see the module's docstring."""
    global _loaded
    if _loaded is _NOT_LOADED:
        with _load_lock:
            if _loaded is _NOT_LOADED:
                _loaded = _load_or_warn()
    return _loaded


def start_loading(log=None):
    """Where the kernels still need building: say so through `log` (one line, `building_message`) and
    start `load()` in a background thread, so that the build overlaps whatever comes next (loading the
    data). `finish_loading` waits for it; so does `load` itself."""
    global _background
    message = building_message()
    if message is None or _background is not None:
        return
    if log is not None:
        log(message)
    thread = threading.Thread(target=load, name="cnnkit-kernels", daemon=True)
    thread.start()
    _background = (thread, time.perf_counter())


def finish_loading(log=None, show_progress: bool = False):
    """`load()`, after waiting for a build that `start_loading` began, with the seconds it is taking on
    a terminal (`show_progress`) and one line through `log` when it is done. Returns what `load` does."""
    global _background
    if _background is not None:
        thread, started = _background
        spinner = None
        if show_progress and thread.is_alive():
            from tqdm.auto import tqdm

            spinner = tqdm(desc="building the C++ kernels", bar_format="{desc}: {elapsed}", leave=False)
        try:
            while thread.is_alive():
                thread.join(0.2)
                if spinner is not None:
                    spinner.refresh()
        finally:
            if spinner is not None:
                spinner.close()
        _background = None
        kernels = load()
        if log is not None and kernels is not None:
            log(f"C++ kernels ready ({isa()}), built in {time.perf_counter() - started:.0f} s")
        return kernels
    return load()


def _load_or_warn():
    level = isa()  # an unknown CNNKIT_MAX_ISA is the user's error, not a failed build
    if level == "pytorch":
        return None
    try:
        return _load_extension(level)
    except Exception as error:
        logger.debug("building cnnkit's C++ kernels failed", exc_info=True)
        logger.warning(
            "could not build cnnkit's C++ kernels (%s); using PyTorch's own ops (slower)",
            _short_reason(error),
        )
        return None


def _sources() -> bytes:
    return b"".join(path.name.encode() + b"\0" + path.read_bytes() for path in SOURCES + HEADERS)


def _load_extension(level: str | None = None):
    """Import the compiled extension for ISA level `level` (default: `isa()`), building it first if this
    cache has none for these sources, headers and level."""
    level = level or isa()
    name, directory = _build_location(_sources(), level)
    built = directory / "built"  # the module's name and file, written once the build succeeded
    if not built.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive(directory / "cnnkit.lock"):
            if not built.exists():
                return _build(name, directory, built, level)
    module_name, file_name = built.read_text().split()
    return _import_library(module_name, directory / file_name)


def _compiler_flags(level: str) -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return CFLAGS + (["-march=native"] if level != "portable" else [])
    if level == machine_isa():
        return [*CFLAGS, "-march=native"] if level != "portable" else list(CFLAGS)
    return CFLAGS + _CAPPED_X86_FLAGS[level]


def _build(name, directory, built, level):
    from torch.utils import cpp_extension

    # torch's own lock file; one left behind by a build that was killed would make torch wait forever,
    # and while we hold our lock nobody else is building here.
    with contextlib.suppress(FileNotFoundError):
        (directory / "lock").unlink()
    with _quiet_build(), _ninja_on_path():
        module = cpp_extension.load(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=_compiler_flags(level),
            extra_ldflags=list(LDFLAGS),  # torch appends its own to the list it is given
            build_directory=str(directory),
            verbose=False,
        )
    partial = built.with_suffix(".partial")
    partial.write_text(f"{module.__name__} {Path(module.__file__).name}\n")
    partial.replace(built)
    return module


def _import_library(name, path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_location(source: bytes, level: str):
    """(module name, build directory): a hash of everything the compiled library depends on."""
    digest = hashlib.sha256(source)
    for part in (
        torch.__version__,
        sys.version,
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        platform.machine(),
        _cpu_flags(),  # -march=native: a library built on one CPU may not run on another
        " ".join(_compiler_flags(level) + LDFLAGS),
    ):
        digest.update(b"\0" + part.encode())
    name = f"cnnkit_kernels_{digest.hexdigest()[:16]}"
    root = os.environ.get("CNNKIT_CACHE_DIR") or Path.home() / ".cache" / "cnnkit"
    return name, Path(root).expanduser() / "extensions" / name


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive lock between processes (two DDP ranks building at once); the kernel releases it if
    the holder dies."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on torch's lock file alone
        yield
        return
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextlib.contextmanager
def _ninja_on_path():
    """torch builds with `ninja` from PATH; cnnkit depends on PyPI's ninja, which installs it beside this
    Python (a virtual environment's bin), where PATH may not look when the environment is not active."""
    here = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") or not here or not Path(here, "ninja").exists():
        yield
        return
    os.environ["PATH"] = here + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


@contextlib.contextmanager
def _quiet_build():
    """Silence torch's compiler checks, which warn through logging and `warnings`: a failed build is
    reported once, by `load`."""
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(level)


def _short_reason(error: Exception) -> str:
    """The compiler's first error line, or what failed, in at most 200 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, subprocess.CalledProcessError):
        command = error.cmd if isinstance(error.cmd, str) else " ".join(map(str, error.cmd))
        reason = f"`{command}` exited with status {error.returncode}"
    elif lines and lines[0].startswith("Error building extension"):
        errors = [line for line in lines[1:] if "error:" in line]
        reason = f"compiler error: {errors[0]}" if errors else "the compiler failed"
    else:
        reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."
