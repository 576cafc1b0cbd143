"""The command line's shared parts: argument types that name what was wrong, the options several
commands share, help texts, and `log`, which prints a line at once."""

import argparse
import math
import os
import sys

from cnnkit.recipes import (
    SETTINGS,
    check_setting,
)

SOURCES_HELP = "mnist-5k (embedded), mnist, fashion-mnist, idx:DIR, npz:FILE or folder:DIR"

CHECKPOINT_HELP = "a run folder, or a checkpoint file"

# The splits `evaluate` and `report` score (cnnkit.evaluation.evaluation_split).
SPLITS = ("test", "valid", "train", "all")
SPLIT_HELP = (
    "test (default), valid (the end of the training split, as training held it out), train, or all "
    "(every image of the dataset). A folder without train/ and test/ is split as training split it "
    "(the test images the run's record lists); any other such folder is all test images"
)

TTA_HELP = (
    "test-time augmentation: average the probabilities of each image and its 1-pixel shifts up, down, "
    "left and right (and their mirrors, for a model trained with --flip)"
)

CHECKPOINT_OR_ONNX_HELP = "a run folder, a checkpoint file, or an .onnx file written by `cnnkit export`"

WHICH_HELP = "for a run folder: newest (default), best (best validation accuracy) or an epoch number N"


def checked(convert, accept, expected: str):
    """An argparse type: `convert` the text and `accept` the value, or fail saying what was `expected`."""

    def parse(text):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def image_size(text: str):
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


positive_int = checked(int, lambda v: v >= 1, "a positive whole number")

count = checked(int, lambda v: v >= 0, "a whole number >= 0")

positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive finite number")

nonempty = checked(str, bool, "a non-empty value")

which = checked(
    str, lambda v: v in ("best", "newest") or (v.isdigit() and int(v) >= 1), "best, newest or an epoch number"
)

size = checked(image_size, lambda s: all(1 <= d <= 4096 for d in s), "HxW in pixels, e.g. 28x28 or 64")


def scale_range(text: str):
    low, comma, high = text.partition(",")
    try:
        low, high = float(low), float(high if comma else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI such as 0.9,1.1, got {text!r}") from None
    if not 0 < low <= high < math.inf:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 < LO <= HI, got {text!r}")
    return low, high


def valid_size(text):
    try:
        value = float(text) if any(c in text for c in ".eEnN") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count (e.g. 10000) or a fraction (e.g. 0.1), got {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0 or (isinstance(value, float) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or a fraction in (0, 1), got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (`cnnkit: error: argument --lr: ...`) and exit code 2."""

    def error(self, message):
        self.exit(2, f"cnnkit: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def add_which(p):
    """--checkpoint best|newest|N: which of a run folder's checkpoints (args.which)."""
    p.add_argument(
        "--checkpoint", dest="which", type=which, default=None, metavar="best|newest|N", help=WHICH_HELP
    )


def add_runtime(p, precisions=("auto", "fp32", "bf16")):
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: a GPU if present"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads (default: the CPUs this process may use, after its affinity mask and cgroup quota; "
        "capped at that count); results are bit-reproducible for a given count",
    )
    p.add_argument(
        "--precision",
        choices=precisions,
        default=None,
        help="auto (default): bf16 where the CPU has native bf16 (AVX512-BF16 or AMX) or on a GPU, else fp32",
    )


# `cnnkit train`'s options for TrainConfig's settings: option, type, check, help and default from the
# field's metadata (cnnkit.recipes.setting), so the command line takes exactly what TrainConfig does.
TRAIN_SETTINGS = (
    "arch",
    "epochs",
    "batch_size",
    "learning_rate",
    "optimizer",
    "weight_decay",
    "dropout_rate",
    "augment",
    "rotate",
    "shift",
    "shear",
    "pad",
    "seed",
    "build",
    "patience",
    "keep",
)


def setting_option(name: str) -> str:
    return SETTINGS[name].metadata["option"] or "--" + name.replace("_", "-")


def add_setting(p, name: str):
    """One TrainConfig setting as an option (value None when not given: the recipe's default stands)."""
    spec = SETTINGS[name]
    meta = spec.metadata

    def parse(text):
        try:
            value = spec.type(text)
            check_setting(name, value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {meta['expected']}, got {text!r}") from None
        return value

    p.add_argument(
        setting_option(name),
        dest=name,
        type=parse if meta["choices"] is None else str,
        choices=meta["choices"],
        default=None,
        metavar=meta["metavar"] or setting_option(name).lstrip("-").replace("-", "_").upper(),
        help=f"{meta['help']} (default: {spec.default:g})"
        if isinstance(spec.default, float)
        else f"{meta['help']} (default: {spec.default})",
    )


def numbers(text: str) -> list:
    return [int(v) if v.lstrip("+-").isdigit() else float(v) for v in text.replace(" ", "").split(",")]


def finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


vector = checked(
    numbers, lambda v: 1 <= len(v) <= 40 and finite(v), "1 to 40 numbers separated by commas, e.g. 1,3,2,4"
)

matrix = checked(
    lambda text: [numbers(row) for row in text.split(";")],
    lambda m: (
        1 <= len(m) <= 12
        and 1 <= len(m[0]) <= 12
        and len({len(r) for r in m}) == 1
        and all(finite(r) for r in m)
    ),
    "rows of numbers separated by ';' and commas, e.g. '1,2,3;4,5,6' (at most 12 x 12)",
)


def whole(smallest: int, largest: int):
    return checked(int, lambda v: smallest <= v <= largest, f"a whole number {smallest}..{largest}")


def pair_of(smallest: int, largest: int):
    def convert(text):
        values = tuple(int(v) for v in text.split(","))
        return values * 2 if len(values) == 1 else values

    return checked(
        convert,
        lambda v: len(v) == 2 and all(smallest <= n <= largest for n in v),
        f"N or N1,N2 with whole numbers {smallest}..{largest}",
    )


port = checked(int, lambda v: 0 <= v <= 65535, "a port number 0..65535 (0: any free port)")


def log(line: str):
    """Print one line at once (logs in a pipe appear as they are written); a closed pipe silences it."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        silence_stdout()


def silence_stdout():
    """Point stdout at /dev/null, so that neither later prints nor Python's exit flush hit the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def runtime(args):
    """Apply the thread count (decided in `main`, before torch loaded) and resolve --device."""
    import torch

    from cnnkit.device import resolve_device

    torch.set_num_threads(args.threads)
    return resolve_device(args.device)
