"""Where and in what precision the network runs: device, bf16 autocast, memory format. (The CPU's
memory and oneDNN settings of the fast path are in cnnkit.kernels.cpu.)"""

import contextlib
import os

import torch

from cnnkit.errors import ArgumentError
from cnnkit.kernels.cpu import keep_freed_memory, onednn_fp32_matmul  # noqa: F401 (their old home)

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: "str | torch.device" = "auto") -> torch.device:
    """ "auto" is CUDA when a GPU is present, else the CPU; a torch.device is taken as it is."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES:
        raise ArgumentError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda: no CUDA GPU is available to PyTorch here; use --device cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 autocast pays off, and
    CNNKIT_MAX_ISA (see cnnkit.extension) does not cap cnnkit below avx512_bf16."""
    from cnnkit.kernels import extension

    if extension.isa_cap() in ("avx512", "avx2", "portable"):
        return False
    return _native_bf16()


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" picks bf16 only where the hardware has native bf16 matrix units; otherwise fp32."""
    if precision not in PRECISIONS:
        raise ArgumentError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def describe_path(requested: str, precision: str, device: torch.device) -> str:
    """One line saying which precision and which kernels a run takes, and why: `requested` is the
    precision asked for ("auto", "fp32", "bf16"), `precision` what resolve_precision made of it."""
    from cnnkit.kernels import extension

    if requested != "auto":
        why = f"as asked (--precision {requested})"
    elif device.type == "cuda":
        why = "the GPU " + ("has" if precision == "bf16" else "lacks") + " fast bf16"
    elif precision == "bf16":
        units = [
            name for name, key in (("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_bf16")) if _capability(key)
        ]
        why = f"this CPU has {' and '.join(units)}"
    elif extension.isa_cap() in ("avx512", "avx2", "portable") and _native_bf16():
        why = f"CNNKIT_MAX_ISA={extension.isa_cap()} caps cnnkit below avx512_bf16"
    else:
        why = "this CPU has no AVX512-BF16 or AMX, so bf16 would be slower"
    if device.type != "cpu":
        return f"{precision}: {why}"
    level = extension.isa()
    if level == "pytorch":
        kernels = "PyTorch's own ops (CNNKIT_MAX_ISA=pytorch or CNNKIT_PURE_PYTORCH=1)"
    else:
        capped = f", capped by CNNKIT_MAX_ISA={extension.isa_cap()}" if extension.isa_cap() else ""
        kernels = f"cnnkit's C++ kernels for {level} (this CPU: {extension.machine_isa()}{capped})"
    return f"{precision}: {why}; {kernels}"


def cpu_model() -> str:
    """The processor's name as /proc/cpuinfo gives it (else platform's guess), e.g. "AMD EPYC 9R45"."""
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "Model", "CPU part")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    """What a benchmark figure depends on: the CPU, its instruction sets, the kernels' level and the
    default precision. `benchmarks/` prints it with every figure."""
    from cnnkit.kernels import extension

    return {
        "cpu": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_isa": extension.machine_isa(),
        "amx": cpu_has_amx(),
        "kernels": extension.isa(),
        "default_precision": resolve_precision("auto", torch.device("cpu")),
        "torch": torch.__version__,
    }


def machine_line() -> str:
    """`describe_machine` in one line, e.g. "Intel(R) Xeon(R) Processor, 2 CPUs, avx512_bf16 + AMX;
    kernels avx512_bf16; default precision bf16; torch 2.13.0+cpu"."""
    m = describe_machine()
    amx = " + AMX" if m["amx"] else ""
    return (
        f"{m['cpu']}, {m['cpus']} CPUs, {m['cpu_isa']}{amx}; kernels {m['kernels']}; "
        f"default precision {m['default_precision']}; torch {m['torch']}"
    )


def _capability(name: str) -> bool:
    try:
        return bool(torch.cpu.get_capabilities().get(name))
    except (AttributeError, RuntimeError):
        return False


def _native_bf16() -> bool:
    return _capability("avx512_bf16") or _capability("amx_bf16")


def autocast(device: torch.device, precision: str):
    """The context the network runs in: bf16 autocast (weights and gradients stay fp32), or fp32 with
    the dense layers in oneDNN on CPUs without AMX (see `onednn_fp32_matmul`)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cpu" and not cpu_has_amx():
        return onednn_fp32_matmul()
    return contextlib.nullcontext()


def cpu_has_amx() -> bool:
    return _capability("amx_bf16")


def memory_format(device: torch.device):
    """channels_last lets oneDNN's CPU convolutions skip layout reorders; CUDA is fine either way."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format
