"""`cnnkit evaluate` and `cnnkit predict`: a model, an ensemble or an .onnx file meeting a dataset or
image files."""

import json

from cnnkit.cli.arguments import (
    CHECKPOINT_OR_ONNX_HELP,
    SOURCES_HELP,
    SPLIT_HELP,
    SPLITS,
    TTA_HELP,
    add_runtime,
    add_which,
    log,
    nonempty,
    positive_int,
    runtime,
)
from cnnkit.errors import ArgumentError, no_dataset_recorded
from cnnkit.recipes import (
    CALIBRATION_IMAGES,
)


def add_evaluate(commands):
    p = commands.add_parser("evaluate", help="accuracy, loss, per-class accuracy and confusion matrix")
    p.add_argument("checkpoint", type=nonempty, metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_OR_ONNX_HELP)
    p.add_argument(
        "more",
        type=nonempty,
        nargs="*",
        metavar="RUN_OR_CHECKPOINT",
        help="more models: an ensemble, whose averaged probabilities are scored (same classes and input shape)",
    )
    add_which(p)
    p.add_argument(
        "--dataset", type=nonempty, default=None, help=f"{SOURCES_HELP} (default: the one it was trained on)"
    )
    p.add_argument("--split", choices=SPLITS, default="test", help=SPLIT_HELP)
    p.add_argument("--tta", action="store_true", help=TTA_HELP)
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="images per forward pass (default: 256 for a float network on a CPU, 1000 for int8 or a GPU)",
    )
    add_runtime(p, precisions=("auto", "fp32", "bf16", "int8"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_evaluate)


def add_predict(commands):
    p = commands.add_parser(
        "predict",
        help="classify image files (PNG/JPEG, gray, RGB or RGBA)",
        description="Classify image files. A digit is prepared the way MNIST's were made: grayscale, "
        "inverted if the background is light, cropped to the ink, scaled into 20x20, centered by mass in 28x28.",
    )
    p.add_argument("checkpoint", type=nonempty, metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_OR_ONNX_HELP)
    p.add_argument(
        "images",
        type=nonempty,
        metavar="IMAGE",
        nargs="+",
        help="image files; run folders and checkpoint files before them join the first model in an "
        "ensemble, whose probabilities are averaged",
    )
    add_which(p)
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
    add_runtime(p)
    p.set_defaults(run=run_predict)


def run_evaluate(args) -> int:
    from cnnkit.onnx_model import is_onnx_path

    models = [args.checkpoint, *args.more]
    if len(models) == 1 and not args.tta and is_onnx_path(args.checkpoint):
        return _evaluate_onnx(args)
    from cnnkit.checkpoint import load_network
    from cnnkit.device import resolve_precision
    from cnnkit.evaluation import evaluate_ensemble, evaluate_split, evaluation_split, load_ensemble
    from cnnkit.quantize import quantize_int8

    device = runtime(args)
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
    source, dataset, split = evaluation_split(record, ckpt.path, args.dataset, args.split, with_train=int8)
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
    from cnnkit.data import resolve_source, scoring_test_files, split_for_model
    from cnnkit.metrics import evaluate_logits
    from cnnkit.onnx_model import load_onnx

    classifier = load_onnx(args.checkpoint, args.threads)
    meta = classifier.metadata
    _check_onnx_options(args, meta.precision)
    source = resolve_source(args.dataset) if args.dataset else meta.dataset
    if source is None:
        raise no_dataset_recorded(args.checkpoint)
    test_files = scoring_test_files(source, meta.dataset, None, args.split)  # an .onnx file lists none
    _, split = split_for_model(
        source, meta.input_shape, meta.class_names, meta.valid_size, args.split, test_files=test_files
    )
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

    device = runtime(args)
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
