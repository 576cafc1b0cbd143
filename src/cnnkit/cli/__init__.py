"""The `cnnkit` command line: train, evaluate, predict, export, summary, report, explain, data info, serve.

`main` (cnnkit.cli.main) is the one place that turns exceptions into one line and an exit code; each
command group has a module: `train`, `evaluate` (evaluate and predict), `models` (export, summary,
report, serve) and `learn` (explain, data info); `arguments` holds the argument types and the options
several commands share.
"""

from cnnkit.cli.arguments import log
from cnnkit.cli.main import build_parser, main

__all__ = ["build_parser", "log", "main"]
