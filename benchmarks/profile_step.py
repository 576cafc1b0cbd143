"""Where a training step's time goes: oneDNN's primitives against the rest, before and after the fast path.

    python benchmarks/profile_step.py [--precision bf16|fp32|both] [--steps 100] [--repeats 5]

The step is the production one (cnnkit.training.train_epoch: the chapter's network, batch 64, Adam,
dropout 0.5, channels_last, random 28x28 images). "before" puts back what the fast path replaced:
oneDNN's first convolution (and in fp32 its second, which the fast path runs as a Winograd convolution),
PyTorch's max_pool2d followed by ReLU, Adam through Optimizer.step on float32 weights that autocast
casts to bf16 at every step (no bf16 copies with master weights), fp32 products in MKL, and glibc's
default allocator thresholds; "after" is cnnkit as it is. For each, the step is timed without the
profiler (the median of --repeats processes timing --steps steps), then profiled, and the profiled
time is split into oneDNN's primitives (convolutions forward and backward, dense products; in fp32
"before" the products are MKL's) and the rest, with the rest's biggest parts named. Each measurement
runs in a fresh process (glibc's allocator settings cannot be undone), before and after taking
turns. Prints a Markdown table in milliseconds per step.
"""

import argparse
import contextlib
import json
import subprocess
import sys
import time

import numpy as np
import torch

from cnnkit import device as cnnkit_device
from cnnkit.device import machine_line, memory_format
from cnnkit.kernels import conv_pool, master_weights, pooling, winograd
from cnnkit.model import Architecture, build_model
from cnnkit.training import make_optimizer, train_epoch

BATCH = 64
CONVOLUTIONS = {"aten::mkldnn_convolution", "aten::convolution_backward"}
PRODUCTS = {"aten::mm", "aten::addmm"}
WINOGRAD = {"_Winograd", "_WinogradBackward", "aten::bmm"}  # its transforms (C++) and its products
PARTS = {  # the rest, named: self time of these ops (and the fused pooling's own record)
    "pooling and ReLU": {
        "aten::max_pool2d_with_indices",
        "aten::max_pool2d_with_indices_backward",
        "aten::threshold_backward",
        "aten::relu",
        "aten::clamp_min",
        "cnnkit max_pool_relu",
    },
    "the fused first layer": {"cnnkit conv_pool_relu"},
    "Adam": {"aten::_fused_adam_", "aten::_foreach_add_", "Optimizer.step#FusedAdam.step", "cnnkit adam"},
    "casts and copies": {"aten::copy_", "aten::_to_copy", "aten::clone"},
    "dropout": {"aten::random_", "aten::ge", "aten::mul"},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=["bf16", "fp32", "both"], default="both")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", nargs=2, metavar=("WHEN", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    print(f"# machine: {machine_line()}", file=sys.stderr, flush=True)  # with every figure
    if args.child:  # one process per measurement: glibc's allocator settings cannot be undone
        when, precision = args.child
        setup = Setup(precision, when == "before")
        print(json.dumps({"ms": setup.timed(args.steps), "profile": setup.profiled(args.steps)}))
        return
    print(f"pooling kernels: {pooling.kernel_name()}; threads: {torch.get_num_threads()}")
    for precision in ("bf16", "fp32") if args.precision == "both" else (args.precision,):
        results = {"before": [], "after": []}
        for _ in range(args.repeats):
            for when, runs in results.items():
                command = [sys.executable, __file__, "--child", when, precision, "--steps", str(args.steps)]
                runs.append(json.loads(subprocess.run(command, capture_output=True, check=True).stdout))
        rows = {}
        for when, runs in results.items():
            middle = sorted(runs, key=lambda run: run["ms"])[len(runs) // 2]
            rows[when] = {"step (unprofiled)": middle["ms"], **middle["profile"]}
        print(f"\n{precision}, batch {BATCH}, ms per step, the median of {args.repeats} processes each\n")
        print("| part of a step | before | after |\n|---|---|---|")
        for name in rows["after"]:
            print(f"| {name} | {rows['before'][name]:.2f} | {rows['after'][name]:.2f} |")
        before, after = rows["before"]["step (unprofiled)"], rows["after"]["step (unprofiled)"]
        print(
            f"\nimages/s: before {BATCH * 1000 / before:,.0f}, after {BATCH * 1000 / after:,.0f} ({before / after:.2f}x)"
        )


class Setup:
    """A model, optimizer and data for one configuration; `before` swaps the old parts in while it runs."""

    def __init__(self, precision: str, before: bool):
        self.precision, self.before = precision, before
        cpu = torch.device("cpu")
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(BATCH * 50, 1, 28, 28, generator=generator).contiguous(
            memory_format=memory_format(cpu)
        )
        self.labels = torch.randint(0, 10, (BATCH * 50,), generator=generator)
        self.model = build_model(Architecture(), seed=0).to(memory_format=memory_format(cpu))
        with self.swapped():
            self.optimizer = make_optimizer(self.model, 1e-4)
        self.batches = [np.arange(i, i + BATCH) for i in range(0, BATCH * 50, BATCH)]
        self.timed(20)  # warm up, and Adam's state

    @contextlib.contextmanager
    def swapped(self):
        if not self.before:
            yield
            return
        import cnnkit.training as training

        saved = (
            conv_pool.fuses,
            cnnkit_device.cpu_has_amx,
            training.FusedAdam,
            training.keep_freed_memory,
            master_weights._kernels_for,
            winograd.fuses,
        )
        conv_pool.fuses = lambda *args: False  # oneDNN's first convolution, then the fused pooling
        winograd.fuses = lambda *args: False  # oneDNN's second convolution in fp32 too
        cnnkit_device.cpu_has_amx = lambda: True  # keeps fp32 products in MKL
        training.FusedAdam = lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True)
        training.keep_freed_memory = lambda: None
        master_weights._kernels_for = lambda *args: None
        try:
            yield
        finally:
            (
                conv_pool.fuses,
                cnnkit_device.cpu_has_amx,
                training.FusedAdam,
                training.keep_freed_memory,
                master_weights._kernels_for,
                winograd.fuses,
            ) = saved

    def timed(self, steps: int) -> float:
        """ms per step over `steps` steps."""
        batches = (self.batches * (steps // len(self.batches) + 1))[:steps]
        with self.swapped():
            start = time.perf_counter()
            train_epoch(self.model, self.optimizer, self.images, self.labels, batches, self.precision)
            return (time.perf_counter() - start) * 1000 / steps

    def profiled(self, steps: int) -> dict:
        from torch.profiler import ProfilerActivity, profile, record_function

        real, real_adam, real_first = pooling._kernels(), master_weights._kernels_for, conv_pool._kernels

        class Recorded:  # the C++ kernels, named in the profile
            def __init__(self, kernels, name):
                self.kernels, self.name = kernels, name

            def forward(self, *args):
                with record_function(self.name):
                    return self.kernels.forward(*args)

            def backward(self, *args):
                with record_function(self.name):
                    return self.kernels.backward(*args)

        class RecordedAdam:
            def __init__(self, adam):
                self.adam = adam

            def step(self, *args):
                with record_function("cnnkit adam"):
                    return self.adam.step(*args)

        def recorded_adam(*args):
            adam = real_adam(*args)
            return None if adam is None else RecordedAdam(adam)

        first = real_first()
        pooling._resolved = Recorded(real, "cnnkit max_pool_relu")
        master_weights._kernels_for = recorded_adam
        conv_pool._kernels = lambda: None if first is None else Recorded(first, "cnnkit conv_pool_relu")
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                self.timed(steps)
        finally:
            pooling._resolved, master_weights._kernels_for, conv_pool._kernels = real, real_adam, real_first
        own = {}
        for event in prof.key_averages():
            own[event.key] = own.get(event.key, 0.0) + event.self_cpu_time_total / 1000 / steps
        total = sum(own.values())
        convolutions = sum(own.get(name, 0.0) for name in CONVOLUTIONS)
        products = sum(own.get(name, 0.0) for name in PRODUCTS)
        second = sum(own.get(name, 0.0) for name in WINOGRAD)
        row = {
            "step (profiled)": total,
            "convolutions, oneDNN": convolutions,
            "second convolution, Winograd (fp32 after)": second,
            "dense products, oneDNN (fp32 before: MKL)": products,
            "everything else": total - convolutions - second - products,
        }
        for part, names in PARTS.items():
            row[f"... of which {part}"] = sum(own.get(name, 0.0) for name in names)
        return row


if __name__ == "__main__":
    main()
