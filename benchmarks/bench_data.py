"""How long reading a dataset takes, and how much memory it needs.

Two benchmarks; each repeat runs in a fresh process (so nothing is cached in Python), and every figure
is printed as one JSON object per repeat, then the medians, after the machine line.

`--dataset SOURCE` (default fashion-mnist): read the dataset with cnnkit.data.load_dataset, split off
the validation images, fit the standardization on the training split and apply it to all three
splits, keeping them as float32: seconds to read, seconds to standardize, peak resident memory.

`--photos`: a folder of 60,000 real 32x32 JPEGs (50,000 in train/, 10,000 in test/, 10 classes), made
once under /tmp from the 6,000 CIFAR-10 photos in ../shared/data/cifar10-6k: each photo re-encoded
as it is, mirrored, and as eight random crops of it padded by 4 pixels (some mirrored), at JPEG quality
70 to 95. Then, each in a fresh process with its own empty cache folder ($CNNKIT_CACHE_DIR):

    first load     load_dataset("folder:DIR"): every photo decoded (the files in the OS page cache)
    cached load    the same again, read back from cnnkit's cache
    test, cold     the test split alone at 3 x 32 x 32, as `cnnkit evaluate` reads it, empty cache
    test, cached   the same, read back from the cache that the first load wrote
    data info      `cnnkit data info folder:DIR` on the cached folder (the whole command)
    one process    the first load with CNNKIT_DATA_WORKERS=1 and CNNKIT_CACHE_MB=0, for comparison

`cpu_seconds` is the CPU time of the loading process and its decoding processes together: on a
machine shared with other work the wall time depends on what else runs, the CPU time much less.
Memory: `peak_mb` is the loading process's peak resident memory, `added_mb` that less its resident
memory before loading, `tree_peak_mb` the peak of it and its decoding processes together (their PSS,
sampled every 20 ms: a page a worker shares with the process it was forked from counts once),
`arrays_mb` the uint8 arrays the dataset holds.

    python3 benchmarks/bench_data.py [--dataset fashion-mnist] [--repeats 5]
    python3 benchmarks/bench_data.py --photos [--repeats 3] [--folder /tmp/cnnkit-bench-photos-60k]
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-6k"
PHOTO_FOLDER = Path(tempfile.gettempdir()) / "cnnkit-bench-photos-60k"
VARIANTS = 10  # 6,000 photos x 10 = 60,000 files


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
        "peak_rss_mib": _status_kb(os.getpid(), "VmHWM") / 1024,
    }


# --- the folder of photos ---


def _variants(job):
    """Write the VARIANTS files made from one source photo; `job` is (index, source path, target folder)."""
    import numpy as np
    from PIL import Image

    index, source, target = job
    rng = np.random.default_rng(index)
    with Image.open(source) as image:
        photo = np.asarray(image.convert("RGB"))
    padded = np.pad(photo, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    target.mkdir(parents=True, exist_ok=True)
    for k in range(VARIANTS):
        if k == 0:
            variant = photo
        elif k == 1:
            variant = photo[:, ::-1]
        else:
            top, left = rng.integers(0, 9, 2)
            variant = padded[top : top + 32, left : left + 32]
            if rng.random() < 0.5:
                variant = variant[:, ::-1]
        quality = 95 if k == 0 else int(rng.integers(70, 96))
        Image.fromarray(np.ascontiguousarray(variant)).save(
            target / f"{source.stem}-{k}.jpg", quality=quality
        )


def make_photo_folder(folder: Path) -> Path:
    """FOLDER/{train,test}/CLASS/*.jpg made from SHARED_PHOTOS (once: a finished folder holds .complete)."""
    done = folder / ".complete"
    sources = sorted(SHARED_PHOTOS.glob("*/*/*.jpg"))
    if done.is_file() and done.read_text().strip() == str(len(sources) * VARIANTS):
        return folder
    if not sources:
        raise SystemExit(f"no photos in {SHARED_PHOTOS}: the benchmark makes its folder from them")
    shutil.rmtree(folder, ignore_errors=True)
    import multiprocessing

    jobs = [(i, path, folder / path.relative_to(SHARED_PHOTOS).parent) for i, path in enumerate(sources)]
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool() as pool:
        pool.map(_variants, jobs, chunksize=100)
    done.write_text(f"{len(sources) * VARIANTS}\n")
    print(
        f"# made {len(sources) * VARIANTS:,} JPEGs in {folder} in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return folder


def _status_kb(pid, field: str = "VmRSS") -> int:
    """A memory figure of /proc/PID/status in KiB: VmRSS (resident now) or VmHWM (its peak). Not
    getrusage's ru_maxrss: a child started by fork keeps its parent's peak in it, across exec."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return int(next(line for line in status if line.startswith(field)).split()[1])
    except (OSError, StopIteration, ValueError):
        return 0


def _pss_kb(pid) -> int:
    """Proportional set size: resident memory with each page shared by n processes counted 1/n in each,
    so that a forked worker's pages shared with its parent are not counted twice."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return int(next(line for line in rollup if line.startswith("Pss:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return 0


def _tree_pss_kb(root: int) -> int:
    """The memory of process `root` and all its descendants (its decoding workers), as PSS."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(_pss_kb(pid) for pid in tree)


def measure_folder(folder: str, splits: str, size: int | None) -> dict:
    """Load folder:FOLDER (splits "all" or "test"; `size`: the image size asked for) and measure it."""
    from cnnkit.data import load_dataset

    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _tree_pss_kb(os.getpid()))
            stop.wait(0.02)

    before = _status_kb(os.getpid())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start, cpu = time.perf_counter(), time.process_time()
    options = {"splits": ("test",), "image_size": (size, size), "channels": 3} if splits == "test" else {}
    if size and splits != "test":
        options["image_size"] = (size, size)
    dataset = load_dataset(f"folder:{folder}", progress=False, **options)
    seconds = time.perf_counter() - start
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)  # the decoding processes, ended and waited for
    cpu = time.process_time() - cpu + workers.ru_utime + workers.ru_stime
    stop.set()
    sampler.join()
    arrays = sum(split.images.nbytes for split in dataset.splits)
    peak_kb = _status_kb(os.getpid(), "VmHWM")
    return {
        "images": sum(len(split) for split in dataset.splits),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "arrays_mb": round(arrays / 2**20, 1),
        "peak_mb": round(peak_kb / 1024, 1),
        "added_mb": round((peak_kb - before) / 1024, 1),
        "tree_peak_mb": round(peak[0] / 1024, 1),
    }


def _child(env: dict, *args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"benchmark child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timed_command(env: dict, *args) -> dict:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "cnnkit", *args], capture_output=True, env={**os.environ, **env}, check=True
    )
    return {"seconds": round(time.perf_counter() - start, 3)}


def bench_photos(folder: Path, repeats: int):
    folder = make_photo_folder(folder)
    rows = {}

    def record(name, figures):
        figures = {"measure": name, **figures}
        rows.setdefault(name, []).append(figures)
        print(json.dumps(figures), flush=True)

    for _ in range(repeats):
        with (
            tempfile.TemporaryDirectory(prefix="cnnkit-bench-cache-") as cache,
            tempfile.TemporaryDirectory(prefix="cnnkit-bench-cache-") as empty,
        ):
            env = {"CNNKIT_CACHE_DIR": cache}
            record("first load", _child(env, "folder", str(folder), "all"))
            record("cached load", _child(env, "folder", str(folder), "all"))
            record("test, cold", _child({"CNNKIT_CACHE_DIR": empty}, "folder", str(folder), "test", "32"))
            record("test, cached", _child(env, "folder", str(folder), "test", "32"))
            record("data info", _timed_command(env, "data", "info", f"folder:{folder}"))
            serial = {"CNNKIT_CACHE_DIR": empty, "CNNKIT_DATA_WORKERS": "1", "CNNKIT_CACHE_MB": "0"}
            record("one process", _child(serial, "folder", str(folder), "all"))
    for name, runs in rows.items():
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "measure"}
        print(json.dumps({"measure": name, "median": medians, "repeats": len(runs)}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--photos", action="store_true", help="the folder of 60,000 JPEGs (see above)")
    parser.add_argument("--folder", type=Path, default=PHOTO_FOLDER, help=f"default: {PHOTO_FOLDER}")
    parser.add_argument("--repeats", type=int, default=None, help="default: 5, or 3 with --photos")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        if args.child and args.child[0] == "folder":
            folder, splits, *size = args.child[1:]
            print(json.dumps(measure_folder(folder, splits, int(size[0]) if size else None)))
        else:
            print(json.dumps(measure_once(args.dataset)))
        return
    from cnnkit.device import machine_line

    print(f"# machine: {machine_line()}", file=sys.stderr, flush=True)  # with every figure
    if args.photos:
        bench_photos(args.folder, args.repeats or 3)
        return
    runs = []
    for _ in range(args.repeats or 5):
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
