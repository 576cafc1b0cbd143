"""Training speed with 1 thread, with PyTorch's default threads, and with cnnkit's default, on an idle
machine and beside a busy neighbour (one `while True: pass` process per CPU).

The workload is the chapter's CNN at batch 64, bf16 autocast, channels_last, random 28x28 images.
Each measurement runs in a fresh process, because libgomp reads its wait policy (OMP_WAIT_POLICY,
GOMP_SPINCOUNT) only when torch loads it. Configurations take turns within each repeat; a measurement
stops after --steps steps or --seconds seconds, whichever comes first (two spinning threads beside a
busy neighbour can take a minute an epoch). Prints one line per measurement, then a table of medians
with the range over repeats, in images/s.

    python benchmarks/bench_threads.py [--repeats 5] [--spincounts 1000,30000]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def measure_once(config: dict, steps: int, seconds: float) -> dict:
    """Child process: set up threads as `config` says, then time training steps; returns the result."""
    if config["kind"] == "cnnkit":
        from cnnkit.threads import configure_threads

        threads = configure_threads()
    else:
        threads = config["threads"]
    import torch

    from cnnkit.data import minibatch_indices
    from cnnkit.model import Architecture, build_model
    from cnnkit.training import make_optimizer, train_epoch

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4096, 1, 28, 28, generator=generator).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (4096,), generator=generator)
    model = build_model(Architecture(), seed=0).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-3)
    batches = minibatch_indices(4096, 64, True, 0, 1)
    train_epoch(model, optimizer, images, labels, batches[:4], precision="bf16")  # warm up
    done, start = 0, time.perf_counter()
    for batch in batches[4:]:
        train_epoch(model, optimizer, images, labels, [batch], precision="bf16")
        done += 1
        if done >= steps or time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {
        "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in WAIT_VARIABLES if k in os.environ},
        "steps": done,
        "images_per_s": done * 64 / elapsed,
    }


def run_child(config: dict, steps: int, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    env.update(config.get("env", {}))
    command = [sys.executable, __file__, "--child", json.dumps(config), "--steps", str(steps)]
    command += ["--seconds", str(seconds)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"child failed for {config}:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


def start_neighbours(count: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_neighbours(neighbours: list):
    for process in neighbours:
        process.kill()
    for process in neighbours:
        process.wait()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=48, help="timed steps per measurement (at most)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time limit per measurement")
    parser.add_argument("--spincounts", default="", help="extra configurations: GOMP_SPINCOUNT values")
    parser.add_argument("--no-busy", action="store_true", help="measure the idle machine only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_once(json.loads(args.child), args.steps, args.seconds)))
        return

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from cnnkit.device import machine_line
    from cnnkit.threads import WAIT_ENV, available_cpus

    print(f"# machine: {machine_line()}", flush=True)  # with every figure

    cpus = available_cpus()
    configs = {
        "1 thread": {"kind": "fixed", "threads": 1},
        f"{cpus} threads, libgomp default": {"kind": "fixed", "threads": cpus},
    }
    for count in filter(None, args.spincounts.split(",")):
        configs[f"{cpus} threads, GOMP_SPINCOUNT={count}"] = {
            "kind": "fixed",
            "threads": cpus,
            "env": {"GOMP_SPINCOUNT": count},
        }
    settings = " ".join(f"{k}={v}" for k, v in WAIT_ENV.items())
    configs[f"cnnkit default ({settings} if busy)"] = {"kind": "cnnkit"}
    loads = ("idle",) if args.no_busy else ("idle", "busy")
    names = list(configs)
    results = {(name, load): [] for name in names for load in loads}
    print(f"{cpus} CPUs available; {args.repeats} repeats; images/s", flush=True)
    for repeat in range(args.repeats):
        for load in loads:
            neighbours = start_neighbours(cpus) if load == "busy" else []
            try:
                time.sleep(0.2 if neighbours else 0)
                shift = repeat % len(names)
                for name in names[shift:] + names[:shift]:
                    result = run_child(configs[name], args.steps, args.seconds)
                    results[name, load].append(result["images_per_s"])
                    print(f"  repeat {repeat} {load:4s} {name:40s} {result['images_per_s']:7.0f}", flush=True)
            finally:
                stop_neighbours(neighbours)

    header = f"{'configuration':40s}" + "".join(f" {load + ' median (min-max)':>26s}" for load in loads)
    print("\n" + header)
    for name in names:
        cells = []
        for load in loads:
            values = results[name, load]
            cells.append(f"{statistics.median(values):7.0f} ({min(values):.0f}-{max(values):.0f})")
        print(f"{name:40s}" + "".join(f" {cell:>26s}" for cell in cells))


if __name__ == "__main__":
    main()
