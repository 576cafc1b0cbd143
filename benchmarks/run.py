"""cnnkit's training and inference speed, side by side with the chapter's TensorFlow 1 peer, in one run.

    python3 benchmarks/run.py --peer-python /tmp/tf/bin/python           # throughput, inference, latency
    python3 benchmarks/run.py --peer-python /tmp/tf/bin/python --only full   # 20-epoch runs (~45 min)

The peer is ../shared/peers/seed_tf1.py run by --peer-python (a virtual environment with
tensorflow-cpu: `python3 -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu mlxtend`); without
--peer-python only cnnkit is measured. Each measurement is repeated --repeats times, cnnkit and the
peer taking turns so that a busy neighbour slows both alike, and medians are compared.

Measurements (on Fashion-MNIST, Debian's dataset-fashion-mnist):
  train       images/s of the chapter's recipe (batch 64, Adam, dropout): cnnkit fp32, cnnkit's default
              fast path (bf16 where native), and the peer
  inference   images/s predicting batches of 1,000: cnnkit fp32, bf16, int8, the checkpoint exported
              (`cnnkit export`, fp32 and int8) run by onnxruntime, and the peer (cnnkit passes each
              batch through its network in chunks of its default_batch_size; onnxruntime takes each
              batch whole); and batches of 256, cnnkit's paths only
  latency     one image at a time, p50 and p99, with a model loaded from a checkpoint (or its export)
  full        (--full) 20-epoch runs of the chapter's recipe (fp32 and the fast path), `--recipe fast`,
              and the peer: test accuracy, training seconds, peak RSS of the training process.
              Repeat r uses seed 123 + r on both sides (the peer through a copy of its script with
              its seed replaced)

It first prints the CPU model, its instruction sets and the path the defaults take (precision and
kernels, and why). To emulate a CPU without AVX512-BF16 on one that has it, cap oneDNN and cnnkit's
kernels for both sides: `CNNKIT_MAX_ISA=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python3
benchmarks/run.py ...`; the caps in force are printed and recorded with the figures.

Prints one JSON object per measurement (also appended to --out if given), then a summary table.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cnnkit.checkpoint import load_network, save_checkpoint
from cnnkit.data import Standardization, load_dataset, minibatch_indices
from cnnkit.device import describe_machine, describe_path, machine_line, memory_format, resolve_precision
from cnnkit.errors import CnnkitError
from cnnkit.inference import predict_logits
from cnnkit.kernels import pooling
from cnnkit.model import Architecture, build_model
from cnnkit.quantize import quantize_int8
from cnnkit.recipes import TrainConfig
from cnnkit.record import ModelRecord
from cnnkit.runs import to_tensors
from cnnkit.training import make_optimizer, train_epoch

HERE = Path(__file__).resolve().parent
DEFAULT_PEER = HERE.parent.parent / "shared" / "peers" / "seed_tf1.py"
WARMUP_STEPS = 20
ISA_CAPS = (
    "CNNKIT_MAX_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
)  # as the peer's --throughput mode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer-python", help="Python of a virtual environment with tensorflow-cpu")
    ap.add_argument("--peer-script", default=str(DEFAULT_PEER), help="path of seed_tf1.py")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="training steps timed per repeat")
    ap.add_argument("--only", default="train,inference,latency", help="comma-separated measurements")
    ap.add_argument("--full", action="store_true", help="also the 20-epoch runs (about 15 minutes a repeat)")
    ap.add_argument("--epochs", type=int, default=20, help="epochs of the --full chapter runs")
    ap.add_argument("--out", help="append the JSON lines to this file too")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) | ({"full"} if args.full else set())
    peer = args.peer_python and Path(args.peer_script).exists()
    if args.peer_python and not peer:
        sys.exit(f"benchmarks/run.py: --peer-script {args.peer_script} does not exist")

    report = Reporter(args.out)
    about = machine()
    report.emit(about)
    caps = " ".join(f"{name}={value}" for name, value in about["isa_caps"].items())
    print(
        f"# machine: {report.machine}\n# default path: {about['default_path']}"
        + (f"\n# emulating a lesser CPU: {caps} (the peer runs under the same caps)" if caps else ""),
        file=sys.stderr,
        flush=True,
    )
    dataset = load_dataset("fashion-mnist").split_validation()
    standardization = Standardization.fit(dataset.train.images)
    if "train" in only:
        bench_training(dataset, standardization, args, report, peer)
    if "inference" in only or "latency" in only:
        bench_inference(dataset, standardization, args, report, peer, only)
    if "full" in only:
        bench_full_runs(args, report, peer)
    report.summary()


# --- training throughput ---


def cnnkit_train_throughput(dataset, standardization, precision, steps, batch_size=64):
    """Images/s of the production training step (cnnkit.training.train_epoch) over `steps` batches."""
    device = torch.device("cpu")
    images, labels = to_tensors(dataset.train, standardization, device)
    model = build_model(Architecture(), seed=0).to(memory_format=memory_format(device))
    optimizer = make_optimizer(model, 1e-4)
    batches = minibatch_indices(len(labels), batch_size, True, 0, 1)
    need = WARMUP_STEPS + steps
    batches = (batches * (need // len(batches) + 1))[:need]
    train_epoch(model, optimizer, images, labels, batches[:WARMUP_STEPS], precision)
    start = time.perf_counter()
    train_epoch(model, optimizer, images, labels, batches[WARMUP_STEPS:], precision)
    return steps * batch_size / (time.perf_counter() - start)


def bench_training(dataset, standardization, args, report, peer):
    fast = resolve_precision("auto", torch.device("cpu"))
    results = {"cnnkit fp32": [], f"cnnkit {fast} (default)": [], "peer": []}
    for repeat in range(args.repeats):
        results["cnnkit fp32"].append(cnnkit_train_throughput(dataset, standardization, "fp32", args.steps))
        results[f"cnnkit {fast} (default)"].append(
            cnnkit_train_throughput(dataset, standardization, fast, args.steps)
        )
        if peer:
            out = run_json(
                [args.peer_python, args.peer_script, "--data", "fashion", "--throughput", str(args.steps)]
            )
            results["peer"].append(out["images_per_s"])
        print(
            f"# train repeat {repeat + 1}: "
            + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in results.items() if v),
            file=sys.stderr,
        )
    report.compare("train_images_per_s", results, batch_size=64, steps=args.steps)


# --- inference throughput and latency ---


def bench_inference(dataset, standardization, args, report, peer, only):
    test = torch.from_numpy(standardization.apply(dataset.test.images))
    calibration = standardization.apply(dataset.train.images[:512])
    with tempfile.TemporaryDirectory() as tmp:
        # A model as `cnnkit predict` gets it: saved, then loaded from its checkpoint.
        trained = build_model(Architecture(), seed=0)
        record = ModelRecord(
            architecture=Architecture(),
            class_names=tuple(dataset.class_names),
            standardization=standardization,
            preprocessing=dataset.preprocessing,
            config=TrainConfig(),
        )
        path = save_checkpoint(Path(tmp) / "model.safetensors", trained, record)
        model, _ = load_network(path)
        exported = onnx_sessions(path, Path(tmp))
    int8 = quantize_int8(model, calibration)
    fast = resolve_precision("auto", torch.device("cpu"))
    # name -> (a function from a batch to logits, the images it takes: standardized, or raw pixels)
    variants = {
        "cnnkit fp32": (partial(predict_logits, model, precision="fp32"), test),
        f"cnnkit {fast} (default)": (partial(predict_logits, model, precision=fast), test),
        "cnnkit int8": (partial(predict_logits, int8, precision="fp32"), test),
    }
    raw = dataset.test.images.astype(np.float32)
    for name, session in exported.items():
        variants[name] = (lambda batch, session=session: session.predict_logits(batch, len(batch)), raw)
    throughput = {name: [] for name in variants} | {"peer": []}
    throughput_256 = {name: [] for name in variants}
    p50 = {name: [] for name in variants} | {"peer": []}
    p99 = {name: [] for name in variants} | {"peer": []}
    for repeat in range(args.repeats):
        for name, (predict, images) in variants.items():
            predict(images[:1000])  # warm-up
            for batch, results in ((1000, throughput), (256, throughput_256)):
                start = time.perf_counter()
                for first in range(0, len(images), batch):  # each batch handed over whole, as to the peer
                    predict(images[first : first + batch])
                results[name].append(len(images) / (time.perf_counter() - start))
            latencies = []
            for i in range(300):
                start = time.perf_counter()
                predict(images[i : i + 1])
                latencies.append(time.perf_counter() - start)
            latencies = np.array(latencies[20:]) * 1e3
            p50[name].append(float(np.percentile(latencies, 50)))
            p99[name].append(float(np.percentile(latencies, 99)))
        if peer:
            out = run_json(
                [args.peer_python, str(HERE / "peer_tf1_inference.py"), "--peer", args.peer_script]
            )
            throughput["peer"].append(out["images_per_s"])
            p50["peer"].append(out["p50_ms"])
            p99["peer"].append(out["p99_ms"])
        print(
            f"# inference repeat {repeat + 1}: "
            + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in throughput.items() if v),
            file=sys.stderr,
        )
    if "inference" in only:
        report.compare("inference_images_per_s", throughput, batch_size=1000)
        report.compare("inference_images_per_s_b256", throughput_256, batch_size=256)
    if "latency" in only:
        report.compare("latency_p50_ms", p50, lower_is_better=True)
        report.compare("latency_p99_ms", p99, lower_is_better=True)


def onnx_sessions(checkpoint, folder: Path) -> dict:
    """The checkpoint exported as `cnnkit export` does (fp32, and int8 calibrated on the first 512
    Fashion-MNIST training images) in onnxruntime sessions with torch's thread count; {} without the
    onnx extra."""
    try:
        from cnnkit.export import export_onnx
        from cnnkit.onnx_model import load_onnx

        return {
            f"onnxruntime {precision}": load_onnx(
                export_onnx(
                    checkpoint,
                    folder / f"{precision}.onnx",
                    precision=precision,
                    dataset="fashion-mnist" if precision == "int8" else None,
                ).path,
                threads=torch.get_num_threads(),
            )
            for precision in ("fp32", "int8")
        }
    except CnnkitError as exc:
        print(f"# onnxruntime rows skipped: {exc}", file=sys.stderr)
        return {}


# --- full 20-epoch runs ---


def bench_full_runs(args, report, peer):
    epochs = str(args.epochs)
    cnnkit = [sys.executable, "-m", "cnnkit", "train", "--dataset", "fashion-mnist", "--quiet"]
    runs = {
        "cnnkit chapter fp32": [*cnnkit, "--epochs", epochs, "--precision", "fp32"],
        "cnnkit chapter default": [*cnnkit, "--epochs", epochs],
        "cnnkit --recipe fast": [*cnnkit, "--recipe", "fast"],
    }
    results = {name: [] for name in [*runs, "peer"]}
    for repeat in range(args.repeats):
        for name, command in runs.items():
            with tempfile.TemporaryDirectory() as tmp:
                wall, rss_kb, _ = run_measured([*command, "--seed", str(123 + repeat), "--out", tmp])
                history = [
                    json.loads(line) for line in (Path(tmp) / "history.jsonl").read_text().splitlines()
                ]
                evaluation = run_json(
                    [sys.executable, "-m", "cnnkit", "evaluate", tmp, "--json", "--precision", "fp32"]
                )
            results[name].append(
                {
                    "test_accuracy": evaluation["accuracy"],
                    "train_seconds": sum(h["epoch_seconds"] for h in history),
                    "process_seconds": wall,
                    "peak_rss_mb": rss_kb / 1024,
                    "epochs": len(history),
                }
            )
            print(f"# full repeat {repeat + 1}: {name} {results[name][-1]}", file=sys.stderr)
        if peer:
            with tempfile.TemporaryDirectory() as tmp:
                script = seeded_peer_script(args.peer_script, 123 + repeat, Path(tmp))
                wall, rss_kb, out = run_measured(
                    [args.peer_python, script, "--data", "fashion", "--epochs", epochs]
                )
            last = json.loads(out.strip().splitlines()[-1])
            results["peer"].append(
                {
                    "test_accuracy": last["test_accuracy"],
                    "train_seconds": last["train_seconds"],
                    "process_seconds": wall,
                    "peak_rss_mb": rss_kb / 1024,
                    "epochs": last["epochs"],
                }
            )
            print(f"# full repeat {repeat + 1}: peer {results['peer'][-1]}", file=sys.stderr)
    for name, runs_of_name in results.items():
        if runs_of_name:
            medians = {key: statistics.median(r[key] for r in runs_of_name) for key in runs_of_name[0]}
            report.emit({"measure": "full_run", "who": name, "median": medians, "runs": runs_of_name})


def seeded_peer_script(peer_script, seed: int, folder: Path) -> str:
    """The peer with its fixed seed 123 (graph and batch order) replaced by `seed`, so that each full
    repeat compares cnnkit and the peer on the same seed; the peer's own file is left untouched."""
    if seed == 123:
        return peer_script
    text = Path(peer_script).read_text()
    lines = ("tf.set_random_seed(123)", "np.random.RandomState(123)")
    if not all(text.count(line) == 1 for line in lines):
        sys.exit(f"benchmarks/run.py: {peer_script} no longer seeds with {' and '.join(lines)}")
    for line in lines:
        text = text.replace(line, line.replace("123", str(seed)))
    path = folder / f"seed_tf1_seed{seed}.py"
    path.write_text(text)
    return str(path)


# --- plumbing ---


def machine() -> dict:
    cpu = torch.device("cpu")
    return {
        "measure": "machine",
        **describe_machine(),
        "default_path": describe_path("auto", resolve_precision("auto", cpu), cpu),
        # set to emulate a lesser CPU (oneDNN's, MKL's and cnnkit's own caps), so its figures say so
        "isa_caps": {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)},
        "torch_threads": torch.get_num_threads(),
        "pooling_kernels": pooling.kernel_name(),
        "python": platform.python_version(),
    }


def run_json(command) -> dict:
    """Run a command that prints a JSON object on its last line; return that object."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"benchmarks/run.py: {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_measured(command) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, peak RSS in KiB of that process, its standard output)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"benchmarks/run.py: {' '.join(command)} failed:\n{err.read()[-2000:]}")
        out.seek(0)
        return wall, usage.ru_maxrss, out.read()


class Reporter:
    """Prints JSON lines as they come and a table at the end."""

    def __init__(self, path=None):
        self.path = path
        self.rows = []
        self.machine = machine_line()

    def emit(self, record: dict):
        line = json.dumps({**record, "machine": self.machine})
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        self.rows.append(record)

    def compare(self, measure: str, values: dict, lower_is_better=False, **context):
        peer = statistics.median(values["peer"]) if values.get("peer") else None
        for who, samples in values.items():
            if not samples:
                continue
            median = statistics.median(samples)
            record = {"measure": measure, "who": who, "median": median, "samples": samples, **context}
            if peer and who != "peer":
                record["ratio_vs_peer"] = peer / median if lower_is_better else median / peer
            self.emit(record)

    def summary(self):
        print(f"\nmachine: {self.machine}", file=sys.stderr)
        print(f"default path: {self.rows[0]['default_path']}", file=sys.stderr)
        print("measure                     who                          median     vs peer", file=sys.stderr)
        for row in self.rows:
            if "median" in row and not isinstance(row["median"], dict):
                ratio = f"{row['ratio_vs_peer']:.2f}x" if "ratio_vs_peer" in row else ""
                print(
                    f"{row['measure']:<27} {row['who']:<26} {row['median']:>10,.2f}  {ratio:>8}",
                    file=sys.stderr,
                )
            elif row.get("measure") == "full_run":
                m = row["median"]
                print(
                    f"{'full_run':<27} {row['who']:<26} acc {m['test_accuracy']:.4f}  {m['train_seconds']:.0f} s  "
                    f"{m['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                )


if __name__ == "__main__":
    main()
