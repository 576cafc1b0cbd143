"""The `cnnkit` command line."""

import argparse
import sys

from cnnkit import __version__
from cnnkit.errors import CnnkitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnkit",
        description="Convolutional neural networks for image classification.",
    )
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    data = commands.add_parser("data", help="inspect datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data_commands.required = True
    info = data_commands.add_parser("info", help="print splits, counts, shapes, classes and statistics")
    info.add_argument("source", help="mnist-5k, mnist, fashion-mnist, idx:DIR, npz:FILE or folder:DIR")
    info.set_defaults(run=run_data_info)
    return parser


def run_data_info(args) -> int:
    from cnnkit.data import info_table, load_dataset

    print(info_table(load_dataset(args.source)))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CnnkitError as exc:
        print(f"cnnkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return 130
