"""How long reading a dataset takes, and how much memory holding it standardized needs.

Each repeat runs in a fresh process (so nothing is cached in Python): it reads the dataset with
cnnkit.data.load_dataset, splits off the validation images, fits the standardization on the training
split and applies it to all three splits, keeping them as float32. Prints one JSON object per repeat
(seconds to read, seconds to standardize, peak resident memory of the process), then the medians.

    python3 benchmarks/bench_data.py [--dataset fashion-mnist] [--repeats 5]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure_once(source: str) -> dict:
    from cnnkit.data import Standardization, load_dataset

    start = time.perf_counter()
    dataset = load_dataset(source)
    read_seconds = time.perf_counter() - start
    dataset = dataset.split_validation()
    start = time.perf_counter()
    standardization = Standardization.fit(dataset.train.images)
    held = [standardization.apply(split.images) for split in (dataset.train, dataset.valid, dataset.test)]
    standardize_seconds = time.perf_counter() - start
    return {
        "dataset": source,
        "images": sum(len(images) for images in held),
        "read_seconds": read_seconds,
        "standardize_seconds": standardize_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from cnnkit.device import machine_line

    print(f"# machine: {machine_line()}", file=sys.stderr, flush=True)  # with every figure
    if args.child:
        print(json.dumps(measure_once(args.dataset)))
        return
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--dataset", args.dataset],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(out.stdout))
        print(out.stdout.strip(), flush=True)
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "dataset"}
    print(json.dumps({"dataset": args.dataset, "median": medians}))


if __name__ == "__main__":
    main()
