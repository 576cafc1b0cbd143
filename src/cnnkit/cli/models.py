"""Commands about a trained model: `export` (ONNX), `summary`, `report` (pictures) and `serve` (a page
and a JSON API)."""

import json

from cnnkit.cli.arguments import (
    CHECKPOINT_HELP,
    SOURCES_HELP,
    SPLIT_HELP,
    SPLITS,
    add_runtime,
    add_which,
    log,
    nonempty,
    port,
    positive_float,
    positive_int,
    runtime,
)
from cnnkit.errors import DependencyError
from cnnkit.recipes import (
    CALIBRATION_IMAGES,
)


def add_export(commands):
    p = commands.add_parser(
        "export",
        help="write a trained model as one .onnx file, to run with onnxruntime without PyTorch",
        description="Write a trained model as one self-contained .onnx file: raw pixels in (float32, "
        "N x C x H x W, the values of the training images), the checkpoint's standardization inside, "
        "logits and probabilities out, class names and preprocessing in its metadata. `cnnkit predict` "
        'and `cnnkit evaluate` run it. Needs the onnx extra: pip install "cnnkit[onnx]".',
    )
    p.add_argument("checkpoint", type=nonempty, metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    add_which(p)
    p.add_argument("-o", "--out", type=nonempty, required=True, metavar="FILE.onnx", help="the file to write")
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="fp32 (default), or int8: onnxruntime's static quantization, calibrated on the first "
        f"{CALIBRATION_IMAGES} training images",
    )
    p.add_argument(
        "--dataset",
        type=nonempty,
        default=None,
        help=f"where int8's calibration images and agreement test come from: {SOURCES_HELP} "
        "(default: the one it was trained on)",
    )
    p.set_defaults(run=run_export)


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


def add_summary(commands):
    p = commands.add_parser(
        "summary", help="a trained model's layers, shapes, parameters, classes and training"
    )
    p.add_argument("checkpoint", type=nonempty, metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    add_which(p)
    p.set_defaults(run=run_summary)


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


def add_report(commands):
    p = commands.add_parser(
        "report",
        help="pictures of a trained model: learning curves, confusion matrix, mistakes, feature maps, ...",
        description="Write a folder (default: RUN/report/) with index.html (one page that opens from disk), "
        "a PNG per figure and report.json (the numbers behind them; accuracy and confusion_matrix as "
        "`cnnkit evaluate --json` gives them).",
    )
    p.add_argument("checkpoint", type=nonempty, metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    add_which(p)
    p.add_argument(
        "--dataset", type=nonempty, default=None, help=f"{SOURCES_HELP} (default: the one it was trained on)"
    )
    p.add_argument("--split", choices=SPLITS, default="test", help=SPLIT_HELP)
    p.add_argument("--out", type=nonempty, default=None, metavar="DIR", help="default: RUN/report")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per forward pass")
    add_runtime(p)
    p.set_defaults(run=run_report)


def run_report(args) -> int:
    import time

    started = time.time()  # before torch and the report's modules load: the footer's time is the wall time

    from cnnkit.viz.report import write_report

    device = runtime(args)
    folder = write_report(
        args.checkpoint,
        args.out,
        args.which,
        args.dataset,
        args.split,
        args.precision or "auto",
        device,
        args.batch_size,
        started=started,
    )
    report = json.loads((folder / "report.json").read_text())
    accuracy = "-" if report["accuracy"] is None else f"{report['accuracy']:.4f}"
    log(f"accuracy {accuracy} on {report['n']:,} {report['split']} images of {report['dataset']}")
    log(
        f"report: {folder / 'index.html'} ({len(report['figures'])} figures and report.json, "
        f"{report['seconds']:.1f} s)"
    )
    return 0


def add_serve(commands):
    p = commands.add_parser(
        "serve",
        help="a local web page: draw a digit and watch every layer answer; and a JSON API",
        description="Serve a web page where you draw or drop an image and see the network's answer "
        "layer by layer, its learning curves, and a JSON API (POST /api/predict; docs at /docs). "
        "Runs until Ctrl-C.",
    )
    p.add_argument("checkpoints", type=nonempty, nargs="+", metavar="RUN_OR_CHECKPOINT", help=CHECKPOINT_HELP)
    add_which(p)
    p.add_argument(
        "--host",
        type=nonempty,
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--port", type=port, default=8000, help="default: 8000; 0 picks a free port")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="inference threads, one request each (default: the CPUs this process may use, at most 4)",
    )
    p.add_argument(
        "--allow-host",
        type=nonempty,
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the server may be reached under, besides IP addresses, localhost and --host "
        "(repeatable); requests naming another in their Host header get 400, which stops DNS rebinding",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="a connection must send each whole request (headers and body) within this many seconds of "
        "opening or of its last answer, or it is closed (default: 20)",
    )
    p.set_defaults(run=run_serve)


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
