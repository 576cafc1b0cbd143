"""cnnkit.extension: which instruction set the C++ kernels are built for (the CPU's best, or the level
CNNKIT_MAX_ISA caps them to), what the first training says about it, and that a first build is said
out loud and never counted in an epoch's time."""

import threading
import time

import pytest
import torch
from conftest import TINY

from cnnkit import device, training
from cnnkit.errors import ArgumentError
from cnnkit.kernels import extension
from cnnkit.recipes import TrainConfig
from cnnkit.runs import start_run

FLAGS = {
    "Zen 5": "flags : fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_bf16 avx512_vnni",
    "Xeon without BF16": "flags : fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni",
    "a laptop": "flags : fpu sse2 avx avx2 fma",
    "an old PC": "flags : fpu sse2 sse4_2",
}


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        ("Zen 5", "avx512_bf16"),
        ("Xeon without BF16", "avx512"),
        ("a laptop", "avx2"),
        ("an old PC", "portable"),
    ],
)
def test_the_machines_level_comes_from_its_cpu_flags(monkeypatch, cpu, expected):
    monkeypatch.setattr(extension, "_cpu_flags", lambda: FLAGS[cpu])
    monkeypatch.setattr(extension.platform, "machine", lambda: "x86_64")
    assert extension.machine_isa() == expected


def test_other_processors_build_the_portable_code(monkeypatch):
    monkeypatch.setattr(extension.platform, "machine", lambda: "aarch64")
    assert extension.machine_isa() == "portable"


@pytest.mark.parametrize("cap", ["avx512", "avx2", "portable"])
def test_a_cap_lowers_the_level_and_never_raises_it(monkeypatch, cap):
    monkeypatch.setattr(extension, "_cpu_flags", lambda: FLAGS["Zen 5"])
    monkeypatch.setattr(extension.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv("CNNKIT_MAX_ISA", cap.upper())
    assert extension.isa() == cap
    flags = extension._compiler_flags(cap)
    assert ("-mno-avx512bf16" in flags) == (cap == "avx512")
    assert ("-mno-avx512f" in flags) == (cap == "avx2")
    assert ("-march=native" in flags) != (cap == "portable")
    monkeypatch.setattr(extension, "_cpu_flags", lambda: FLAGS["an old PC"])
    assert extension.isa() == "portable"  # a cap above the CPU changes nothing
    assert extension._compiler_flags("portable") == extension.CFLAGS


def test_the_old_switch_and_the_pytorch_level_build_nothing(monkeypatch):
    monkeypatch.setattr(extension, "_loaded", extension._NOT_LOADED)
    monkeypatch.setattr(extension, "_load_extension", lambda level=None: pytest.fail("built"))
    monkeypatch.setenv("CNNKIT_PURE_PYTORCH", "1")
    assert extension.isa() == "pytorch" and extension.building_message() is None
    assert extension.load() is None


def test_an_unknown_cap_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    from cnnkit.cli import main

    monkeypatch.setattr(extension, "_loaded", extension._NOT_LOADED)
    monkeypatch.setenv("CNNKIT_MAX_ISA", "avx1024")
    with pytest.raises(ArgumentError, match=r"CNNKIT_MAX_ISA='avx1024': expected one of avx512_bf16, avx512"):
        extension.load()
    assert main(["train", "--dataset", "mnist-5k", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("cnnkit: error: CNNKIT_MAX_ISA='avx1024'")


@pytest.mark.parametrize("cap", ["avx512", "avx2", "portable"])
def test_below_avx512_bf16_auto_precision_is_fp32_and_the_path_says_why(monkeypatch, cap):
    monkeypatch.setattr(device, "_native_bf16", lambda: True)
    monkeypatch.delenv("CNNKIT_MAX_ISA", raising=False)  # CI's second pass caps the kernels
    cpu = torch.device("cpu")
    assert device.resolve_precision("auto", cpu) == "bf16"
    assert "this CPU has" in device.describe_path("auto", "bf16", cpu)
    monkeypatch.setenv("CNNKIT_MAX_ISA", cap)
    assert device.resolve_precision("auto", cpu) == "fp32"
    line = device.describe_path("auto", "fp32", cpu)
    assert line.startswith(f"fp32: CNNKIT_MAX_ISA={cap} caps cnnkit below avx512_bf16")
    assert f"capped by CNNKIT_MAX_ISA={cap}" in line
    assert device.describe_path("bf16", "bf16", cpu).startswith("bf16: as asked (--precision bf16)")


def test_without_native_bf16_the_path_says_so(monkeypatch):
    monkeypatch.setattr(device, "_native_bf16", lambda: False)
    cpu = torch.device("cpu")
    assert device.resolve_precision("auto", cpu) == "fp32"
    assert device.describe_path("auto", "fp32", cpu).startswith("fp32: this CPU has no AVX512-BF16 or AMX")


def test_a_first_build_is_announced_overlaps_loading_and_is_not_timed(monkeypatch, tmp_path, small_npz):
    """The build runs in the background while the data loads, is announced in one line before, and is
    finished before the first epoch's clock starts."""
    real = extension.load()
    events = []
    started = threading.Event()

    def slow_build(level=None):
        started.set()
        time.sleep(0.5)
        events.append("built")
        return real

    monkeypatch.setattr(extension, "_loaded", extension._NOT_LOADED)
    monkeypatch.setattr(extension, "_background", None)
    monkeypatch.setattr(extension, "building_message", lambda: "building cnnkit's C++ kernels (test) once")
    monkeypatch.setattr(extension, "_load_extension", slow_build)
    train_epoch = training.train_epoch
    monkeypatch.setattr(
        training, "train_epoch", lambda *a, **k: events.append("epoch") or train_epoch(*a, **k)
    )
    lines = []
    start_run(
        small_npz,
        TrainConfig(epochs=1, seed=0, learning_rate=1e-3),
        tmp_path / "run",
        architecture=TINY,
        log=lines.append,
        show_progress=False,
    )
    assert started.is_set()
    assert events == ["built", "epoch"]
    assert lines[0] == "building cnnkit's C++ kernels (test) once"
    assert lines[1].startswith("training on ")
    assert lines[2].startswith("path: ")
    ready = next(i for i, line in enumerate(lines) if line.startswith("C++ kernels ready"))
    assert ready < next(i for i, line in enumerate(lines) if line.startswith("epoch 1/1"))


def test_a_server_that_gives_large_blocks_back_keeps_that_policy(monkeypatch):
    """cnnkit serve asks glibc to give large freed blocks back; inference, which would otherwise ask
    it to keep them (for training's speed), must not undo that."""
    from cnnkit.kernels import cpu

    calls = []
    monkeypatch.setattr(cpu, "_mallopt", lambda *settings: calls.append(settings))
    monkeypatch.setattr(cpu, "_policy", None)
    cpu.give_back_large_blocks()
    cpu.keep_freed_memory()
    assert calls == [((cpu.M_MMAP_THRESHOLD, 2**20),)]
    monkeypatch.setattr(cpu, "_policy", None)
    cpu.keep_freed_memory()
    cpu.keep_freed_memory()  # once a process
    assert calls[1:] == [((cpu.M_MMAP_THRESHOLD, 32 * 2**20), (cpu.M_TRIM_THRESHOLD, 64 * 2**20))]
