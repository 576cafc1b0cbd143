"""Training recipes: the hyperparameters of a run, and the learning-rate schedule they imply.

Kept free of torch so that the command line can show its options without loading PyTorch.
"""

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass, field, fields

LR_SCHEDULES = ("constant", "one-cycle")
OPTIMIZERS = ("adam", "sgd")
AUGMENTATIONS = ("none", "affine", "crop")


BUILDS = ("layers", "lowlevel")  # the chapter's two builds of the network (cnnkit.model)
NETWORKS = ("chapter", "resnet")  # cnnkit.model's network and cnnkit.resnet's
RECIPE_NAMES = ("chapter", "fast", "accurate", "photos")


def setting(
    default,
    expected: str,
    accept=None,
    *,
    help: str,
    option: str | None = None,
    metavar: str | None = None,
    choices: tuple | None = None,
    resumable=False,
):
    """A TrainConfig field and everything said about it, in one place: its default, what values it takes
    (`expected`, words finishing "NAME must be ..."; `accept`, a test of a value of the field's type;
    `choices`, for a field of a few names), its help line, its command-line option (default: --NAME with
    dashes) and metavar, and whether resuming a run may change it. TrainConfig checks itself with it;
    `cnnkit train`'s options and ConvNN's parameter checks are made from it (`check_setting`, `SETTINGS`)."""
    if choices is not None:
        expected, accept = f"one of {', '.join(map(repr, choices))}", lambda v: v in choices
    metadata = {
        "expected": expected,
        "accept": accept,
        "help": help,
        "option": option,
        "metavar": metavar,
        "choices": choices,
        "resumable": resumable,
    }
    return field(default=default, metadata=metadata)


def _choice(default, choices, help, **kwargs):
    return setting(default, "", choices=choices, help=help, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """The chapter's recipe as defaults: Adam at 1e-4, batch 64, dropout 0.5, 20 epochs, shuffled.

    optimizer "adam" is the chapter's; "sgd" is SGD with Nesterov momentum 0.9 (the photos recipe's).
    weight_decay adds that multiple of each weight to its gradient (L2; 0: none). learning_rate is the
    peak of a "one-cycle" schedule (see `learning_rate_at`); label_smoothing
    mixes that much of a uniform distribution into the targets (0: plain cross-entropy).

    augment "affine" transforms every training image afresh each epoch (see `cnnkit.augment`): rotated
    by up to +-rotate degrees, sheared by up to +-shear degrees, scaled by a factor in [scale_low,
    scale_high], shifted by up to +-shift pixels each way; "crop" pads each image by `pad` pixels
    (mirrored at the border) and crops it back at a random place; `flip` mirrors half of the images
    left-right (for datasets where a mirrored image keeps its class; never digits). The ranges apply only
    to "affine", `pad` only to "crop"; `flip` works with any.

    arch names the network (cnnkit.model: "chapter", cnnkit.resnet: "resnet"); "auto" is resolved when a
    run starts (see `with_network`): the ResNet for color images, the chapter's network otherwise.

    Each field's values, help and option are in its metadata (`setting`): a value outside them raises
    ValueError (TypeError for a wrong type) naming the field.
    """

    epochs: int = setting(20, "an int >= 1", lambda v: v >= 1, help="epochs in all", resumable=True)
    batch_size: int = setting(64, "an int >= 1", lambda v: v >= 1, help="images per mini-batch")
    learning_rate: float = setting(
        1e-4,
        "a positive finite number",
        lambda v: 0 < v < math.inf,
        help="Adam's learning rate (the peak of a one-cycle schedule)",
        option="--lr",
    )
    optimizer: str = _choice("adam", OPTIMIZERS, "adam (the chapter's) or sgd (Nesterov momentum 0.9)")
    weight_decay: float = setting(
        0.0,
        "a number in [0, 1)",
        lambda v: 0 <= v < 1,
        help="L2 weight decay: this multiple of each weight added to its gradient",
        metavar="WD",
    )
    dropout_rate: float = setting(
        0.5,
        "a number in [0, 1)",
        lambda v: 0 <= v < 1,
        help="dropout before the last layer",
        option="--dropout",
    )
    shuffle: bool = setting(True, "True or False", help="shuffle the training images every epoch")
    seed: int = setting(
        123,
        "an int in [0, 2**63)",
        lambda v: 0 <= v < 2**63,
        help="seed for weights, batch order, dropout and augmentation",
    )
    arch: str = _choice(
        "auto",
        ("auto", *NETWORKS),
        "the network: chapter (the chapter's CNN), resnet (a small residual network with batch norm, for "
        "photos), or auto: resnet for color images, chapter otherwise",
    )
    build: str = _choice("layers", BUILDS, "network build: the chapter's layers, or its low-level tensors")
    precision: str = _choice(  # a run's record holds fp32 or bf16: "auto" is resolved when it starts
        "fp32", ("auto", "fp32", "bf16"), "fp32, bf16, or auto (bf16 where the CPU has native bf16)"
    )
    lr_schedule: str = _choice("constant", LR_SCHEDULES, "how the learning rate moves over the run")
    label_smoothing: float = setting(
        0.0, "a number in [0, 1)", lambda v: 0 <= v < 1, help="weight of a uniform target mixed in"
    )
    recipe: str = _choice("chapter", RECIPE_NAMES, "the recipe whose values are the defaults")
    patience: int = setting(
        0,
        "an int >= 0",
        lambda v: v >= 0,
        help="stop early after N epochs without a lower validation loss (0: never)",
        metavar="N",
    )
    keep: int = setting(
        0,
        "an int >= 0",
        lambda v: v >= 0,
        help="keep only the newest N checkpoints, and always the best (0: all; remembered on resume)",
        metavar="N",
        resumable=True,
    )
    augment: str = _choice(
        "none",
        AUGMENTATIONS,
        "affine: transform every training image afresh each epoch with a random rotation, shear, scale and "
        "shift within the ranges below (the accurate recipe: affine for digits)",
    )
    rotate: float = setting(
        12.0,
        "a number of degrees from 0 to 180",
        lambda v: 0 <= v <= 180,
        help="affine: rotate by up to +-DEG degrees",
        metavar="DEG",
    )
    shift: float = setting(
        2.5,
        "a number of pixels >= 0",
        lambda v: 0 <= v < math.inf,
        help="affine: shift by up to +-PX pixels each way",
        metavar="PX",
    )
    scale_low: float = setting(
        0.9, "a positive finite number", lambda v: 0 < v < math.inf, help="affine: the smallest scale factor"
    )
    scale_high: float = setting(
        1.1, "a positive finite number", lambda v: 0 < v < math.inf, help="affine: the largest scale factor"
    )
    shear: float = setting(
        10.0,
        "a number of degrees from 0 to under 80",
        lambda v: 0 <= v < 80,
        help="affine: shear by up to +-DEG degrees",
        metavar="DEG",
    )
    flip: bool = setting(False, "True or False", help="mirror half of the training images left-right")
    pad: int = setting(
        4,
        "an int from 1 to 64",
        lambda v: 1 <= v <= 64,
        help="crop: pad each side by PX pixels (mirrored) before cropping back to the image size",
        metavar="PX",
    )

    def __post_init__(self):
        for name in SETTINGS:
            check_setting(name, getattr(self, name))
        if not self.scale_low <= self.scale_high:
            raise ValueError(f"scale must be LO,HI with 0 < LO <= HI, got {self.scale_low},{self.scale_high}")

    @property
    def augments(self) -> bool:
        """Whether training images are transformed at all."""
        return self.augment != "none" or self.flip

    def to_dict(self) -> dict:
        return asdict(self)


SETTINGS = {f.name: f for f in fields(TrainConfig)}  # name -> field, with each setting's metadata


def check_setting(name: str, value):
    """Raise TypeError (a value of the wrong type) or ValueError (outside the setting's values), saying
    "NAME must be EXPECTED, got VALUE", for TrainConfig's field `name`."""
    spec = SETTINGS[name]
    expected, accept = spec.metadata["expected"], spec.metadata["accept"]
    kind = (
        spec.type
        if isinstance(spec.type, type)
        else {"int": int, "float": float, "bool": bool, "str": str}[spec.type]
    )
    if kind is bool:
        right_type = isinstance(value, bool) or type(value).__name__ == "bool_"
    elif kind is int:
        right_type = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        right_type = isinstance(value, numbers.Real) and not isinstance(value, bool)
    else:
        right_type = isinstance(value, kind)
    if not right_type:
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if accept is not None and not accept(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


# --recipe: "chapter" is the chapter's schedule exactly; "fast" buys accuracy per second on a CPU
# (measured on Fashion-MNIST: see docs/training.md, "The fast recipe", for how it was chosen).
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
    # For photos, with the ResNet: the usual CIFAR-10 augmentation (random crops of the image padded by
    # 4 px, left-right flips), SGD with Nesterov momentum and weight decay 5e-4, a one-cycle schedule
    # peaking at 0.4, label smoothing; no dropout (batch norm regularizes). Its epochs are chosen by the
    # dataset (PHOTOS_IMAGES). On cifar10-6k at 40 epochs (5,000 photos, one seed) SGD reached 66.8% at
    # lr 0.1, 69.0% at 0.2, 71.5% at 0.4, 71.2% at 0.8; Adam (lr 2e-3) 62.5%, AdamW 62.8%; the ResNet at
    # 1.5x width 72.9% (lr 0.4) in 1.8x the time. See docs/networks.md and benchmarks/bench_recipes.py.
    "photos": TrainConfig(
        arch="resnet",
        optimizer="sgd",
        weight_decay=5e-4,
        epochs=30,
        batch_size=128,
        learning_rate=0.4,
        dropout_rate=0.0,
        lr_schedule="one-cycle",
        label_smoothing=0.1,
        augment="crop",
        flip=True,
        recipe="photos",
    ),
}

AFFINE_RANGES = ("rotate", "shift", "scale_low", "scale_high", "shear")

# Settings a recipe may choose by the dataset (`for_dataset`), unless the user set them.
DATASET_DEFAULTS = ("epochs", "augment", "flip")

# The photos recipe trains for about this many images in all, within PHOTOS_EPOCHS.
PHOTOS_IMAGES = 1_200_000
PHOTOS_EPOCHS = (24, 120)

# The accurate recipe trains for about this many images in all (epochs x training images), within
# ACCURATE_EPOCHS: 59 epochs of mnist-5k's 4,050 (after validation), 30 of Fashion-MNIST's 58,000
# (whose validation accuracy rose from 93.15% at 15 epochs to 93.8% at 30).
ACCURATE_IMAGES = 240_000
ACCURATE_EPOCHS = (30, 60)


def describe_augmentation(config: TrainConfig) -> str:
    """The augmentation in words, e.g. "affine (rotate +-12 deg, shift +-2.5 px, scale 0.9-1.1, shear +-10 deg)"."""
    parts = []
    if config.augment == "crop":
        parts.append(f"random crops (padded by {config.pad} px)")
    if config.augment == "affine":
        parts.append(
            f"affine (rotate +-{config.rotate:g} deg, shift +-{config.shift:g} px, "
            f"scale {config.scale_low:g}-{config.scale_high:g}, shear +-{config.shear:g} deg)"
        )
    if config.flip:
        parts.append("left-right flips")
    return " and ".join(parts) or "none"


def choose_network(config: TrainConfig, channels: int) -> str:
    """The network `config.arch` names, "auto" resolved for images of `channels` channels: the ResNet for
    color images (on 5,000 CIFAR-10 photos the chapter's network reached 61.7% with its best recipe, the
    ResNet 74.3%: docs/networks.md), the chapter's network for grayscale ones (the chapter's datasets)."""
    if config.arch != "auto":
        return config.arch
    return "resnet" if channels == 3 else "chapter"


def with_network(config: TrainConfig, channels: int, choose=()) -> TrainConfig:
    """`config` with its network chosen (`choose_network`); when "recipe" is in `choose` (none was asked
    for) and the network is the ResNet, the photos recipe gives every setting in `choose`."""
    config = dataclasses.replace(config, arch=choose_network(config, channels))
    if "recipe" in choose and config.arch == "resnet" and config.recipe == "chapter":
        photos = RECIPES["photos"]
        names = [name for name in choose if name in SETTINGS and name != "precision"]
        config = dataclasses.replace(config, **{name: getattr(photos, name) for name in names})
    return config


def for_dataset(
    config: TrainConfig, preprocessing: str, n_train: int, choose=DATASET_DEFAULTS
) -> TrainConfig:
    """`config` with the settings in `choose` made for the dataset, where its recipe says how.

    The accurate recipe gives digits and drawings ("digit", "resize-dark") random affine transforms,
    and objects and photos ("object", "resize") left-right mirrors instead (not digits: a mirrored 2 is
    no 2; affine transforms lowered Fashion-MNIST's validation accuracy, see docs/training.md), and trains
    longer on fewer images (ACCURATE_IMAGES). The photos recipe also mirrors only objects and photos,
    and sets its epochs by the dataset's size (PHOTOS_IMAGES). Other recipes are the same for every
    dataset.
    """
    objects = preprocessing in ("object", "resize")
    if config.recipe == "photos":
        changes = {"flip": objects} if "flip" in choose else {}
        if "epochs" in choose:
            low, high = PHOTOS_EPOCHS
            changes["epochs"] = min(high, max(low, round(PHOTOS_IMAGES / max(n_train, 1))))
        return dataclasses.replace(config, **changes)
    if config.recipe != "accurate":
        return config
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
    if recipe in ("fast", "accurate", "photos"):
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
