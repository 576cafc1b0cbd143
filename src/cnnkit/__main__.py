"""`python -m cnnkit` and the `cnnkit` command (see cnnkit.cli).

Until `main` takes over, Ctrl-C exits quietly with code 130: importing the command's modules takes a
moment, and an interrupt then should not print a traceback of the import machinery.
"""

import signal
import sys


def _exit_quietly(signum, frame):
    sys.exit(128 + signum)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _exit_quietly)

from cnnkit.cli import main  # noqa: E402 (after the handler, on purpose)

if __name__ == "__main__":
    raise SystemExit(main())
