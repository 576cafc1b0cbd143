"""`python -m cnnkit` and the `cnnkit` command (see cnnkit.cli).

Until `main` takes over, Ctrl-C ends the process at once with code 130 and prints nothing: importing
the command's modules takes a moment, and an interrupt then should not print a traceback of the import
machinery. The handler ends the process rather than raise an exception, because a compiled module's
import (NumPy's) turns an exception raised inside it into an ImportError with a traceback of its own.
It is set before any other import (`_signal` and `os` are loaded by Python's start-up); what remains
uncovered is Python's own start-up before this module runs.
"""

import _signal
import os


def _exit_quietly(signum, frame):
    os._exit(128 + signum)  # nothing is written yet: no output to flush, no file to finish


if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # not when ignored (nohup, `&`)
    _signal.signal(_signal.SIGINT, _exit_quietly)

from cnnkit.cli import main  # noqa: E402 (after the handler, on purpose)

if __name__ == "__main__":
    raise SystemExit(main())
