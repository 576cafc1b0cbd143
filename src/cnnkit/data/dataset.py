"""The dataset object, the validation split, standardization and mini-batches.

Images are always (N, C, H, W): uint8 0..255 for image sources, float32 for arrays that arrive
already scaled. Labels are int64 indices into `Dataset.class_names`.
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from cnnkit.data.budget import MemoryBudget, array_bytes
from cnnkit.errors import DatasetError
from cnnkit.images import PREPROCESSING

SPLIT_NAMES = ("train", "valid", "test")
# A Split named "all" holds every image of a dataset (`cnnkit evaluate --split all`); no Dataset has one.
ALL_SPLIT = "all"

# The most classes a dataset (or a checkpoint) may have: far beyond any image dataset cnnkit trains
# (ImageNet has 1,000), and small enough that class names and a network's last layer stay small.
MAX_CLASSES = 10_000

# The most bytes one array read from a file (an IDX file's data, an npz member) may declare. A header
# is a promise the reader checks before allocating, so a 3 MB file cannot claim 6 GB of memory.
MAX_ARRAY_BYTES = 2 * 1024**3
MAX_ARRAY_TEXT = "2 GiB"

DIGITS = tuple(str(d) for d in range(10))

# The chapter keeps the last 10,000 of MNIST's 60,000 training images for validation.
CHAPTER_VALID_SIZE = 10_000

# The most values `infer_preprocessing` looks at (64 MB as float32): 1,000 images of up to 3 x 64 x 64,
# fewer of larger ones, and one image larger than that every k-th pixel.
SAMPLE_VALUES = 2**24


def images_as_nchw(x, allow_nhwc: bool = False) -> np.ndarray:
    """Numeric images given as rows of H*W values (square, one channel), (N, H, W) or (N, C, H, W), and
    with `allow_nhwc` also (N, H, W, C) with 1 or 3 channels, as a view or reshape in (N, C, H, W).

    Raises ValueError saying what was wrong; callers name the file or argument it came from.
    """
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"has dtype {x.dtype}; expected numbers")
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(
                f"rows of {x.shape[1]} values are not square images (784 = 28 x 28 is); "
                "give (N, H, W) or (N, C, H, W) instead"
            )
        return x.reshape(len(x), 1, side, side)
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and allow_nhwc and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    if x.ndim == 4 and (not allow_nhwc or x.shape[1] in (1, 3)):
        return x
    forms = (
        "(N, H*W), (N, H, W), (N, H, W, C) or (N, C, H, W)"
        if allow_nhwc
        else "(N, H*W), (N, H, W) or (N, C, H, W)"
    )
    raise ValueError(f"has shape {x.shape}; expected {forms}")


@dataclass(frozen=True, eq=False)
class Split:
    """One part of a dataset: `images` (N, C, H, W), `labels` (N,) int64, `name` "train", "valid" or "test"
    (or "all": every image of a dataset, scored at once)."""

    images: np.ndarray
    labels: np.ndarray
    name: str

    def __post_init__(self):
        if self.name not in (*SPLIT_NAMES, ALL_SPLIT):
            raise DatasetError(
                f"split name {self.name!r} is not one of {', '.join(SPLIT_NAMES)}, {ALL_SPLIT}"
            )
        object.__setattr__(self, "images", np.asarray(self.images))
        if self.images.ndim != 4:
            raise DatasetError(f"{self.name} images have shape {self.images.shape}; expected (N, C, H, W)")
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or len(labels) != len(self.images):
            raise DatasetError(
                f"{self.name} split has {len(self.images)} images but labels of shape {labels.shape}"
            )
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images with labels in up to three splits, and the names of the classes the labels index.

    `name` is the source string the dataset was loaded from (e.g. "mnist-5k", "idx:data/mnist").
    A missing split is None; at least one is present, and all share one image shape. At most
    MAX_CLASSES class names.

    `preprocessing` says how `cnnkit predict` brings a user's photo to the model's input, matching
    how this dataset's images were made (see `cnnkit.images.prepare_for_model`): "digit" (MNIST),
    "object" (Fashion-MNIST) or "resize". `notes` are one-line facts about how the data was loaded
    (e.g. the image size chosen), which the training command logs. `test_files` lists the files (paths
    relative to the folder) that a `folder:DIR` without train/ and test/ held out as its test split, for
    a trained model's record; None for every other dataset.
    """

    name: str
    class_names: list[str]
    train: Split | None = None
    valid: Split | None = None
    test: Split | None = None
    preprocessing: str = "resize"
    notes: tuple[str, ...] = ()
    test_files: tuple[str, ...] | None = None

    def __post_init__(self):
        splits = self.splits
        if not splits:
            raise DatasetError(f"{self.name}: dataset has no train, valid or test split")
        if len(self.class_names) > MAX_CLASSES:
            raise DatasetError(
                f"{self.name}: {len(self.class_names):,} classes is over cnnkit's limit of {MAX_CLASSES:,}"
            )
        if self.preprocessing not in PREPROCESSING:
            raise DatasetError(
                f"{self.name}: preprocessing {self.preprocessing!r} is not one of {', '.join(PREPROCESSING)}"
            )
        object.__setattr__(self, "notes", tuple(self.notes))
        for split in splits:
            if split.images.shape[1:] != splits[0].images.shape[1:]:
                raise DatasetError(
                    f"{self.name}: {split.name} images are {shape_text(split.images.shape[1:])} but "
                    f"{splits[0].name} images are {shape_text(splits[0].images.shape[1:])}"
                )
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(self.class_names)):
                raise DatasetError(
                    f"{self.name}: {split.name} labels range {split.labels.min()}..{split.labels.max()} "
                    f"but there are {len(self.class_names)} class names"
                )

    @property
    def splits(self) -> list[Split]:
        """The splits present, in the order train, valid, test."""
        return [split for split in (self.train, self.valid, self.test) if split is not None]

    @property
    def nbytes(self) -> int:
        """The bytes of memory its images and labels take, an array shared by splits counted once."""
        return array_bytes(*(a for split in self.splits for a in (split.images, split.labels)))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(int(d) for d in self.splits[0].images.shape[1:])

    def split_validation(self, valid_size=None) -> "Dataset":
        """Return a new Dataset whose `valid` split is the last `valid_size` images of `train`.

        `valid_size` is a count (int), a fraction of the training split (float in (0, 1)), or 0 for
        no validation split. None means the chapter's 10,000, or a sixth of the training split when
        that is smaller: min(10000, len(train) // 6). The split is deterministic: no shuffling here
        (sources whose files are sorted by class are shuffled once, with a fixed seed, at load).
        """
        if self.train is None:
            raise DatasetError(f"{self.name}: no training split to take a validation split from")
        if self.valid is not None:
            raise DatasetError(f"{self.name}: the dataset already has a validation split")
        n = len(self.train)
        n_valid = _valid_count(valid_size, n)
        if n_valid == 0:
            return self
        keep = n - n_valid
        images, labels = self.train.images, self.train.labels
        return dataclasses.replace(
            self,
            train=Split(images[:keep], labels[:keep], "train"),
            valid=Split(images[keep:], labels[keep:], "valid"),
        )


def no_split_error(source: str, split: str) -> DatasetError:
    """The error for a split that a dataset does not have: for a test or validation split, with the
    ways to score the model another way."""
    if split == "train":
        return DatasetError(f"dataset {source!r} has no training images")
    return DatasetError(
        f"dataset {source!r} has no {split} split; try --split valid (the end of its training split), "
        "--split all (every image), or another --dataset"
    )


def infer_preprocessing_with_note(images, class_names, declare: str) -> tuple[str, tuple[str, ...]]:
    """`infer_preprocessing`'s choice, and the Dataset note that says it and how to `declare` another."""
    style, reason = infer_preprocessing(images, class_names)
    return style, (f"predict prepares photos as {style!r}: {reason}; declare another {declare}",)


def infer_preprocessing(images: np.ndarray, class_names) -> tuple[str, str]:
    """The preprocessing that matches how `images` (N, C, H, W) were made, with its reason in a few words.

    "digit" for gray 1 x 28 x 28 images on a dark background whose classes are the digits 0..9 (the
    MNIST kind); "object" for other gray images on a dark background whose object fills the frame
    (the Fashion-MNIST kind: a user's dark-on-light photo is inverted, cropped, fitted and centred to
    match); "resize-dark" for gray pictures on a dark background that do not fill their frame (shapes,
    drawings: inverted if need be and resized, so size and position survive); "resize" for color images
    and for images on a light background, which `predict` takes as stored (see
    `cnnkit.images.prepare_for_model` for why "resize" never inverts).

    Gray means one channel, or three nearly equal ones. An image's background is the median of its
    border pixels; the data's background is dark when the median of those lies below the middle of the
    value range (0..255 for uint8, min..max otherwise). At most 1,000 evenly spaced images are looked at,
    fewer where they would hold more than SAMPLE_VALUES values, and an image larger than that every k-th
    pixel in each direction.
    """
    images = np.asarray(images)
    n, channels, height, width = images.shape
    if n == 0 or channels not in (1, 3):
        return "resize", f"images with {channels} channel(s)" if n else "no images to look at"
    count = max(1, min(1000, SAMPLE_VALUES // max(1, channels * height * width)))
    step = max(1, math.ceil(math.sqrt(channels * height * width / SAMPLE_VALUES)))
    sample = images[:: max(1, n // count)][:count, :, ::step, ::step].astype(np.float32)
    low, high = (0.0, 255.0) if images.dtype == np.uint8 else (float(sample.min()), float(sample.max()))
    span = max(high - low, 1e-12)
    if channels == 3 and np.abs(np.diff(sample, axis=1)).mean() / span > 0.01:
        return "resize", "color images"
    gray = sample[:, 0] if channels == 1 else sample.mean(axis=1)
    border = np.concatenate([gray[:, 0, :], gray[:, -1, :], gray[:, 1:-1, 0], gray[:, 1:-1, -1]], axis=1)
    if (np.median(np.median(border, axis=1)) - low) / span >= 0.5:
        return "resize", "images on a light background"
    if (channels, height, width) == (1, 28, 28) and tuple(class_names) == DIGITS:
        return "digit", "gray 28x28 images of the digits 0-9 on a dark background, like MNIST"
    if _fills_frame(gray, low + 0.2 * span):
        return "object", "gray objects that fill the frame on a dark background, like Fashion-MNIST"
    return "resize-dark", "gray pictures on a dark background that do not fill their frame"


def _fills_frame(gray: np.ndarray, threshold: float) -> bool:
    """True when in most images (N, H, W) the pixels above `threshold` span at least 85% of the frame's
    height or width, as in Fashion-MNIST, whose objects were scaled until their longer side filled it."""
    rows, cols = (gray > threshold).any(axis=2), (gray > threshold).any(axis=1)

    def extent(mask):
        first, last = mask.argmax(axis=1), mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        return np.where(mask.any(axis=1), last - first + 1, 0) / mask.shape[1]

    return float(np.mean(np.maximum(extent(rows), extent(cols)) >= 0.85)) >= 0.75


def _valid_count(valid_size, n: int) -> int:
    if valid_size is None:
        return min(CHAPTER_VALID_SIZE, n // 6)
    if isinstance(valid_size, bool) or not isinstance(valid_size, int | float | np.integer | np.floating):
        raise DatasetError(f"valid_size must be a count or a fraction, got {valid_size!r}")
    if isinstance(valid_size, float | np.floating):
        if not 0 < valid_size < 1:
            raise DatasetError(f"valid_size={valid_size}: a fraction must lie strictly between 0 and 1")
        count = round(valid_size * n)
        if count == 0:
            raise DatasetError(f"valid_size={valid_size} of {n} training images is less than one image")
    else:
        count = int(valid_size)
        if count < 0:
            raise DatasetError(f"valid_size={count}: must not be negative")
    if count >= n and count > 0:
        raise DatasetError(
            f"valid_size={valid_size} leaves no training images (the training split has {n:,}); "
            "use a smaller count or a fraction such as 0.1"
        )
    return count


@dataclass(frozen=True)
class Standardization:
    """Per-channel mean and standard deviation, fitted on the training split and reused everywhere.

    `apply` maps images to float32 (x - mean) / std. A channel whose std is 0 uses 1, so a constant
    channel becomes 0 instead of NaN. `to_dict`/`from_dict` make it JSON-able for checkpoints.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if not mean or len(mean) != len(std):
            raise DatasetError(
                f"standardization needs one mean and one std per channel, got {mean} and {std}"
            )
        if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
            raise DatasetError(f"standardization needs finite means and positive stds, got {mean} and {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def fit(cls, images) -> "Standardization":
        """Compute each channel's mean and std over (N, H, W) of `images` (N, C, H, W), in float64.

        Pass the training images only: validation and test data must not influence the statistics.
        """
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[0] == 0:
            raise DatasetError(f"cannot fit a standardization to images of shape {images.shape}")
        means, stds = [], []
        for c in range(images.shape[1]):
            mean, std = _mean_std(images[:, c])
            means.append(mean)
            stds.append(std if std > 0 else 1.0)
        return cls(tuple(means), tuple(stds))

    def apply(self, images) -> np.ndarray:
        """Return `images` (..., C, H, W) standardized as a new float32 array of the same shape.

        The new array is first reserved in a MemoryBudget (cnnkit.data.budget) holding `images`:
        DatasetError when the two do not fit the data memory budget.
        """
        images = np.asarray(images)
        if images.ndim < 3 or images.shape[-3] != len(self.mean):
            raise DatasetError(
                f"images of shape {images.shape} do not have the {len(self.mean)} channel(s) "
                "this standardization was fitted on"
            )
        MemoryBudget(held=array_bytes(images)).reserve(
            4 * images.size, f"{shape_text(images.shape)} images standardized as float32"
        )
        out = images.astype(np.float32)
        out -= np.array(self.mean, dtype=np.float32)[:, None, None]
        out /= np.array(self.std, dtype=np.float32)[:, None, None]
        return out

    def to_dict(self) -> dict:
        """{"mean": [...], "std": [...]}, one float per channel."""
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d) -> "Standardization":
        """The inverse of `to_dict`."""
        try:
            return cls(tuple(d["mean"]), tuple(d["std"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"standardization data {d!r} is malformed ({exc!r})") from None


def _mean_std(channel: np.ndarray) -> tuple[float, float]:
    # Two passes in float64 over chunks of about a million values: exact enough for any data, and
    # never a float64 copy of the whole array (60,000 MNIST images would need 376 MB).
    n = channel.size
    total = 0.0
    for chunk in _value_chunks(channel):
        total += chunk.sum(dtype=np.float64)
    mean = total / n
    squares = 0.0
    for chunk in _value_chunks(channel):
        squares += np.square(chunk.astype(np.float64) - mean).sum()
    return mean, float(np.sqrt(squares / n))


def _value_chunks(channel: np.ndarray, size: int = 2**20):
    """`channel` (N, H, W) in pieces of at most about `size` values: runs of whole images, or slices of
    one image where a single image holds more."""
    per_image = max(1, channel[0].size)
    if per_image <= size:
        step = size // per_image
        for start in range(0, len(channel), step):
            yield channel[start : start + step]
        return
    for image in channel:
        values = image.reshape(-1)
        for start in range(0, values.size, size):
            yield values[start : start + size]


def minibatch_indices(n: int, batch_size: int = 64, shuffle: bool = True, seed=None, epoch: int = 1):
    """Split range(n) into mini-batches: a list of int64 index arrays, the last one possibly shorter.

    With `shuffle`, the order of epoch k is a permutation that depends only on (seed, k), so a resumed
    run sees the same batches; `seed=None` draws fresh entropy. Without `shuffle`, indices are in order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if n < 0:
        raise ValueError(f"cannot make mini-batches of {n} items")
    if not shuffle:
        order = np.arange(n, dtype=np.int64)
    elif seed is None:
        order = np.random.default_rng().permutation(n)
    else:
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must not be negative, got seed={seed}, epoch={epoch}")
        order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[start : start + batch_size] for start in range(0, n, batch_size)]


def iterate_minibatches(X, y, batch_size: int = 64, shuffle: bool = True, seed=None, epoch: int = 1):
    """Yield (X[idx], y[idx]) for each index array of `minibatch_indices(len(y), ...)`.

    The chapter's `batch_generator`, with a per-epoch order that depends only on (seed, epoch).
    """
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    for idx in minibatch_indices(len(y), batch_size, shuffle, seed, epoch):
        yield X[idx], y[idx]


def shape_text(shape) -> str:
    """A shape as people write it: (1, 28, 28) -> "1 x 28 x 28"."""
    return " x ".join(str(d) for d in shape)
