"""benchmarks/run.py says what machine and path its figures come from, emulation included."""

import importlib.util
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench_run():
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_machine_record_names_the_cpu_the_default_path_and_no_caps(bench_run, monkeypatch):
    for name in bench_run.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    about = bench_run.machine()
    assert about["cpu"] and about["cpus"] >= 1
    assert about["default_path"].split(":")[0] == about["default_precision"]
    assert "cnnkit's C++ kernels" in about["default_path"] or "PyTorch's own ops" in about["default_path"]
    assert about["isa_caps"] == {}


def test_an_emulated_cpu_without_bf16_says_so(bench_run, monkeypatch):
    monkeypatch.setenv("CNNKIT_MAX_ISA", "avx512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    about = bench_run.machine()
    assert about["isa_caps"] == {"CNNKIT_MAX_ISA": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}
    assert about["default_precision"] == "fp32" and about["default_path"].startswith("fp32: ")
