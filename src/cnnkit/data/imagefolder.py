"""The `folder:DIR` source: one sub-folder of image files per class, like torchvision's ImageFolder.

Reading a folder is one pass over its files: each is opened once, decoded (reduced where it is much
larger than needed), resized and kept as uint8, in worker processes on every CPU, with a progress bar
on a terminal. The arrays are cached on disk (`cnnkit.data.cache`), keyed by every file's path, size
and modification time, the image size and the channels, so the next command reads them back instead of
decoding; a command asks only for the splits it needs (`splits`).

Also home to `conform_images`, which brings uint8 images to one size and channel count for any source.
"""

import contextlib
import hashlib
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL
from PIL import Image

from cnnkit.data import cache
from cnnkit.data.budget import MemoryBudget
from cnnkit.data.dataset import (
    Dataset,
    Split,
    infer_preprocessing_with_note,
    no_split_error,
    shape_text,
)
from cnnkit.errors import CnnkitError, DatasetError, FileError, one_line
from cnnkit.images import image_shape, read_image_and_shape, resize_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

# Files sorted by class would put only the last classes in the last-N validation split.
SHUFFLE_SEED = 0

# The default image size is the most common one, scaled down (aspect ratio kept) to at most this many
# pixels on its longer side: a 12-megapixel photo is far more than a small CNN can use.
MAX_DEFAULT_SIDE = 64

# A folder without train/ and test/ holds out a test split: a sixth of each class (at most HELD_OUT_MAX
# images in all), the files whose SHA-256 of "HELD_OUT_SEED/relative path" is smallest. A hash rather
# than a shuffle: a file added to or removed from a class moves no file of another class between the
# splits, and at most one of its own.
HELD_OUT_SHARE = 1 / 6
HELD_OUT_MAX = 10_000
HELD_OUT_SEED = 0

# `test_files` value: every image of a folder without train/ and test/ is test data.
ALL_TEST = "all"

# The default size and channels are guessed from this many headers, then checked against every image
# decoded; a wrong guess (rare: a most common size that the sample missed) decodes the images again.
SAMPLE_HEADERS = 256

# Decoding runs in processes, not threads: for small photos most of the time goes to Python code around
# Pillow's decoder (parsing the JPEG's header, setting up the decoder), which holds the GIL: measured once,
# 6,000 32x32 JPEGs on 2 CPUs took 0.84 s in one thread and 1.65 s in two. $CNNKIT_DATA_WORKERS sets the number of
# processes (1: decode in the calling process); by default one per CPU this process may use
# (cnnkit.threads.available_cpus), for folders of at least PARALLEL_MIN_FILES images (starting them
# costs more than a small folder takes). benchmarks/bench_data.py --photos measures both.
WORKERS_ENV = "CNNKIT_DATA_WORKERS"
PARALLEL_MIN_FILES = 512
MAX_CHUNK_FILES = 256
CHUNK_BYTES = 16 * 1024**2  # a task's images: what each worker holds and sends back at a time

# Part of every cache key: raise it when the pixels decoded from the same file change.
CACHE_FORMAT = 1

# A file modified less than this before it was listed may change again within the same tick of the
# file system's clock, keeping its size and modification time: such a folder is read but not cached.
# File systems that keep whole seconds (FAT, some network mounts) get the longer margin.
RACY_NS = 50_000_000
RACY_COARSE_NS = 2_000_000_000


class ImageFile(NamedTuple):
    """One image file of a folder: `path` to open, `relative` (to DIR, with "/"), its size and mtime."""

    path: str
    relative: str
    size: int
    mtime_ns: int
    label: int


class _Part(NamedTuple):
    """A split to read: its name, the folder that error messages name, and its files in the order read."""

    name: str
    where: Path
    files: list


def load_image_folder(
    folder,
    *,
    image_size=None,
    channels=None,
    name=None,
    preprocessing=None,
    splits=None,
    test_files=None,
    progress=None,
) -> Dataset:
    """Load DIR/CLASS/*.png (and .jpg, .jpeg, .bmp, .gif; other files are ignored) as a Dataset.

    If DIR holds `train/` and/or `test/` folders of class folders, those are the splits. Otherwise
    `test_files` says which images are the test split: None holds out about a sixth of each class (at
    most HELD_OUT_MAX in all, chosen by a seeded hash of each file's path; `Dataset.test_files` lists
    them, for a trained model's record); a sequence of paths relative to DIR holds out those (files
    since removed are skipped, with a note); () holds out none (every image is training data); ALL_TEST
    makes every image test data. `splits` (of "train", "test") are the splits to read (default: every
    one present); DatasetError when none of them is there.

    Class names are the class folder names, sorted. Images are read upright (EXIF orientation applied)
    and brought to `image_size` (H, W) and `channels` 1 or 3. The default size is the most common one
    among the images read, capped at MAX_DEFAULT_SIDE (see `default_image_size`); the default channels
    1 if every image read is grayscale, else 3. RGBA is composited over white.

    Each file is opened once: decoded, reduced where it is much larger than `image_size`, and resized,
    in worker processes ($CNNKIT_DATA_WORKERS, default one per CPU), with a progress bar on stderr
    (`progress`: None on a terminal only, True always, False never). The arrays are cached on disk
    (`cnnkit.data.cache`), and each split's array is reserved in a MemoryBudget before it is decoded or
    read back. The training split is shuffled with a fixed seed (0), so its last images make a
    representative validation split. `preprocessing` None infers it from the images
    (`infer_preprocessing`); the dataset's `notes` say which size and preprocessing were chosen and why.
    Raises DatasetError for an empty folder or class, FileError naming any unreadable image.
    """
    root = Path(folder)
    name = name or f"folder:{folder}"
    listed_at = time.time_ns()
    if not root.is_dir():
        raise DatasetError(
            f"{root}: not a folder (folder:DIR needs a folder with one sub-folder of images per class)"
        )
    parts, class_names, held_out, notes = _plan(root, name, test_files, splits)
    image_size = None if image_size is None else check_image_size(image_size)
    channels = None if channels is None else check_channels(channels)
    arrays, size_note = _read_parts(root, name, parts, image_size, channels, progress, listed_at)
    notes = ([size_note] if size_note else []) + notes
    made = {
        part.name: Split(images, np.array([f.label for f in part.files], dtype=np.int64), part.name)
        for part, images in zip(parts, arrays, strict=True)
    }
    if preprocessing is None:
        preprocessing, note = infer_preprocessing_with_note(
            next(iter(made.values())).images, class_names, f"in {root / 'preprocessing.txt'}"
        )
        notes.extend(note)
    if cache.cache_limit():
        notes.append(
            f"decoded images are cached in {cache.cache_folder()} (${cache.LIMIT_ENV} megabytes bounds it; "
            "0 turns it off)"
        )
    return Dataset(
        name, class_names, **made, preprocessing=preprocessing, notes=tuple(notes), test_files=held_out
    )


def _plan(root: Path, name: str, test_files, splits) -> tuple[list, list, tuple | None, list]:
    """The splits to read (as _Parts), the class names, the held-out test files (or None) and notes."""
    split_roots = {split: root / split for split in ("train", "test") if _class_folders(root / split)}
    flat = not split_roots
    split_roots = split_roots or {"train": root}
    wanted = ("train", "test") if splits is None else tuple(splits)
    folders = {split: _class_folders(folder) for split, folder in split_roots.items()}
    class_names = sorted({c.name for found in folders.values() for c in found})
    listed = {  # only the splits read; a folder without train/ and test/ is all one
        split: {c.name: _list_images(c, root, class_names.index(c.name)) for c in found}
        for split, found in folders.items()
        if flat or split in wanted
    }
    if not class_names:
        raise DatasetError(
            f"{root}: no class folders; put each class's images in a sub-folder, e.g. {root}/cat/1.png"
        )
    for split, per_class in listed.items():
        for class_name, files in per_class.items():
            if not files:
                raise DatasetError(
                    f"{split_roots[split] / class_name}: class folder holds no "
                    f"{'/'.join(IMAGE_SUFFIXES)} images"
                )
    labelled = {
        split: [f for files in per_class.values() for f in files] for split, per_class in listed.items()
    }
    held_out, notes = None, []
    if flat:
        labelled, held_out, notes = _hold_out(root, labelled["train"], test_files)
    parts = []
    for split in ("train", "test"):
        files = labelled.get(split)
        if split not in wanted or not files:
            continue
        if split == "train":  # read in the shuffled order: no second copy of the images
            files = [files[i] for i in np.random.RandomState(SHUFFLE_SEED).permutation(len(files))]
        parts.append(_Part(split, split_roots.get(split, root), files))
    if not parts:
        raise no_split_error(name, " or ".join(wanted))
    return parts, class_names, held_out, notes


def _hold_out(root: Path, files: list, test_files) -> tuple[dict, tuple | None, list]:
    """A flat folder's files as {"train": [...], "test": [...]}, the held-out files to record, and notes."""
    notes = []
    if test_files is None:
        chosen = held_out_files(files)
        if chosen:
            notes.append(
                f"no train/ or test/ folder: {len(chosen):,} of the {len(files):,} images (about a sixth "
                "of each class, chosen by a seeded hash of their paths) are held out as the test split; "
                "a model trained on the rest records which"
            )
    elif isinstance(test_files, str):
        if test_files != ALL_TEST:
            raise DatasetError(
                f"test_files must be None, a sequence of paths or {ALL_TEST!r}, got {test_files!r}"
            )
        return {"test": files}, None, []
    else:
        wanted = set(test_files)
        present = {f.relative for f in files}
        chosen = wanted & present
        if len(chosen) < len(wanted):
            gone = sorted(wanted - present)
            notes.append(
                f"{len(gone):,} of the {len(wanted):,} images held out as the test split are no longer in "
                f"{root} (e.g. {gone[0]}); the test split is the {len(chosen):,} still there"
            )
    train = [f for f in files if f.relative not in chosen]
    test = [f for f in files if f.relative in chosen]
    return {"train": train, "test": test}, (tuple(sorted(chosen)) if chosen else None), notes


def held_out_files(files) -> set:
    """The relative paths of ImageFiles `files` that a folder without train/ and test/ holds out as its
    test split: of each class's n images round(HELD_OUT_SHARE * n) (a smaller share where the folder
    would hold out more than HELD_OUT_MAX, and never a class's last image), those whose SHA-256 of
    "HELD_OUT_SEED/path" is smallest."""
    by_class = {}
    for f in files:
        by_class.setdefault(f.label, []).append(f.relative)
    share = min(HELD_OUT_SHARE, HELD_OUT_MAX / max(1, len(files)))
    chosen = set()
    for relatives in by_class.values():
        count = min(int(len(relatives) * share + 0.5), len(relatives) - 1)
        ranked = sorted(relatives, key=lambda r: hashlib.sha256(f"{HELD_OUT_SEED}/{r}".encode()).digest())
        chosen.update(ranked[:count])
    return chosen


def _read_parts(root, name, parts, image_size, channels, progress, listed_at) -> tuple[list, str | None]:
    """Each part's images (N, C, H, W) uint8, read from the cache or decoded, and the note on the size
    chosen (None when `image_size` was given)."""
    use_cache = cache.cache_limit() > 0
    where = root.resolve()
    digests = [_listing_digest(part.files) for part in parts]
    fresh = [all(f.mtime_ns < listed_at - _racy_margin(f.mtime_ns) for f in part.files) for part in parts]
    size_note = None
    if image_size is None or channels is None:
        memo_key = cache.key("defaults", CACHE_FORMAT, where, image_size, channels, *digests)
        known = _defaults(cache.read_json(memo_key)) if use_cache else None
        if known is None:
            arrays, image_size, channels, size_note = _decode_with_defaults(
                name, parts, image_size, channels, progress
            )
            if use_cache and all(fresh):
                for images, digest in zip(arrays, digests, strict=True):
                    cache.write_images(_entry_key(where, image_size, channels, digest), images)
                cache.write_json(
                    memo_key, {"image_size": list(image_size), "channels": channels, "note": size_note}
                )
            return arrays, size_note
        image_size, channels, size_note = known
    arrays, budget = [], MemoryBudget()
    for part, digest, part_fresh in zip(parts, digests, fresh, strict=True):
        images = _allocate(budget, part, image_size, channels)
        entry = _entry_key(where, image_size, channels, digest)
        if not (use_cache and cache.read_images(entry, images)):
            _decode_into(images, part.files, f"{name} {part.name}", progress)
            if use_cache and part_fresh:
                cache.write_images(entry, images)
        arrays.append(images)
    return arrays, size_note


def _decode_with_defaults(name, parts, image_size, channels, progress):
    """Decode `parts` where the size or the channels are to be chosen from the images: guessed from
    SAMPLE_HEADERS headers, checked against every image decoded, and decoded again if the guess missed.
    Returns (arrays, image_size, channels, size note or None)."""
    paths = [f.path for part in parts for f in part.files]
    sample = []
    for path in paths[:: max(1, -(-len(paths) // SAMPLE_HEADERS))]:
        with contextlib.suppress(CnnkitError):  # a bad file is named by the decoding, in its place
            sample.append(image_shape(path))
    guess = (
        image_size or (default_image_size([s[:2] for s in sample])[0] if sample else (1, 1)),
        channels or (1 if all(s[2] == 1 for s in sample) else 3),
    )
    budget, arrays, shapes = MemoryBudget(), [], []
    for part in parts:
        arrays.append(_allocate(budget, part, *guess))
        shapes.append(_decode_into(arrays[-1], part.files, f"{name} {part.name}", progress))
    every = np.concatenate(shapes)
    note = None
    if image_size is None:
        image_size, note = default_image_size([(int(h), int(w)) for h, w in every[:, :2]])
    channels = channels or (1 if bool((every[:, 2] == 1).all()) else 3)
    if (image_size, channels) != guess:  # the sample missed the most common size or a color image
        arrays = None
        budget, arrays = MemoryBudget(), []
        for part in parts:
            arrays.append(_allocate(budget, part, image_size, channels))
            _decode_into(arrays[-1], part.files, f"{name} {part.name}", progress)
    return arrays, image_size, channels, note


def _allocate(budget: MemoryBudget, part: _Part, image_size, channels) -> np.ndarray:
    shape = (len(part.files), channels, *image_size)
    budget.reserve(
        len(part.files) * (channels * image_size[0] * image_size[1] + 8),
        f"{part.where}: {shape_text(shape)} uint8 images",
    )
    return np.empty(shape, dtype=np.uint8)


def _entry_key(where: Path, image_size, channels, digest: str) -> str:
    return cache.key("images", CACHE_FORMAT, PIL.__version__, where, tuple(image_size), channels, digest)


def _defaults(memo) -> tuple | None:
    """(image_size, channels, note) from a cached JSON object, or None when it is not one of those."""
    try:
        note = memo["note"]
        if note is not None and not isinstance(note, str):
            return None
        return check_image_size(tuple(memo["image_size"])), check_channels(memo["channels"]), note
    except (KeyError, TypeError, CnnkitError):
        return None


def _listing_digest(files) -> str:
    """SHA-256 of the files' relative paths, sizes and modification times, in order."""
    text = "\0".join(f"{f.relative}\0{f.size}\0{f.mtime_ns}" for f in files)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _racy_margin(mtime_ns: int) -> int:
    return RACY_COARSE_NS if mtime_ns % 1_000_000_000 == 0 else RACY_NS


# --- decoding: one pass over the files, in worker processes ---


def _decode_into(out: np.ndarray, files, what: str, progress) -> np.ndarray:
    """Decode `files` into `out` (N, C, H, W) uint8; returns each file's full-size (H, W, C), int32 (N, 3)."""
    n, channels, *size = out.shape
    shapes = np.empty((n, 3), dtype=np.int32)
    paths = [f.path for f in files]
    workers, forced = _workers(n)
    per_image = max(1, out[0].nbytes) if n else 1
    step = max(1, min(MAX_CHUNK_FILES, CHUNK_BYTES // per_image, -(-n // (workers * 4))))
    ranges = [(start, min(start + step, n)) for start in range(0, n, step)]
    with _progress_bar(n, what, progress) as bar:
        if workers > 1 or forced:
            _decode_in_processes(out, shapes, paths, ranges, workers, bar)
        else:
            for start, end in ranges:
                _, shapes[start:end] = _decode_files(paths[start:end], size, channels, out[start:end])
                bar.update(end - start)
    return shapes


def _decode_files(paths, size, channels, out=None) -> tuple[np.ndarray, np.ndarray]:
    """Decode image files into uint8 (N, channels, *size) (`out`, or a new array) and their full-size
    shapes (N, 3); the worker processes' task. Any failure is a FileError naming the file."""
    out = np.empty((len(paths), channels, *size), dtype=np.uint8) if out is None else out
    shapes = np.empty((len(paths), 3), dtype=np.int32)
    for i, path in enumerate(paths):
        try:
            image, shapes[i] = read_image_and_shape(path, min_size=size)
            out[i] = resize_image(image, size, channels).transpose(2, 0, 1)
        except CnnkitError:
            raise
        except Exception as exc:  # whatever goes wrong with one file is that file's error
            raise FileError(f"{path}: cannot read image ({one_line(exc)})") from None
    return out, shapes


def _decode_in_processes(out, shapes, paths, ranges, workers, bar):
    _, channels, *size = out.shape
    # Every Pillow plugin imported here, before the fork, not in each worker; the common formats first
    # (preinit), which Image.open tries in the order registered: init() alone would put JPEG 21st and
    # make each photo 30% slower to open.
    Image.preinit()
    Image.init()
    pool = ProcessPoolExecutor(min(workers, len(ranges)), mp_context=_context(), initializer=_worker_start)
    try:
        with warnings.catch_warnings():  # Python 3.12's warning on forking a process that runs threads
            warnings.simplefilter("ignore", DeprecationWarning)
            futures = {pool.submit(_decode_files, paths[s:e], size, channels): (s, e) for s, e in ranges}
        for future in as_completed(futures):
            start, end = futures.pop(future)
            try:
                out[start:end], shapes[start:end] = future.result()
            except CnnkitError as exc:  # raised in a worker: the same one line, without its traceback
                raise type(exc)(str(exc)) from None
            except BrokenProcessPool:
                raise FileError(
                    f"{paths[start]}: the process decoding it (or one of the next {end - start - 1:,} "
                    "files) ended unexpectedly: out of memory, or killed"
                ) from None
            bar.update(end - start)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _context():
    """Workers are forked where the platform allows it (Linux): a forked worker starts in milliseconds
    and, unlike a spawned one, never runs the user's __main__ script again (a script without an
    `if __name__ == "__main__":` guard would start workers of its own). It runs only Pillow and NumPy
    code, none of torch's or OpenMP's, so threads that the parent runs (the kernels' build) do not
    matter to it. macOS and Windows spawn their workers."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _worker_start():
    # Ctrl-C reaches every process of the terminal's group: the parent stops the pool and says so once.
    # A forked worker also drops the handlers the command line set (SIGTERM as an interrupt).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _workers(n_files: int) -> tuple[int, bool]:
    """(decoding processes, whether $CNNKIT_DATA_WORKERS asked for them); 1 decodes in this process."""
    text = os.environ.get(WORKERS_ENV, "").strip()
    if text:
        try:
            count = int(text)
        except ValueError:
            count = 0
        if count < 1:
            raise DatasetError(f"{WORKERS_ENV}={text!r}: expected a whole number of processes, at least 1")
        return count, count > 1
    from cnnkit.threads import available_cpus

    return (available_cpus() if n_files >= PARALLEL_MIN_FILES else 1), False


@contextlib.contextmanager
def _progress_bar(total: int, what: str, progress):
    """A tqdm bar on stderr, "decoding folder:DIR train: 12,000/50,000 images"; drawn on a terminal when
    `progress` is None, always when True, never when False."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = tqdm(
        total=total,
        desc=f"decoding {what}",
        bar_format="{desc}: {n:,}/{total:,} images |{bar}| {elapsed}<{remaining}",
        disable=not show,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.2,
        file=sys.stderr,
    )
    try:
        yield bar
    finally:
        bar.close()


def default_image_size(sizes) -> tuple[tuple[int, int], str]:
    """The most common of `sizes` ((H, W) pairs), scaled down to at most MAX_DEFAULT_SIDE on its longer
    side keeping the aspect ratio (each side rounded, at least 1), and a one-line note saying why."""
    (height, width), count = Counter(sizes).most_common(1)[0]
    scale = min(1.0, MAX_DEFAULT_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    chosen = f"{size[0]}x{size[1]} (height x width)"
    if scale < 1:
        return size, (
            f"images resized to {chosen}: the most common size {height}x{width}, capped at "
            f"{MAX_DEFAULT_SIDE} on the longer side"
        )
    if count == len(sizes):
        return size, f"images are {chosen}, the size of every image"
    return (
        size,
        f"images resized to {chosen}: the most common size, that of {count:,} of {len(sizes):,} images",
    )


def conform_images(
    images: np.ndarray, image_size=None, channels=None, budget: MemoryBudget | None = None, what="images"
) -> np.ndarray:
    """Bring uint8 images (N, C, H, W) to `image_size` (H, W) and `channels` (1 or 3); None keeps that part.

    Returns `images` itself when nothing changes; otherwise the new array is first reserved in `budget`
    (default: a MemoryBudget holding `images`), its error naming `what`. Resizing is bilinear without
    keeping the aspect ratio; RGB becomes gray by ITU-R 601-2 luma, gray becomes RGB by repetition.
    """
    n, c, h, w = images.shape
    image_size = (h, w) if image_size is None else check_image_size(image_size)
    channels = c if channels is None else check_channels(channels)
    if (c, h, w) == (channels, *image_size):
        return images
    if images.dtype != np.uint8:
        raise DatasetError(
            f"cannot resize or convert {images.dtype} images (only uint8 images can be brought to "
            f"image_size={image_size}, channels={channels})"
        )
    shape = (n, channels, *image_size)
    budget = budget if budget is not None else MemoryBudget(held=images.nbytes)
    budget.reserve(
        n * channels * image_size[0] * image_size[1], f"{what} resized to {shape_text(shape)} uint8"
    )
    out = np.empty(shape, dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = resize_image(image.transpose(1, 2, 0), image_size, channels).transpose(2, 0, 1)
    return out


def check_image_size(image_size) -> tuple[int, int]:
    """`image_size` as (H, W): an int n means (n, n). Raises DatasetError for anything else."""
    size = (image_size, image_size) if isinstance(image_size, int | np.integer) else image_size
    try:
        h, w = (int(d) for d in size)
        if h >= 1 and w >= 1 and (h, w) == tuple(size):
            return h, w
    except (TypeError, ValueError):
        pass
    raise DatasetError(f"image_size must be (height, width) in pixels, got {image_size!r}")


def check_channels(channels) -> int:
    """`channels` if it is 1 (grayscale) or 3 (RGB); otherwise DatasetError."""
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DatasetError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return int(channels)


def _class_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_images(folder: Path, root: Path, label: int) -> list[ImageFile]:
    """The image files in `folder` and its sub-folders (not hidden ones, nor links to folders) in the
    order their paths sort, each with its size and modification time (os.scandir, one stat a file)."""
    found = []

    def visit(directory: str, relative: str):
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            raise FileError(f"{directory}: cannot list the folder ({exc.strerror or exc})") from None
        for entry in entries:  # in name order, a sub-folder's files in its place: as paths sort
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    visit(entry.path, f"{relative}/{entry.name}")
                elif entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file():
                    info = entry.stat()
                    found.append(
                        ImageFile(
                            entry.path, f"{relative}/{entry.name}", info.st_size, info.st_mtime_ns, label
                        )
                    )
            except OSError as exc:
                raise FileError(f"{entry.path}: cannot read ({exc.strerror or exc})") from None

    visit(str(folder), folder.relative_to(root).as_posix())
    return found
