"""The `cnnkit` command's entry: the parser made of every command group's options, and `main`.

`main` is the one place that turns exceptions into output: every error a user can cause (a missing
file, a corrupt checkpoint, an unknown dataset, a full disk, a read-only folder) is printed as one
line, `cnnkit: error: ...`, with exit code 2 and no traceback; SIGINT and SIGTERM end training with
a line saying which checkpoint is on disk (exit 130); a closed pipe on stdout silences the output
without stopping a training run.
"""

import argparse
import os
import signal
import sys

from cnnkit import __version__
from cnnkit.cli.arguments import Parser, silence_stdout
from cnnkit.cli.evaluate import add_evaluate, add_predict
from cnnkit.cli.learn import add_data, add_explain
from cnnkit.cli.models import add_export, add_report, add_serve, add_summary
from cnnkit.cli.train import add_train
from cnnkit.errors import CnnkitError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cnnkit",
        description="Convolutional neural networks for image classification.",
        epilog="Run `cnnkit COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    add_train(commands)
    add_evaluate(commands)
    add_predict(commands)
    add_export(commands)
    add_summary(commands)
    add_report(commands)
    add_explain(commands)
    add_data(commands)
    add_serve(commands)
    return parser


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
        silence_stdout()
        return 141  # as a program killed by SIGPIPE
    except OSError as exc:  # a full disk, a read-only or missing folder: say which file and why
        where = f"{exc.filename}: " if exc.filename else ""
        return _last_line(f"cnnkit: error: {where}{exc.strerror or exc}", 2)
    except MemoryError:
        return _last_line("cnnkit: error: out of memory", 2)
