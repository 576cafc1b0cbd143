"""cnnkit's C++ kernels (csrc/*.cpp): compiled at first use, cached, and optional.

`load()` returns the compiled module, whose submodules are the kernels (`pool_relu`: fused max pooling
and ReLU, used by cnnkit.pooling; `conv_pool`: the first layer, convolution to ReLU, for one-channel
images, used by cnnkit.conv_pool; `adam`: Adam on float32 master weights with bfloat16 weights, used by
cnnkit.master_weights), or None where they cannot be built or CNNKIT_PURE_PYTORCH=1 asks for none. Then
each user falls back on PyTorch's own ops, which compute the same bits (the first layer: the same
sums in another order), more slowly, and one warning line on the "cnnkit" logger says so.

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
import warnings
from pathlib import Path

import torch

__all__ = ["load"]

logger = logging.getLogger("cnnkit")

SOURCES = sorted(Path(__file__).with_name("csrc").glob("*.cpp"))
HEADERS = sorted(Path(__file__).with_name("csrc").glob("*.h"))
# -ffp-contract=off: no multiply-add is fused unless the source says so (csrc/adam.cpp reproduces
# torch's rounding); -fno-math-errno: sqrt vectorises.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
# -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: one thread pool.
LDFLAGS = ["-fopenmp"]

_NOT_LOADED = object()
_loaded = _NOT_LOADED
_load_lock = threading.Lock()


def load():
    """The compiled kernels, built the first time (20-30 s), or None: see the module's docstring."""
    global _loaded
    if _loaded is _NOT_LOADED:
        with _load_lock:
            if _loaded is _NOT_LOADED:
                _loaded = _load_or_warn()
    return _loaded


def _load_or_warn():
    if os.environ.get("CNNKIT_PURE_PYTORCH", "").strip() not in ("", "0"):
        return None
    try:
        return _load_extension()
    except Exception as error:
        logger.debug("building cnnkit's C++ kernels failed", exc_info=True)
        logger.warning(
            "could not build cnnkit's C++ kernels (%s); using PyTorch's own ops (slower)",
            _short_reason(error),
        )
        return None


def _load_extension():
    """Import the compiled extension, building it first if this cache has none for these sources and headers."""
    name, directory = _build_location(
        b"".join(path.name.encode() + b"\0" + path.read_bytes() for path in SOURCES + HEADERS)
    )
    built = directory / "built"  # the module's name and file, written once the build succeeded
    if not built.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive(directory / "cnnkit.lock"):
            if not built.exists():
                return _build(name, directory, built)
    module_name, file_name = built.read_text().split()
    return _import_library(module_name, directory / file_name)


def _build(name, directory, built):
    from torch.utils import cpp_extension

    # torch's own lock file; one left behind by a build that was killed would make torch wait forever,
    # and while we hold our lock nobody else is building here.
    with contextlib.suppress(FileNotFoundError):
        (directory / "lock").unlink()
    with _quiet_build(), _ninja_on_path():
        module = cpp_extension.load(
            name=name,
            sources=[str(source) for source in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
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


def _build_location(source: bytes):
    """(module name, build directory): a hash of everything the compiled library depends on."""
    digest = hashlib.sha256(source)
    for part in (
        torch.__version__,
        sys.version,
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        platform.machine(),
        _cpu_flags(),  # -march=native: a library built on one CPU may not run on another
        " ".join(CFLAGS + LDFLAGS),
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
