"""Time cnnkit.ops.conv2d against scipy.signal.convolve2d in the same run.

A 512 x 512 float64 image convolved with 3x3, 5x5 and 15x15 kernels in modes 'same' and 'valid'.
Each case checks that both give the same result (to 1e-10), then times each `--repeats` times with
time.perf_counter, taking turns, and reports the best and the median. Prints one JSON object per case, then a table.

    python3 benchmarks/bench_conv.py [--size 512] [--repeats 7]

The goal: at most 2x scipy's time at 5x5, faster than scipy at 15x15 (ratio = cnnkit_s / scipy_s).
"""

import argparse
import json
import statistics
import sys
import time
from functools import partial

import numpy as np
import scipy.signal

from cnnkit.device import machine_line
from cnnkit.ops import conv2d

KERNELS = (3, 5, 15)
MODES = ("same", "valid")


def time_calls(calls, repeats):
    """Run each function in `calls` `repeats` times, taking turns so that load from other processes on the
    machine falls on all alike; return [(best, median)] wall seconds per function."""
    times = [[] for _ in calls]
    for _ in range(repeats):
        for function, spent in zip(calls, times, strict=True):
            start = time.perf_counter()
            function()
            spent.append(time.perf_counter() - start)
    return [(min(spent), statistics.median(spent)) for spent in times]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image height and width (default 512)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per function (default 7)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for image and kernels")
    args = parser.parse_args(argv)
    print(f"# machine: {machine_line()}", file=sys.stderr, flush=True)  # with every figure

    rng = np.random.default_rng(args.seed)
    image = rng.standard_normal((args.size, args.size))
    rows = []
    for k in KERNELS:
        kernel = rng.standard_normal((k, k))
        for mode in MODES:
            ours_call = partial(conv2d, image, kernel, mode=mode)
            scipy_call = partial(scipy.signal.convolve2d, image, kernel, mode=mode)
            ours, theirs = ours_call(), scipy_call()
            if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=0, atol=1e-10):
                raise SystemExit(f"cnnkit and scipy disagree for {k}x{k} mode={mode!r}")
            (cnnkit_best, cnnkit_median), (scipy_best, scipy_median) = time_calls(
                [ours_call, scipy_call], args.repeats
            )
            row = {
                "image": f"{args.size}x{args.size}",
                "kernel": f"{k}x{k}",
                "mode": mode,
                "cnnkit_s": round(cnnkit_best, 6),
                "scipy_s": round(scipy_best, 6),
                "ratio": round(cnnkit_best / scipy_best, 3),
                "cnnkit_median_s": round(cnnkit_median, 6),
                "scipy_median_s": round(scipy_median, 6),
                "median_ratio": round(cnnkit_median / scipy_median, 3),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)

    print()
    print(
        f"{'kernel':>7} {'mode':>6} {'cnnkit ms':>10} {'scipy ms':>9} {'ratio':>6}   (best of {args.repeats})"
    )
    for row in rows:
        print(
            f"{row['kernel']:>7} {row['mode']:>6} {row['cnnkit_s'] * 1e3:>10.2f} "
            f"{row['scipy_s'] * 1e3:>9.2f} {row['ratio']:>6.2f}"
        )


if __name__ == "__main__":
    main()
