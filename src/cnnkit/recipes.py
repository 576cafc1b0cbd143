"""Training recipes: the hyperparameters of a run, and the learning-rate schedule they imply.

Kept free of torch so that the command line can show its options without loading PyTorch.
"""

import dataclasses
import math
from dataclasses import asdict, dataclass

LR_SCHEDULES = ("constant", "one-cycle")
AUGMENTATIONS = ("none", "affine")


@dataclass(frozen=True)
class TrainConfig:
    """The chapter's recipe as defaults: Adam at 1e-4, batch 64, dropout 0.5, 20 epochs, shuffled.

    learning_rate is the peak of a "one-cycle" schedule (see `learning_rate_at`); label_smoothing
    mixes that much of a uniform distribution into the targets (0: plain cross-entropy).

    augment "affine" transforms every training image afresh each epoch (see `cnnkit.augment`): rotated
    by up to +-rotate degrees, sheared by up to +-shear degrees, scaled by a factor in [scale_low,
    scale_high], shifted by up to +-shift pixels each way; `flip` mirrors half of the images left-right
    (for datasets where a mirrored image keeps its class; never digits). The ranges apply only to
    "affine"; `flip` works with either.
    """

    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-4
    dropout_rate: float = 0.5
    shuffle: bool = True
    seed: int = 123
    build: str = "layers"
    precision: str = "fp32"  # "fp32" or "bf16" (resolved; see cnnkit.device.resolve_precision)
    lr_schedule: str = "constant"
    label_smoothing: float = 0.0
    recipe: str = "chapter"
    patience: int = 0  # early stopping: epochs without a better validation loss (0: never stop early)
    keep: int = 0  # checkpoints kept: the newest `keep` and the best (0: all)
    augment: str = "none"
    rotate: float = 12.0
    shift: float = 2.5
    scale_low: float = 0.9
    scale_high: float = 1.1
    shear: float = 10.0
    flip: bool = False

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("patience", "keep"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate must be positive and finite, got {self.learning_rate}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if not 0 <= self.rotate <= 180:
            raise ValueError(f"rotate must be 0 to 180 degrees, got {self.rotate}")
        if not 0 <= self.shear < 80:
            raise ValueError(f"shear must be 0 to under 80 degrees, got {self.shear}")
        if not 0 <= self.shift < math.inf:
            raise ValueError(f"shift must be a non-negative number of pixels, got {self.shift}")
        if not 0 < self.scale_low <= self.scale_high < math.inf:
            raise ValueError(f"scale must be LO,HI with 0 < LO <= HI, got {self.scale_low},{self.scale_high}")

    @property
    def augments(self) -> bool:
        """Whether training images are transformed at all."""
        return self.augment != "none" or self.flip

    def to_dict(self) -> dict:
        return asdict(self)


# --recipe: "chapter" is the chapter's schedule exactly; "fast" buys accuracy per second on a CPU
# (measured on Fashion-MNIST: see the README's performance section for how it was chosen).
RECIPES = {
    "chapter": TrainConfig(),
    "fast": TrainConfig(
        epochs=7,
        batch_size=256,
        learning_rate=4e-3,
        dropout_rate=0.3,
        lr_schedule="one-cycle",
        label_smoothing=0.1,
        recipe="fast",
    ),
    "accurate": TrainConfig(
        epochs=60,
        batch_size=64,
        learning_rate=1e-3,
        dropout_rate=0.5,
        lr_schedule="one-cycle",
        label_smoothing=0.1,
        augment="affine",
        recipe="accurate",
    ),
}

AFFINE_RANGES = ("rotate", "shift", "scale_low", "scale_high", "shear")

# Settings a recipe may choose by the dataset (`for_dataset`), unless the user set them.
DATASET_DEFAULTS = ("epochs", "augment", "flip")

# The accurate recipe trains for about this many images in all (epochs x training images), within
# ACCURATE_EPOCHS: 59 epochs of mnist-5k's 4,050 (after validation), 30 of Fashion-MNIST's 58,000
# (whose validation accuracy rose from 93.15% at 15 epochs to 93.8% at 30).
ACCURATE_IMAGES = 240_000
ACCURATE_EPOCHS = (30, 60)


def describe_augmentation(config: TrainConfig) -> str:
    """The augmentation in words, e.g. "affine (rotate +-12 deg, shift +-2.5 px, scale 0.9-1.1, shear +-10 deg)"."""
    parts = []
    if config.augment == "affine":
        parts.append(
            f"affine (rotate +-{config.rotate:g} deg, shift +-{config.shift:g} px, "
            f"scale {config.scale_low:g}-{config.scale_high:g}, shear +-{config.shear:g} deg)"
        )
    if config.flip:
        parts.append("left-right flips")
    return " and ".join(parts) or "none"


def for_dataset(
    config: TrainConfig, preprocessing: str, n_train: int, choose=DATASET_DEFAULTS
) -> TrainConfig:
    """`config` with the settings in `choose` made for the dataset, where its recipe says how.

    The accurate recipe gives digits and drawings ("digit", "resize-dark") random affine transforms,
    and objects and photos ("object", "resize") left-right mirrors instead (not digits: a mirrored 2 is
    no 2; affine transforms lowered Fashion-MNIST's validation accuracy, see the README), and trains
    longer on fewer images (ACCURATE_IMAGES). Other recipes are the same for every dataset.
    """
    if config.recipe != "accurate":
        return config
    objects = preprocessing in ("object", "resize")
    changes = {}
    if "augment" in choose:
        changes["augment"] = "none" if objects else "affine"
    if "flip" in choose:
        changes["flip"] = objects
    if "epochs" in choose:
        low, high = ACCURATE_EPOCHS
        changes["epochs"] = min(high, max(low, round(ACCURATE_IMAGES / max(n_train, 1))))
    return dataclasses.replace(config, **changes)


def default_valid_size(recipe: str, n_train: int) -> int:
    """Validation images set aside when --valid-size is not given.

    The chapter keeps 10,000 of MNIST's 60,000 (a sixth of smaller sets); the fast and accurate recipes
    keep only 2,000 or a tenth of the training split, whichever is smaller (validation costs time every
    epoch, and every image trained on counts).
    """
    if recipe in ("fast", "accurate"):
        return min(2000, n_train // 10)
    return min(10_000, n_train // 6)


def learning_rate_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based, counted over the whole run).

    "constant" is the chapter's. "one-cycle" warms up over the first 25% of the steps from lr/25 to
    lr along half a cosine, then anneals along half a cosine to lr/10^4, as PyTorch's OneCycleLR;
    being a function of the step alone, it resumes exactly.
    """
    peak = config.learning_rate
    if config.lr_schedule == "constant":
        return peak
    progress = step / max(total_steps, 1)
    warmup = 0.25
    if progress < warmup:
        start, end, t = peak / 25, peak, progress / warmup
    else:
        start, end, t = peak, peak / 1e4, (progress - warmup) / (1 - warmup)
    return end + (start - end) * (1 + math.cos(math.pi * min(t, 1.0))) / 2


# int8 inference observes activation ranges on this many (training) images.
CALIBRATION_IMAGES = 512
