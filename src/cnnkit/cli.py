"""The `cnnkit` command line: train, evaluate, predict, export, summary, report, explain, data info, serve.

`main` is the one place that turns exceptions into output: every error a user can cause (a missing
file, a corrupt checkpoint, an unknown dataset, a full disk, a read-only folder) is printed as one
line, `cnnkit: error: ...`, with exit code 2 and no traceback; SIGINT and SIGTERM end training with
a line saying which checkpoint is on disk (exit 130); a closed pipe on stdout silences the output
without stopping a training run.
"""

import argparse
import json
import math
import os
import signal
import sys

from cnnkit import __version__
from cnnkit.errors import ArgumentError, CnnkitError, DependencyError, no_dataset_recorded
from cnnkit.recipes import (
    AFFINE_RANGES,
    CALIBRATION_IMAGES,
    DATASET_DEFAULTS,
    RECIPES,
    SETTINGS,
    check_setting,
)

SOURCES_HELP = "mnist-5k (embedded), mnist, fashion-mnist, idx:DIR, npz:FILE or folder:DIR"
CHECKPOINT_HELP = "a run folder, or a checkpoint file"
TTA_HELP = (
    "test-time augmentation: average the probabilities of each image and its 1-pixel shifts up, down, "
    "left and right (and their mirrors, for a model trained with --flip)"
)
CHECKPOINT_OR_ONNX_HELP = "a run folder, a checkpoint file, or an .onnx file written by `cnnkit export`"
WHICH_HELP = "for a run folder: newest (default), best (best validation accuracy) or an epoch number N"


# --- argument types: each names what was wrong ---


def _checked(convert, accept, expected: str):
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


def _image_size(text: str):
    height, _, width = text.lower().partition("x")
    return int(height), int(width or height)


_positive_int = _checked(int, lambda v: v >= 1, "a positive whole number")
_count = _checked(int, lambda v: v >= 0, "a whole number >= 0")
_positive_float = _checked(float, lambda v: 0 < v < math.inf, "a positive finite number")
_nonempty = _checked(str, bool, "a non-empty value")
_which = _checked(
    str, lambda v: v in ("best", "newest") or (v.isdigit() and int(v) >= 1), "best, newest or an epoch number"
)
_size = _checked(_image_size, lambda s: all(1 <= d <= 4096 for d in s), "HxW in pixels, e.g. 28x28 or 64")


def _scale_range(text: str):
    low, comma, high = text.partition(",")
    try:
        low, high = float(low), float(high if comma else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI such as 0.9,1.1, got {text!r}") from None
    if not 0 < low <= high < math.inf:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 < LO <= HI, got {text!r}")
    return low, high


def _valid_size(text):
    try:
        value = float(text) if any(c in text for c in ".eEnN") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count (e.g. 10000) or a fraction (e.g. 0.1), got {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0 or (isinstance(value, float) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or a fraction in (0, 1), got {text!r}")
    return value


# --- the parser ---


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (`cnnkit: error: argument --lr: ...`) and exit code 2."""

    def error(self, message):
        self.exit(2, f"cnnkit: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cnnkit",
        description="Convolutional neural networks for image classification.",
        epilog="Run `cnnkit COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_train(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_export(commands)
    _add_summary(commands)
    _add_report(commands)
    _add_explain(commands)
    _add_data(commands)
    _add_serve(commands)
    return parser


def _add_which(p):
    """--checkpoint best|newest|N: which of a run folder's checkpoints (args.which)."""
    p.add_argument(
        "--checkpoint", dest="which", type=_which, default=None, metavar="best|newest|N", help=WHICH_HELP
    )


def _add_runtime(p, precisions=("auto", "fp32", "bf16")):
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: a GPU if present"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
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
    "epochs",
    "batch_size",
    "learning_rate",
    "dropout_rate",
    "augment",
    "rotate",
    "shift",
    "shear",
    "seed",
    "build",
    "patience",
    "keep",
)


def _setting_option(name: str) -> str:
    return SETTINGS[name].metadata["option"] or "--" + name.replace("_", "-")


def _add_setting(p, name: str):
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
        _setting_option(name),
        dest=name,
        type=parse if meta["choices"] is None else str,
        choices=meta["choices"],
        default=None,
        metavar=meta["metavar"] or _setting_option(name).lstrip("-").replace("-", "_").upper(),
        help=f"{meta['help']} (default: {spec.default:g})"
        if isinstance(spec.default, float)
        else f"{meta['help']} (default: {spec.default})",
    )


def _add_train(commands):
    p = commands.add_parser(
        "train",
        help="train the chapter's CNN, checkpointing each epoch",
        description="Train the chapter's CNN (Adam 1e-4, batch 64, dropout 0.5, 20 epochs). "
        "Each epoch writes RUN/checkpoints/epoch-NNN.safetensors and a line of RUN/history.jsonl "
        "and RUN/metrics.csv.",
    )
    p.add_argument(
        "--dataset",
        type=_nonempty,
        default=None,
        help=f"{SOURCES_HELP} (default: mnist, downloaded when absent)",
    )
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="chapter (default): the chapter's schedule (the defaults below); fast: batch 256, one-cycle lr "
        "4e-3, dropout 0.3, label smoothing 0.1, 7 epochs, min(2,000, 10%%) validation images; accurate: "
        "one-cycle lr 1e-3, label smoothing 0.1, --augment affine for digits (--flip instead for objects and photos), "
        "about 240,000 training images in all (30 to 60 epochs), min(2,000, 10%%) validation images "
        "(options below override them)",
    )
    for name in ("epochs", "batch_size", "learning_rate", "dropout_rate", "augment", "rotate", "shift"):
        _add_setting(p, name)
    p.add_argument(
        "--scale",
        type=_scale_range,
        default=None,
        metavar="LO,HI",
        help="affine: a size factor from LO to HI (default: 0.9,1.1)",
    )
    _add_setting(p, "shear")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mirror half of the training images left-right, for data where that keeps the class (clothes, "
        "photos; never digits) (default: off; the accurate recipe: on for objects and photos, without affine)",
    )
    _add_setting(p, "seed")
    p.add_argument("--no-shuffle", action="store_true", help="keep the training order in every epoch")
    p.add_argument(
        "--valid-size",
        type=_valid_size,
        default=None,
        help="validation images taken from the end of the training split: a count, a fraction, or 0 "
        "(default: 10,000, or a sixth of the training split when that is smaller)",
    )
    p.add_argument(
        "--image-size",
        type=_size,
        default=None,
        metavar="HxW",
        help="bring every image to this size (default for folder: sources: the most common size, "
        "capped at 64 pixels on its longer side)",
    )
    for name in ("build", "patience", "keep"):
        _add_setting(p, name)
    _add_runtime(p)
    p.add_argument(
        "--out",
        type=_nonempty,
        default=None,
        help="run folder (default: runs/DATASET-TIME; with --resume, its own)",
    )
    p.add_argument(
        "--resume",
        type=_nonempty,
        metavar="RUN_OR_CHECKPOINT",
        default=None,
        help="continue a run from a checkpoint",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out folder that holds checkpoints (deletes them)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no epoch lines")
    p.add_argument(
        "--nproc-per-node",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train as N processes on this machine with torchrun and DDP (the batch stays the global one, "
        "split among them); for several machines, start torchrun yourself (see the README)",
    )
    p.set_defaults(run=run_train)


def _add_evaluate(commands):
    p = commands.add_parser("evaluate", help="accuracy, loss, per-class accuracy and confusion matrix")
    p.add_argument("checkpoint", type=_nonempty, metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_OR_ONNX_HELP)
    p.add_argument(
        "more",
        type=_nonempty,
        nargs="*",
        metavar="RUN_OR_CHECKPOINT",
        help="more models: an ensemble, whose averaged probabilities are scored (same classes and input shape)",
    )
    _add_which(p)
    p.add_argument(
        "--dataset", type=_nonempty, default=None, help=f"{SOURCES_HELP} (default: the one it was trained on)"
    )
    p.add_argument("--split", choices=("test", "valid", "train"), default="test", help="default: test")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per forward pass (default: 256 for a float network on a CPU, 1000 for int8 or a GPU)",
    )
    _add_runtime(p, precisions=("auto", "fp32", "bf16", "int8"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_evaluate)


def _add_predict(commands):
    p = commands.add_parser(
        "predict",
        help="classify image files (PNG/JPEG, gray, RGB or RGBA)",
        description="Classify image files. A digit is prepared the way MNIST's were made: grayscale, "
        "inverted if the background is light, cropped to the ink, scaled into 20x20, centered by mass in 28x28.",
    )
    p.add_argument("checkpoint", type=_nonempty, metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_OR_ONNX_HELP)
    p.add_argument(
        "images",
        type=_nonempty,
        metavar="IMAGE",
        nargs="+",
        help="image files; run folders and checkpoint files before them join the first model in an "
        "ensemble, whose probabilities are averaged",
    )
    _add_which(p)
    p.add_argument("--proba", action="store_true", help="also print each class's probability")
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    p.add_argument(
        "--preprocess",
        choices=("auto", "digit", "object", "resize"),
        default="auto",
        help="digit: MNIST-style; object: Fashion-MNIST-style (crop, fit, center); resize: plain resize "
        "(default: what the model's dataset declared)",
    )
    _add_runtime(p)
    p.set_defaults(run=run_predict)


def _add_export(commands):
    p = commands.add_parser(
        "export",
        help="write a trained model as one .onnx file, to run with onnxruntime without PyTorch",
        description="Write a trained model as one self-contained .onnx file: raw pixels in (float32, "
        "N x C x H x W, the values of the training images), the checkpoint's standardization inside, "
        "logits and probabilities out, class names and preprocessing in its metadata. `cnnkit predict` "
        'and `cnnkit evaluate` run it. Needs the onnx extra: pip install "cnnkit[onnx]".',
    )
    p.add_argument("checkpoint", type=_nonempty, metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    _add_which(p)
    p.add_argument(
        "-o", "--out", type=_nonempty, required=True, metavar="FILE.onnx", help="the file to write"
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="fp32 (default), or int8: onnxruntime's static quantization, calibrated on the first "
        f"{CALIBRATION_IMAGES} training images",
    )
    p.add_argument(
        "--dataset",
        type=_nonempty,
        default=None,
        help=f"where int8's calibration images and agreement test come from: {SOURCES_HELP} "
        "(default: the one it was trained on)",
    )
    p.set_defaults(run=run_export)


def _add_summary(commands):
    p = commands.add_parser(
        "summary", help="a trained model's layers, shapes, parameters, classes and training"
    )
    p.add_argument("checkpoint", type=_nonempty, metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    _add_which(p)
    p.set_defaults(run=run_summary)


def _add_data(commands):
    data = commands.add_parser("data", help="inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_commands.required = True
    info = data_commands.add_parser("info", help="print splits, counts, shapes, classes and statistics")
    info.add_argument("source", type=_nonempty, help=SOURCES_HELP)
    info.set_defaults(run=run_data_info)


_port = _checked(int, lambda v: 0 <= v <= 65535, "a port number 0..65535 (0: any free port)")


def _add_serve(commands):
    p = commands.add_parser(
        "serve",
        help="a local web page: draw a digit and watch every layer answer; and a JSON API",
        description="Serve a web page where you draw or drop an image and see the network's answer "
        "layer by layer, its learning curves, and a JSON API (POST /api/predict; docs at /docs). "
        "Runs until Ctrl-C.",
    )
    p.add_argument(
        "checkpoints", type=_nonempty, nargs="+", metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP
    )
    _add_which(p)
    p.add_argument(
        "--host",
        type=_nonempty,
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=_port, default=8000, help="default: 8000; 0 picks a free port")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="inference threads, one request each (default: the CPUs this process may use, at most 4)",
    )
    p.add_argument(
        "--allow-host",
        type=_nonempty,
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the server may be reached under, besides IP addresses, localhost and --host "
        "(repeatable); requests naming another in their Host header get 400, which stops DNS rebinding",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="a connection must send each whole request (headers and body) within this many seconds of "
        "opening or of its last answer, or it is closed (default: 20)",
    )
    p.set_defaults(run=run_serve)


def _add_report(commands):
    p = commands.add_parser(
        "report",
        help="pictures of a trained model: learning curves, confusion matrix, mistakes, feature maps, ...",
        description="Write a folder (default: RUN/report/) with index.html (one page that opens from disk), "
        "a PNG per figure and report.json (the numbers behind them; accuracy and confusion_matrix as "
        "`cnnkit evaluate --json` gives them).",
    )
    p.add_argument("checkpoint", type=_nonempty, metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    _add_which(p)
    p.add_argument(
        "--dataset", type=_nonempty, default=None, help=f"{SOURCES_HELP} (default: the one it was trained on)"
    )
    p.add_argument("--split", choices=("test", "valid", "train"), default="test", help="default: test")
    p.add_argument("--out", type=_nonempty, default=None, metavar="DIR", help="default: RUN/report")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="images per forward pass")
    _add_runtime(p)
    p.set_defaults(run=run_report)


def _numbers(text: str) -> list:
    return [int(v) if v.lstrip("+-").isdigit() else float(v) for v in text.replace(" ", "").split(",")]


def _finite(values) -> bool:
    return all(math.isfinite(v) for v in values)


_vector = _checked(
    _numbers, lambda v: 1 <= len(v) <= 40 and _finite(v), "1 to 40 numbers separated by commas, e.g. 1,3,2,4"
)
_matrix = _checked(
    lambda text: [_numbers(row) for row in text.split(";")],
    lambda m: (
        1 <= len(m) <= 12
        and 1 <= len(m[0]) <= 12
        and len({len(r) for r in m}) == 1
        and all(_finite(r) for r in m)
    ),
    "rows of numbers separated by ';' and commas, e.g. '1,2,3;4,5,6' (at most 12 x 12)",
)


def _whole(smallest: int, largest: int):
    return _checked(int, lambda v: smallest <= v <= largest, f"a whole number {smallest}..{largest}")


def _pair_of(smallest: int, largest: int):
    def convert(text):
        values = tuple(int(v) for v in text.split(","))
        return values * 2 if len(values) == 1 else values

    return _checked(
        convert,
        lambda v: len(v) == 2 and all(smallest <= n <= largest for n in v),
        f"N or N1,N2 with whole numbers {smallest}..{largest}",
    )


def _add_explain(commands):
    explain = commands.add_parser(
        "explain",
        help="draw a convolution or pooling step by step (PNG), computed by cnnkit.ops",
        description="Draw the chapter's primitives step by step with their exact numbers: "
        "conv1d and conv2d (padding, flipped kernel, the inputs behind each output), and max and mean "
        "pooling (windows, stride, TensorFlow's SAME padding). Defaults are the chapter's examples.",
    )
    kinds = explain.add_subparsers(dest="explain_command", metavar="conv1d|conv2d|pool")
    kinds.required = True
    one = kinds.add_parser("conv1d", help="1-D convolution (default: the chapter's x and w, padding 2)")
    one.add_argument("--x", type=_vector, default=None, help="the signal (default: 1,3,2,4,5,6,1,3)")
    one.add_argument("--w", type=_vector, default=None, help="the kernel (default: 1,0,3,1,2)")
    one.add_argument("--padding", type=_whole(0, 20), default=2, help="zeros at each end (default: 2)")
    one.add_argument("--stride", type=_whole(1, 20), default=1, help="default: 1")
    two = kinds.add_parser(
        "conv2d", help="2-D convolution (default: the chapter's 4x4 x and 3x3 w, padding 1)"
    )
    two.add_argument(
        "--x", type=_matrix, default=None, help="the image, rows separated by ';' (default: the chapter's)"
    )
    two.add_argument("--w", type=_matrix, default=None, help="the kernel (default: '1,0,3;1,2,1;0,1,1')")
    two.add_argument("--padding", type=_pair_of(0, 10), default=(1, 1), help="P or P1,P2 (default: 1)")
    two.add_argument("--stride", type=_pair_of(1, 10), default=(1, 1), help="S or S1,S2 (default: 1)")
    pool = kinds.add_parser(
        "pool", help="max and mean pooling (default: a 5x5 image, 2x2 windows, SAME padding)"
    )
    pool.add_argument("--x", type=_matrix, default=None, help="the image (default: 0..24 in 5 rows)")
    pool.add_argument("--size", type=_pair_of(1, 10), default=(2, 2), help="window K or KH,KW (default: 2)")
    pool.add_argument("--stride", type=_pair_of(1, 10), default=None, help="default: the window size")
    pool.add_argument(
        "--padding", choices=("same", "valid"), default="same", help="default: same (TensorFlow's)"
    )
    for p in (one, two, pool):
        p.add_argument(
            "--out",
            type=_nonempty,
            default=None,
            metavar="FILE.png",
            help=f"default: {p.prog.split()[-1]}.png",
        )
        p.set_defaults(run=run_explain)


# --- commands ---


def log(line: str):
    """Print one line at once (logs in a pipe appear as they are written); a closed pipe silences it."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        _silence_stdout()


def _runtime(args):
    """Apply the thread count (decided in `main`, before torch loaded) and resolve --device."""
    import torch

    from cnnkit.device import resolve_device

    torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def run_train(args) -> int:
    """`cnnkit train`: in this process, as one rank of a torchrun job, or (--nproc-per-node N) as the
    launcher of N ranks here (torchrun's own, on 127.0.0.1)."""
    from cnnkit import distributed

    if (args.nproc_per_node or 1) > 1 and not distributed.launched_by_torchrun():
        distributed.check_batch_size(_global_batch_size(args), args.nproc_per_node)
        return distributed.launch_here(args.nproc_per_node, args.command_line)
    if args.nproc_per_node not in (None, distributed.local_world_size()):
        raise ArgumentError(
            f"--nproc-per-node {args.nproc_per_node}: torchrun started {distributed.local_world_size()} "
            "processes here; leave the option out under torchrun"
        )
    if distributed.restart_count() == 0 and _max_restarts() and not (args.out or args.resume):
        raise ArgumentError(
            "torchrun --max-restarts needs --out DIR, so that a restart continues the same run"
        )
    with distributed.process_group(_runtime(args)) as device:
        return _train(args, device)


def _global_batch_size(args) -> int:
    if args.resume:
        from cnnkit.checkpoint import read_record, resolve_checkpoint

        return read_record(resolve_checkpoint(args.resume)).config.batch_size
    return args.batch_size or RECIPES[args.recipe or "chapter"].batch_size


def _max_restarts() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def _restart_folder(args):
    """After torchrun restarted a failed job (--max-restarts), the run folder whose newest checkpoint it
    continues from; None the first time, or when no epoch had finished."""
    from pathlib import Path

    from cnnkit import distributed
    from cnnkit.checkpoint import list_checkpoints

    if not distributed.restart_count():
        return None
    if args.out:
        folder = Path(args.out)
    else:
        folder = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent.parent
    return folder if list_checkpoints(folder) else None


def _train(args, device) -> int:
    import dataclasses

    from cnnkit import distributed
    from cnnkit.checkpoint import read_record, resolve_checkpoint
    from cnnkit.runs import resume_run, start_run

    show_progress = False if args.quiet else None
    say = (lambda line: None) if args.quiet or not distributed.is_main() else log
    restart = _restart_folder(args)
    if restart is not None:  # torchrun restarted the job: it goes on from the newest checkpoint
        newest = read_record(resolve_checkpoint(restart))
        if newest.epoch >= (args.epochs or newest.config.epochs):
            say(f"restart {distributed.restart_count()}: {restart} already holds epoch {newest.epoch}; done")
            result = None
        else:
            say(f"restart {distributed.restart_count()}: continuing {restart} from epoch {newest.epoch}")
            result = resume_run(
                restart,
                args.epochs,
                dataset=args.dataset,
                keep=args.keep,
                device=device,
                log=say,
                show_progress=show_progress,
            )
    elif args.resume:
        fixed = {  # what resuming may not change: the settings that say so, and how the data was read
            **{
                _setting_option(n): getattr(args, n)
                for n in TRAIN_SETTINGS
                if not SETTINGS[n].metadata["resumable"]
            },
            "--valid-size": args.valid_size,
            "--image-size": args.image_size,
            "--precision": args.precision,
            "--recipe": args.recipe,
            "--scale": args.scale,
            "--flip": args.flip,
        }
        given = [name for name, value in fixed.items() if value is not None] + [
            "--no-shuffle"
        ] * args.no_shuffle
        if given:
            raise ArgumentError(
                f"{', '.join(given)} cannot change when resuming: a resumed run keeps the checkpoint's recipe "
                "(only --epochs, --out, --keep, --dataset, --device and --threads apply)"
            )
        result = resume_run(
            args.resume,
            args.epochs,
            args.out,
            dataset=args.dataset,
            keep=args.keep,
            device=device,
            log=say,
            show_progress=show_progress,
            overwrite=args.overwrite,
        )
    else:
        chosen = {
            **{name: getattr(args, name) for name in TRAIN_SETTINGS},
            "shuffle": False if args.no_shuffle else None,
            "scale_low": args.scale and args.scale[0],
            "scale_high": args.scale and args.scale[1],
            "flip": args.flip,
        }
        if args.augment is None and any(chosen[name] is not None for name in AFFINE_RANGES):
            chosen["augment"] = "affine"  # a range given alone turns the transform on
        config = dataclasses.replace(
            RECIPES[args.recipe or "chapter"],
            precision=args.precision or "auto",
            **{name: value for name, value in chosen.items() if value is not None},
        )
        result = start_run(
            args.dataset or "mnist",
            config,
            args.out,
            dataset_defaults=[name for name in DATASET_DEFAULTS if chosen.get(name) is None],
            valid_size=args.valid_size,
            image_size=args.image_size,
            device=device,
            log=say,
            show_progress=show_progress,
            overwrite=args.overwrite,
        )
    if distributed.is_main():
        log(f"checkpoint: {result.last_checkpoint if result else resolve_checkpoint(restart)}")
    return 0


def run_evaluate(args) -> int:
    from cnnkit.onnx_model import is_onnx_path

    models = [args.checkpoint, *args.more]
    if len(models) == 1 and not args.tta and is_onnx_path(args.checkpoint):
        return _evaluate_onnx(args)
    from cnnkit.checkpoint import load_network
    from cnnkit.device import resolve_precision
    from cnnkit.evaluation import evaluate_ensemble, evaluate_split, evaluation_split, load_ensemble
    from cnnkit.quantize import quantize_int8

    device = _runtime(args)
    int8 = args.precision == "int8"
    if int8 and device.type != "cpu":
        raise ArgumentError("--precision int8 runs on the CPU only; add --device cpu")
    if len(models) > 1 or args.tta:
        _check_ensemble_options(models, int8)
        members = load_ensemble(models, args.which, device)
        first = members[0][1]
        source, _, split = evaluation_split(first.record, first.path, args.dataset, args.split)
        precision = resolve_precision(args.precision or "auto", device)
        scored = evaluate_ensemble(members, source, split, precision, device, args.batch_size, args.tta)
        return _print_evaluation(args, scored.evaluation, scored.numbers, first.record.class_names)
    model, ckpt = load_network(args.checkpoint, args.which, device)
    record = ckpt.record
    source, dataset, split = evaluation_split(record, ckpt.path, args.dataset, args.split)
    precision = "int8" if int8 else resolve_precision(args.precision or "auto", device)
    if int8:
        calibration = dataset.train or dataset.valid or split
        model = quantize_int8(model, record.standardization.apply(calibration.images[:CALIBRATION_IMAGES]))
    scored = evaluate_split(model, ckpt, source, split, precision, device, args.batch_size)
    return _print_evaluation(args, scored.evaluation, scored.numbers, record.class_names)


def _check_ensemble_options(models, int8: bool):
    """Ensembles and --tta average checkpoints' float probabilities: no .onnx files, no int8."""
    from cnnkit.onnx_model import is_onnx_path

    onnx = [path for path in models if is_onnx_path(path)]
    if onnx:
        raise ArgumentError(
            f"{onnx[0]}: ensembles and --tta take checkpoints or run folders, not .onnx files"
        )
    if int8:
        raise ArgumentError("ensembles and --tta run in fp32 or bf16; leave out --precision int8")


def _evaluate_onnx(args) -> int:
    """`cnnkit evaluate FILE.onnx`: an exported model in onnxruntime; loads neither torch nor training code."""
    from cnnkit.data import resolve_source, split_for_model
    from cnnkit.metrics import evaluate_logits
    from cnnkit.onnx_model import load_onnx

    classifier = load_onnx(args.checkpoint, args.threads)
    meta = classifier.metadata
    _check_onnx_options(args, meta.precision)
    source = resolve_source(args.dataset) if args.dataset else meta.dataset
    if source is None:
        raise no_dataset_recorded(args.checkpoint)
    _, split = split_for_model(source, meta.input_shape, meta.class_names, meta.valid_size, args.split)
    result = evaluate_logits(classifier.predict_logits(split.images, args.batch_size), split.labels)
    report = {
        "checkpoint": str(classifier.path),
        "epoch": meta.epoch,
        "dataset": source,
        "split": split.name,
        "precision": meta.precision,
        "device": "cpu",
    }
    report.update(result.to_dict(meta.class_names))
    return _print_evaluation(args, result, report, meta.class_names)


def _check_onnx_options(args, precision: str):
    """Refuse the options that choose among a checkpoint's ways of running: an .onnx file has one."""
    if args.which is not None:
        raise ArgumentError(
            f"--checkpoint {args.which} picks a checkpoint of a run folder; {args.checkpoint} is one model"
        )
    if args.precision not in (None, "auto", precision):
        raise ArgumentError(
            f"{args.checkpoint} is an {precision} model; to run it as {args.precision}, export it with "
            f"`cnnkit export --precision {args.precision}`"
            if args.precision in ("fp32", "int8")
            else f"{args.checkpoint} is an {precision} model; --precision {args.precision} applies to checkpoints"
        )
    if args.device == "cuda":
        raise ArgumentError(
            f"{args.checkpoint}: an .onnx model runs on the CPU here (onnxruntime); leave out --device"
        )


def _print_evaluation(args, result, report: dict, names) -> int:
    """Print `cnnkit evaluate`'s `report` (its --json object) as JSON, or as a table with `result`'s metrics."""
    import numpy as np

    from cnnkit.metrics import strict_json

    if args.json:
        log(json.dumps(strict_json(report), allow_nan=False))
        return 0
    models = report.get("models", [report])
    what = " + ".join(f"{m['checkpoint']} (epoch {m['epoch']})" for m in models)
    if len(models) > 1:
        what = f"ensemble of {len(models)}: {what}"
    lines = [
        f"{what}{', with TTA' if report.get('tta') else ''} on {report['dataset']} "
        f"({report['split']}, {result.n:,} images, {report['precision']})",
        f"accuracy {result.accuracy:.4f}  loss {result.loss:.4f}",
    ]
    width = max(len(n) for n in names)
    lines.append(f"\n{'class':<{width}}  {'accuracy':>8}  {'n':>6}")
    for name, entry in report["per_class"].items():
        acc = "-" if entry["accuracy"] is None else f"{entry['accuracy']:.4f}"
        lines.append(f"{name:<{width}}  {acc:>8}  {entry['n']:>6}")
    lines.append("\nconfusion matrix (rows: true class, columns: predicted)")
    confusion = np.asarray(report["confusion_matrix"])
    cell = max(len(str(confusion.max())), 3)
    lines.append(" " * width + "  " + " ".join(f"{i:>{cell}}" for i in range(len(names))))
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:>{cell}}" for v in confusion[i]) + f"   ({i})")
    log("\n".join(lines))
    return 0


def run_predict(args) -> int:
    from cnnkit.onnx_model import is_onnx_path

    models = [args.checkpoint]
    while len(args.images) > 1 and _names_a_model(args.images[0]):  # RUN1 RUN2 ... IMAGE...
        models.append(args.images.pop(0))
    if len(models) == 1 and not args.tta and is_onnx_path(args.checkpoint):
        return _predict_onnx(args)
    from cnnkit.device import resolve_precision
    from cnnkit.evaluation import load_ensemble
    from cnnkit.inference import average_probabilities

    device = _runtime(args)
    _check_ensemble_options(models, int8=False)
    members = load_ensemble(models, args.which, device)
    record = members[0][1].record
    styles = {ckpt.record.preprocessing for _, ckpt in members}
    if len(styles) > 1 and args.preprocess == "auto":
        raise ArgumentError(
            f"the models prepare images differently ({', '.join(sorted(styles))}); choose one with --preprocess"
        )
    raw = _prepared_images(args, record.architecture.input_shape, record.preprocessing)
    precision = resolve_precision(args.precision or "auto", device)
    members = [(model, ckpt.record) for model, ckpt in members]
    proba = average_probabilities(members, raw, tta=args.tta, precision=precision)
    return _print_predictions(args, record.class_names, proba)


def _names_a_model(path: str) -> bool:
    """Whether a path after predict's first model names another model (a run folder, .safetensors, .onnx)."""
    from pathlib import Path

    return Path(path).is_dir() or path.lower().endswith((".safetensors", ".onnx"))


def _predict_onnx(args) -> int:
    """`cnnkit predict FILE.onnx IMAGE...`: an exported model in onnxruntime; loads neither torch nor training code."""
    from cnnkit.onnx_model import load_onnx

    classifier = load_onnx(args.checkpoint, args.threads)
    meta = classifier.metadata
    _check_onnx_options(args, meta.precision)
    raw = _prepared_images(args, meta.input_shape, meta.preprocessing)
    return _print_predictions(args, meta.class_names, classifier.predict_proba(raw))


def _prepared_images(args, input_shape, preprocessing: str):
    """The IMAGE files brought to a model's input (N, C, H, W), as its dataset's images were made (or --preprocess)."""
    import numpy as np

    from cnnkit.images import read_image_for_model

    style = preprocessing if args.preprocess == "auto" else args.preprocess
    return np.stack([read_image_for_model(path, input_shape, style) for path in args.images])


def _print_predictions(args, names, proba) -> int:
    """Print `cnnkit predict`'s output for probabilities (N, K): a line per image, or --json's list."""
    results = []
    for path, p in zip(args.images, proba, strict=True):
        label = int(p.argmax())
        entry = {"file": path, "label": label, "class_name": names[label], "confidence": float(p[label])}
        if args.proba:
            entry["probabilities"] = {name: float(v) for name, v in zip(names, p, strict=True)}
        results.append(entry)
    if args.json:  # a diverged model's NaN is null, as in evaluate's output
        from cnnkit.metrics import strict_json

        log(json.dumps(strict_json(results), allow_nan=False))
        return 0
    for entry in results:
        log(f"{entry['file']}: {entry['class_name']} ({entry['confidence']:.1%})")
        if args.proba:
            log("  " + "  ".join(f"{name} {v:.3f}" for name, v in entry["probabilities"].items()))
    return 0


def run_export(args) -> int:
    try:
        from cnnkit.export import export_onnx
    except ModuleNotFoundError as exc:  # a deployment that installed cnnkit without PyTorch
        raise DependencyError(
            f'cnnkit export needs {exc.name}, which is not installed: pip install torch==2.13.0 "cnnkit[onnx]"'
        ) from None

    result = export_onnx(args.checkpoint, args.out, args.which, args.precision, args.dataset)
    meta = result.metadata
    size = result.path.stat().st_size / 2**20
    log(f"{result.path}: {meta.precision}, {size:,.1f} MB, from {result.checkpoint} (epoch {meta.epoch})")
    log(
        f"input  pixels: float32 N x {' x '.join(map(str, meta.input_shape))}, raw values (standardized inside); "
        f"outputs logits, probabilities ({len(meta.class_names)} classes)"
    )
    log(
        f"parity fp32 graph against PyTorch: max |logit difference| {result.max_logit_difference:.1e} "
        f"on {result.parity_images} images"
    )
    if meta.calibration:
        agreement = (
            f"; labels agree with fp32 on {result.agreement:.2%} of the test split ({result.agreement_images:,} images)"
            if result.agreement is not None
            else ""
        )
        log(f"int8   calibrated on {meta.calibration}{agreement}")
    return 0


def run_summary(args) -> int:
    from cnnkit.checkpoint import read_record, resolve_checkpoint
    from cnnkit.model import summary
    from cnnkit.recipes import describe_augmentation

    path = resolve_checkpoint(args.checkpoint, args.which)
    record = read_record(path)
    config = record.config
    names = ", ".join(record.class_names[:20]) + (", ..." if len(record.class_names) > 20 else "")
    best = f"; best epoch {record.best_epoch}" if record.best_epoch is not None else ""
    log(
        "\n".join(
            [
                f"checkpoint   {path} ({path.stat().st_size / 2**20:,.1f} MB)",
                f"trained on   {record.dataset or 'arrays (ConvNN)'}: {len(record.class_names)} classes ({names})",
                f"epoch        {record.epoch} of {config.epochs}{best}",
                f"recipe       {config.recipe}: batch {config.batch_size}, lr {config.learning_rate:g} "
                f"({config.lr_schedule}), dropout {config.dropout_rate:g}, seed {config.seed}, {config.precision}",
                f"augmentation {describe_augmentation(config)}",
                f"images       {' x '.join(map(str, record.architecture.input_shape))} (C x H x W), "
                f"prepared as {record.preprocessing!r}",
                "",
                summary(record.architecture, record.build),
            ]
        )
    )
    return 0


def run_serve(args) -> int:
    from cnnkit.serve import serve

    return serve(
        args.checkpoints,
        args.host,
        args.port,
        args.which,
        args.workers,
        log=log,
        allow_hosts=args.allow_host,
        timeout=args.timeout,
    )


def run_data_info(args) -> int:
    from cnnkit.data import info_table, load_dataset

    log(info_table(load_dataset(args.source)))
    return 0


def run_report(args) -> int:
    import time

    from cnnkit.report import write_report

    device = _runtime(args)
    started = time.perf_counter()
    folder = write_report(
        args.checkpoint,
        args.out,
        args.which,
        args.dataset,
        args.split,
        args.precision or "auto",
        device,
        args.batch_size,
    )
    report = json.loads((folder / "report.json").read_text())
    accuracy = "-" if report["accuracy"] is None else f"{report['accuracy']:.4f}"
    log(f"accuracy {accuracy} on {report['n']:,} {report['split']} images of {report['dataset']}")
    log(
        f"report: {folder / 'index.html'} ({len(report['figures'])} figures and report.json, "
        f"{time.perf_counter() - started:.1f} s)"
    )
    return 0


def run_explain(args) -> int:
    from cnnkit import plots
    from cnnkit.errors import ArgumentError

    kind = args.explain_command
    out = args.out or f"{kind}.png"
    if not out.lower().endswith(".png"):
        raise ArgumentError(f"--out {out!r}: expected a file name ending in .png")
    try:
        if kind == "conv1d":
            x, w = args.x or plots.CHAPTER_X1, args.w or plots.CHAPTER_W1
            figure = plots.explain_conv1d(x, w, args.padding, args.stride)
        elif kind == "conv2d":
            x, w = args.x or plots.CHAPTER_X2, args.w or plots.CHAPTER_W2
            figure = plots.explain_conv2d(x, w, args.padding, args.stride)
        else:
            figure = plots.explain_pool(args.x or plots.POOL_EXAMPLE, args.size, args.stride, args.padding)
    except ValueError as exc:  # cnnkit.ops names the argument and what it expected
        raise ArgumentError(f"cnnkit explain {kind}: {exc}") from None
    plots.save_figure(figure, out)
    log(f"wrote {out}")
    return 0


# --- the one place that turns exceptions into exit codes ---


def _silence_stdout():
    """Point stdout at /dev/null, so that neither later prints nor Python's exit flush hit the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _interrupt(signum, frame):
    """SIGINT and SIGTERM as a KeyboardInterrupt, which `main` ends with one line. Inside an import the
    process ends at once with that line instead: a compiled module being imported (NumPy's, torch's)
    turns an exception raised in it into an ImportError and a traceback (cnnkit writes its files
    atomically, so an interrupted write leaves at most a temporary file, removed on resume)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            os.write(2, b"cnnkit: interrupted\n")
            os._exit(130)
        frame = frame.f_back
    raise KeyboardInterrupt


def _last_line(line: str, code: int) -> int:
    """Print the command's last line on stderr and return its exit code. A rank of `--nproc-per-node`
    hands both to the launcher instead, which prints one line for the job (see distributed.launch_here)."""
    from cnnkit.distributed import report_to_launcher

    if not report_to_launcher(line=line, code=code):
        print(line, file=sys.stderr, flush=True)
    return code


def main(argv=None) -> int:
    """Run `cnnkit ARGV` (default: sys.argv[1:]) and return its exit code; the signal handlers it sets
    while it runs are restored on the way out, so that it can be called from Python too."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _main(argv)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _main(argv) -> int:
    try:
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends a run as Ctrl-C does
        parser = build_parser()
        args = parser.parse_args(argv)
        args.command_line = list(sys.argv[1:] if argv is None else argv)  # what --nproc-per-node's ranks run
        if "threads" in args:  # before torch loads: see cnnkit.threads
            from cnnkit.distributed import local_world_size
            from cnnkit.threads import available_cpus, configure_threads

            args.threads = configure_threads(
                args.threads,
                log=lambda line: print(f"cnnkit: {line}", file=sys.stderr),
                cpus=max(available_cpus() // local_world_size(), 1),  # torchrun's ranks here share the CPUs
            )
        return args.run(args)
    except CnnkitError as exc:
        return _last_line(f"cnnkit: error: {exc}", getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        return _last_line("cnnkit: interrupted", 130)
    except BrokenPipeError:
        _silence_stdout()
        return 141  # as a program killed by SIGPIPE
    except OSError as exc:  # a full disk, a read-only or missing folder: say which file and why
        where = f"{exc.filename}: " if exc.filename else ""
        return _last_line(f"cnnkit: error: {where}{exc.strerror or exc}", 2)
    except MemoryError:
        return _last_line("cnnkit: error: out of memory", 2)
