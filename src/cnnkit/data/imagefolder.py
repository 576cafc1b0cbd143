"""The `folder:DIR` source: one sub-folder of image files per class, like torchvision's ImageFolder.

Also home to `conform_images`, which brings uint8 images to one size and channel count for any source.
"""

from collections import Counter
from pathlib import Path

import numpy as np

from cnnkit.data.budget import MemoryBudget
from cnnkit.data.dataset import Dataset, Split, infer_preprocessing_with_note, shape_text
from cnnkit.errors import DatasetError
from cnnkit.images import image_shape, read_image, resize_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")

# Files sorted by class would put only the last classes in the last-N validation split.
SHUFFLE_SEED = 0

# The default image size is the most common one, scaled down (aspect ratio kept) to at most this many
# pixels on its longer side: a 12-megapixel photo is far more than a small CNN can use.
MAX_DEFAULT_SIDE = 64


def load_image_folder(folder, *, image_size=None, channels=None, name=None, preprocessing=None) -> Dataset:
    """Load DIR/CLASS/*.png (and .jpg, .jpeg, .bmp, .gif; other files are ignored) as a Dataset.

    If DIR holds `train/` and/or `test/` folders of class folders, those are the splits; otherwise
    every image is training data. Class names are the class folder names, sorted. Images are read
    upright (EXIF orientation applied) and brought to `image_size` (H, W) and `channels` 1 or 3.
    The default size is the most common one capped at MAX_DEFAULT_SIDE (see `default_image_size`);
    the default channels 1 if every image is grayscale, else 3. RGBA is composited over white.

    Image sizes come from the files' headers first; then each image is decoded reduced where it is
    much larger than `image_size` and resized at once, so full-size images are never all in memory;
    each split's array is reserved in a MemoryBudget (cnnkit.data.budget) before it is made.
    The training split is shuffled with a fixed seed (0), so its last images make a representative
    validation split. `preprocessing` None infers it from the images (`infer_preprocessing`); the
    dataset's `notes` say which size and preprocessing were chosen and why.
    Raises DatasetError for an empty folder or class, FileError naming any unreadable image.
    """
    root = Path(folder)
    name = name or f"folder:{folder}"
    if not root.is_dir():
        raise DatasetError(
            f"{root}: not a folder (folder:DIR needs a folder with one sub-folder of images per class)"
        )
    split_roots = {split: root / split for split in ("train", "test") if _class_folders(root / split)}
    split_roots = split_roots or {"train": root}
    files = {split: {c.name: _image_files(c) for c in _class_folders(r)} for split, r in split_roots.items()}
    class_names = sorted({c for per_class in files.values() for c in per_class})
    if not class_names:
        raise DatasetError(
            f"{root}: no class folders; put each class's images in a sub-folder, e.g. {root}/cat/1.png"
        )
    for split, per_class in files.items():
        for class_name, paths in per_class.items():
            if not paths:
                raise DatasetError(
                    f"{split_roots[split] / class_name}: class folder holds no {'/'.join(IMAGE_SUFFIXES)} images"
                )

    labelled = {
        split: [(path, class_names.index(c)) for c, paths in per_class.items() for path in paths]
        for split, per_class in files.items()
    }
    shapes = [image_shape(path) for pairs in labelled.values() for path, _ in pairs]
    notes = []
    if image_size is None:
        image_size, note = default_image_size([shape[:2] for shape in shapes])
        notes.append(note)
    if channels is None:
        channels = 1 if all(shape[2] == 1 for shape in shapes) else 3
    image_size, channels = check_image_size(image_size), check_channels(channels)

    splits, budget = {}, MemoryBudget()
    for split, pairs in labelled.items():
        if split == "train":  # read in the shuffled order: no second copy of the images
            pairs = [pairs[i] for i in np.random.RandomState(SHUFFLE_SEED).permutation(len(pairs))]
        shape = (len(pairs), channels, *image_size)
        budget.reserve(
            len(pairs) * (channels * image_size[0] * image_size[1] + 8),
            f"{split_roots[split]}: {shape_text(shape)} uint8 images",
        )
        images = np.empty(shape, dtype=np.uint8)
        for i, (path, _) in enumerate(pairs):
            image = read_image(path, min_size=image_size)
            images[i] = resize_image(image, image_size, channels).transpose(2, 0, 1)
        labels = np.array([label for _, label in pairs], dtype=np.int64)
        splits[split] = Split(images, labels, split)
    if preprocessing is None:
        first = next(iter(splits.values()))
        preprocessing, note = infer_preprocessing_with_note(
            first.images, class_names, f"in {root / 'preprocessing.txt'}"
        )
        notes.extend(note)
    return Dataset(name, class_names, **splits, preprocessing=preprocessing, notes=tuple(notes))


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


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
