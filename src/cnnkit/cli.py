"""The `cnnkit` command line: train, evaluate, predict, data info.

Every error a user can cause (a missing file, a corrupt checkpoint, an unknown dataset) is printed as
one line, `cnnkit: error: ...`, with exit code 2 and no traceback.
"""

import argparse
import dataclasses
import json
import sys

from cnnkit import __version__
from cnnkit.errors import CnnkitError
from cnnkit.recipes import CALIBRATION_IMAGES, FAST_RECIPE_VALID_SIZE, RECIPES

SOURCES_HELP = "mnist-5k (embedded), mnist, fashion-mnist, idx:DIR, npz:FILE or folder:DIR"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    _add_data(commands)
    return parser


def _add_train(commands):
    p = commands.add_parser(
        "train",
        help="train the chapter's CNN, checkpointing each epoch",
        description="Train the chapter's CNN (Adam 1e-4, batch 64, dropout 0.5, 20 epochs). "
        "Each epoch writes RUN/checkpoints/epoch-NNN.safetensors and a line of RUN/history.jsonl.",
    )
    p.add_argument("--dataset", default=None, help=f"{SOURCES_HELP} (default: mnist, downloaded when absent)")
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="chapter",
        help="chapter: the chapter's schedule (the defaults below); fast: batch 256, one-cycle lr 4e-3, "
        "dropout 0.3, label smoothing 0.1, 7 epochs, 2,000 validation images (options below override it)",
    )
    p.add_argument("--epochs", type=_positive_int, default=None, help="epochs in all (default: 20)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="mini-batch size (default: 64)")
    p.add_argument("--lr", type=_positive_float, default=None, help="Adam's learning rate (default: 1e-4)")
    p.add_argument("--dropout", type=_probability, default=None, help="dropout rate (default: 0.5)")
    p.add_argument(
        "--seed", type=int, default=None, help="seed for weights, batch order and dropout (default: 123)"
    )
    p.add_argument("--no-shuffle", action="store_true", help="keep the training order in every epoch")
    p.add_argument(
        "--valid-size",
        type=_valid_size,
        default=None,
        help="validation images taken from the end of the training split: a count, a fraction, or 0 "
        "(default: 10,000, or a sixth of the training split when that is smaller)",
    )
    p.add_argument(
        "--build", choices=("layers", "lowlevel"), default=None, help="network build (default: layers)"
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=None,
        help="auto uses bf16 autocast where the CPU has native bf16 (AVX512-BF16 or AMX), else fp32",
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: a GPU if present"
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads (default: PyTorch's, one per core); results are bit-reproducible for a given count",
    )
    p.add_argument(
        "--out", default=None, help="run folder (default: runs/DATASET-TIME; with --resume, its own)"
    )
    p.add_argument(
        "--resume", metavar="RUN_OR_CHECKPOINT", default=None, help="continue a run from a checkpoint"
    )
    p.add_argument(
        "--keep", type=_positive_int, default=0, metavar="N", help="keep only the newest N checkpoints"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out folder that holds checkpoints (deletes them)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_train)


def _add_evaluate(commands):
    p = commands.add_parser("evaluate", help="accuracy, loss, per-class accuracy and confusion matrix")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a run folder (its newest)")
    p.add_argument("--dataset", default=None, help=f"{SOURCES_HELP} (default: the one it was trained on)")
    p.add_argument("--split", choices=("test", "valid", "train"), default="test", help="default: test")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="images per forward pass (default: 256 for a float network on a CPU, 1000 for int8 or a GPU)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "int8"),
        default="auto",
        help="auto: bf16 where the CPU has native bf16, else fp32; int8: quantized, calibrated on "
        f"{CALIBRATION_IMAGES} training images (about 1.7x faster than bf16 here)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_evaluate)


def _add_predict(commands):
    p = commands.add_parser(
        "predict",
        help="classify image files (PNG/JPEG, gray, RGB or RGBA)",
        description="Classify image files. A digit is prepared the way MNIST's were made: grayscale, "
        "inverted if the background is light, cropped to the ink, scaled into 20x20, centered by mass in 28x28.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file, or a run folder (its newest)")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    p.add_argument("--proba", action="store_true", help="also print each class's probability")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    p.add_argument(
        "--preprocess",
        choices=("auto", "digit", "object", "resize"),
        default="auto",
        help="digit: MNIST-style; object: Fashion-MNIST-style (crop, fit, center); resize: plain resize "
        "(default: what the checkpoint's dataset needs)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 where the CPU has native bf16, else fp32",
    )
    p.set_defaults(run=run_predict)


def _add_data(commands):
    data = commands.add_parser("data", help="inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_commands.required = True
    info = data_commands.add_parser("info", help="print splits, counts, shapes, classes and statistics")
    info.add_argument("source", help=SOURCES_HELP)
    info.set_defaults(run=run_data_info)


# --- commands ---


def run_train(args) -> int:
    import torch

    from cnnkit.runs import resume_run, start_run

    if args.threads:
        torch.set_num_threads(args.threads)
    show_progress = False if args.quiet else None
    if args.resume:
        fixed = {
            "--dataset": args.dataset,
            "--batch-size": args.batch_size,
            "--lr": args.lr,
            "--dropout": args.dropout,
            "--seed": args.seed,
            "--valid-size": args.valid_size,
            "--build": args.build,
            "--precision": args.precision,
            "--recipe": None if args.recipe == "chapter" else args.recipe,
            "--overwrite": args.overwrite or None,
        }
        given = [name for name, value in fixed.items() if value is not None] + (
            ["--no-shuffle"] * args.no_shuffle
        )
        if given:
            raise CnnkitError(
                f"{', '.join(given)} cannot change when resuming: a resumed run keeps the checkpoint's recipe "
                "(only --epochs, --out, --keep and --device apply)"
            )
        result = resume_run(args.resume, args.epochs, args.out, args.device, args.keep, print, show_progress)
    else:
        chosen = {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "dropout_rate": args.dropout,
            "seed": args.seed,
            "build": args.build,
            "shuffle": False if args.no_shuffle else None,
        }
        config = dataclasses.replace(
            RECIPES[args.recipe],
            precision=args.precision or "auto",
            **{name: value for name, value in chosen.items() if value is not None},
        )
        valid_size = args.valid_size
        if valid_size is None and args.recipe == "fast":
            valid_size = FAST_RECIPE_VALID_SIZE
        result = start_run(
            args.dataset or "mnist",
            config,
            args.out,
            valid_size,
            args.device,
            args.keep,
            print,
            show_progress,
            overwrite=args.overwrite,
        )
    print(f"checkpoint: {result.last_checkpoint}")
    return 0


def run_evaluate(args) -> int:
    import numpy as np
    import torch

    from cnnkit.checkpoint import load_model
    from cnnkit.data import Standardization
    from cnnkit.device import resolve_precision
    from cnnkit.inference import evaluate
    from cnnkit.quantize import quantize_int8
    from cnnkit.runs import load_dataset_for

    model, ckpt = load_model(args.checkpoint)
    meta = ckpt.meta
    source = args.dataset or meta["dataset"]
    input_shape = tuple(meta["architecture"]["input_shape"])
    dataset = load_dataset_for(source, input_shape, ckpt.path)
    if args.split != "test":
        dataset = dataset.split_validation(meta.get("valid_size"))
    split = getattr(dataset, args.split)
    if split is None or len(split) == 0:
        raise CnnkitError(
            f"dataset {source!r} has no {args.split} split; try --split valid or another --dataset"
        )
    _check_fits(model, input_shape, tuple(split.images.shape[1:]), dataset.class_names, source)
    standardization = Standardization.from_dict(meta["standardization"])
    precision = resolve_precision(args.precision if args.precision != "int8" else "fp32", torch.device("cpu"))
    if args.precision == "int8":
        calibration = dataset.train or dataset.valid or split
        model = quantize_int8(model, standardization.apply(calibration.images[:CALIBRATION_IMAGES]))
    result = evaluate(
        model, standardization.apply(split.images), split.labels, args.batch_size, precision=precision
    )
    report = {
        "checkpoint": str(ckpt.path),
        "dataset": source,
        "split": args.split,
        "precision": args.precision,
    }
    report.update(result.to_dict(meta["class_names"]))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{ckpt.path} on {source} ({args.split}, {result.n:,} images)")
    print(f"accuracy {result.accuracy:.4f}  loss {result.loss:.4f}")
    names = meta["class_names"]
    width = max(len(n) for n in names)
    print(f"\n{'class':<{width}}  {'accuracy':>8}  {'n':>6}")
    for name, entry in report["per_class"].items():
        acc = "-" if entry["accuracy"] is None else f"{entry['accuracy']:.4f}"
        print(f"{name:<{width}}  {acc:>8}  {entry['n']:>6}")
    print("\nconfusion matrix (rows: true class, columns: predicted)")
    confusion = np.asarray(report["confusion_matrix"])
    cell = max(len(str(confusion.max())), 3)
    print(" " * width + "  " + " ".join(f"{i:>{cell}}" for i in range(len(names))))
    for i, name in enumerate(names):
        print(f"{name:<{width}}  " + " ".join(f"{v:>{cell}}" for v in confusion[i]) + f"   ({i})")
    return 0


def run_predict(args) -> int:
    import numpy as np
    import torch

    from cnnkit.checkpoint import load_model
    from cnnkit.data import Standardization
    from cnnkit.device import resolve_precision
    from cnnkit.images import load_for_model
    from cnnkit.inference import predict_proba

    model, ckpt = load_model(args.checkpoint)
    meta = ckpt.meta
    style = meta.get("preprocessing", "resize") if args.preprocess == "auto" else args.preprocess
    input_shape = tuple(meta["architecture"]["input_shape"])
    raw = np.stack([load_for_model(path, input_shape, style) for path in args.images])
    precision = resolve_precision(args.precision, torch.device("cpu"))
    proba = predict_proba(
        model, Standardization.from_dict(meta["standardization"]).apply(raw), precision=precision
    )
    names = meta["class_names"]
    results = []
    for path, p in zip(args.images, proba, strict=True):
        label = int(p.argmax())
        entry = {"file": path, "label": label, "class_name": names[label], "confidence": float(p[label])}
        if args.proba:
            entry["probabilities"] = {name: float(v) for name, v in zip(names, p, strict=True)}
        results.append(entry)
    if args.json:
        print(json.dumps(results))
        return 0
    for entry in results:
        print(f"{entry['file']}: {entry['class_name']} ({entry['confidence']:.1%})")
        if args.proba:
            print("  " + "  ".join(f"{name} {v:.3f}" for name, v in entry["probabilities"].items()))
    return 0


def run_data_info(args) -> int:
    from cnnkit.data import info_table, load_dataset

    print(info_table(load_dataset(args.source)))
    return 0


def _check_fits(model, expected, image_shape, class_names, source):
    if image_shape != expected:
        raise CnnkitError(
            f"dataset {source!r} has images of shape {image_shape} (C, H, W) but the model takes {expected}"
        )
    if len(class_names) > model.arch.num_classes:
        raise CnnkitError(
            f"dataset {source!r} has {len(class_names)} classes but the model knows {model.arch.num_classes}"
        )


# --- argument types: each names what was wrong ---


def _checked(convert, accept, expected: str):
    """An argparse type: `convert` the text and `accept` the value, or fail saying what was `expected`."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda value: value >= 1, "a positive whole number")
_positive_float = _checked(float, lambda value: value > 0, "a positive number")
_probability = _checked(float, lambda value: 0 <= value < 1, "a number in [0, 1)")


def _valid_size(text):
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count (e.g. 10000) or a fraction (e.g. 0.1), got {text!r}"
        ) from None
    if value < 0 or (isinstance(value, float) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or a fraction in (0, 1), got {text!r}")
    return value


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CnnkitError as exc:
        print(f"cnnkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cnnkit: interrupted; the last finished epoch's checkpoint is intact", file=sys.stderr)
        return 130
