"""`cnnkit train`: a new run, a resumed one, or a torchrun (re)start; the training settings' options are
made from TrainConfig's metadata (see cnnkit.cli.arguments)."""

import argparse
import os

from cnnkit.cli.arguments import (
    SOURCES_HELP,
    TRAIN_SETTINGS,
    add_runtime,
    add_setting,
    log,
    nonempty,
    positive_int,
    runtime,
    scale_range,
    setting_option,
    size,
    valid_size,
)
from cnnkit.errors import ArgumentError
from cnnkit.recipes import (
    AFFINE_RANGES,
    DATASET_DEFAULTS,
    RECIPES,
    SETTINGS,
)


def add_train(commands):
    p = commands.add_parser(
        "train",
        help="train a CNN (the chapter's, or a small ResNet for photos), checkpointing each epoch",
        description="Train the chapter's CNN (Adam 1e-4, batch 64, dropout 0.5, 20 epochs) on grayscale "
        "images, or a small ResNet with the photos recipe on color images (--arch, --recipe). "
        "Each epoch writes RUN/checkpoints/epoch-NNN.safetensors and a line of RUN/history.jsonl "
        "and RUN/metrics.csv.",
    )
    p.add_argument(
        "--dataset",
        type=nonempty,
        default=None,
        help=f"{SOURCES_HELP} (default: mnist, downloaded when absent)",
    )
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=None,
        help="chapter (default for grayscale images): the chapter's schedule (the defaults below); photos "
        "(default for color images, with --arch resnet): random crops padded by 4 px and left-right flips, "
        "batch 128, SGD with Nesterov momentum and weight decay 5e-4, one-cycle lr 0.4, label smoothing 0.1, "
        "no dropout, about 1,200,000 training images in all (24 to 120 epochs); fast: batch 256, one-cycle lr "
        "4e-3, dropout 0.3, label smoothing 0.1, 7 epochs, min(2,000, 10%%) validation images; accurate: "
        "one-cycle lr 1e-3, label smoothing 0.1, --augment affine for digits (--flip instead for objects and photos), "
        "about 240,000 training images in all (30 to 60 epochs), min(2,000, 10%%) validation images "
        "(options below override them)",
    )
    for name in TRAIN_SETTINGS[: TRAIN_SETTINGS.index("shear")]:  # --scale joins the affine ones here
        add_setting(p, name)
    p.add_argument(
        "--scale",
        type=scale_range,
        default=None,
        metavar="LO,HI",
        help="affine: a size factor from LO to HI (default: 0.9,1.1)",
    )
    add_setting(p, "shear")
    add_setting(p, "pad")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mirror half of the training images left-right, for data where that keeps the class (clothes, "
        "photos; never digits) (default: off; the accurate recipe: on for objects and photos, without affine)",
    )
    add_setting(p, "seed")
    p.add_argument("--no-shuffle", action="store_true", help="keep the training order in every epoch")
    p.add_argument(
        "--valid-size",
        type=valid_size,
        default=None,
        help="validation images taken from the end of the training split: a count, a fraction, or 0 "
        "(default: 10,000, or a sixth of the training split when that is smaller)",
    )
    p.add_argument(
        "--image-size",
        type=size,
        default=None,
        metavar="HxW",
        help="bring every image to this size (default for folder: sources: the most common size, "
        "capped at 64 pixels on its longer side)",
    )
    for name in TRAIN_SETTINGS[TRAIN_SETTINGS.index("build") :]:
        add_setting(p, name)
    add_runtime(p)
    p.add_argument(
        "--out",
        type=nonempty,
        default=None,
        help="run folder (default: runs/DATASET-TIME; with --resume, its own)",
    )
    p.add_argument(
        "--resume",
        type=nonempty,
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
        type=positive_int,
        default=None,
        metavar="N",
        help="train as N processes on this machine with torchrun and DDP (the batch stays the global one, "
        "split among them); for several machines, start torchrun yourself (see docs/distributed.md)",
    )
    p.set_defaults(run=run_train)


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
    with distributed.process_group(runtime(args)) as device:
        return _train(args, device)


def _global_batch_size(args) -> int:
    if args.resume:
        from cnnkit.checkpoint import read_record, resolve_checkpoint

        return read_record(resolve_checkpoint(args.resume)).config.batch_size
    return args.batch_size or RECIPES[args.recipe or "chapter"].batch_size


def _dataset_defaults(args, chosen: dict) -> list[str]:
    """The settings cnnkit may choose for the dataset (see recipes.for_dataset): with no --recipe, every
    setting not given (the photos recipe's for a ResNet), else those of DATASET_DEFAULTS not given."""
    if args.recipe is None:
        return ["recipe", *(name for name in SETTINGS if chosen.get(name) is None and name != "recipe")]
    return [name for name in DATASET_DEFAULTS if chosen.get(name) is None]


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
                setting_option(n): getattr(args, n)
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
        if args.augment is None and args.pad is not None:
            chosen["augment"] = "crop"
        config = dataclasses.replace(
            RECIPES[args.recipe or "chapter"],
            precision=args.precision or "auto",
            **{name: value for name, value in chosen.items() if value is not None},
        )
        result = start_run(
            args.dataset or "mnist",
            config,
            args.out,
            dataset_defaults=_dataset_defaults(args, chosen),
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
