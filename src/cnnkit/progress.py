"""A small progress bar for terminals; silent when the output is not a terminal."""

import sys
import time


class ProgressBar:
    """Draws `desc [#####     ] 41% 2.1/5.0 MB 3.2 MB/s` on one line, redrawn at most 10 times a second.

    `enabled=None` draws only when `file` is a terminal, so logs and pipes stay clean.
    `scale` and `unit` format the counts (e.g. scale=1e6, unit="MB" for bytes).
    """

    def __init__(self, total, desc="", unit="", scale=1.0, file=None, enabled=None, width=30):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.scale = scale
        self.file = file if file is not None else sys.stderr
        self.enabled = _isatty(self.file) if enabled is None else enabled
        self.width = width
        self.count = 0
        self.suffix = ""
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, n=1, suffix=None):
        self.count += n
        if suffix is not None:
            self.suffix = suffix
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw >= 0.1 or self.count >= (self.total or 0)):
            self._last_draw = now
            self._draw(now)

    def close(self):
        if self.enabled:
            self._draw(time.perf_counter())
            self.file.write("\n")
            self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _draw(self, now):
        elapsed = max(now - self._start, 1e-9)
        rate = self.count / self.scale / elapsed
        count = _fmt(self.count / self.scale)
        if self.total:
            frac = min(self.count / self.total, 1.0)
            filled = int(frac * self.width)
            bar = "#" * filled + " " * (self.width - filled)
            text = f"{self.desc} [{bar}] {frac:4.0%} {count}/{_fmt(self.total / self.scale)} {self.unit}"
        else:
            text = f"{self.desc} {count} {self.unit}"
        text += f" {_fmt(rate)} {self.unit}/s" + (f" {self.suffix}" if self.suffix else "")
        self.file.write("\r" + text + "\033[K")
        self.file.flush()


def _fmt(x):
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _isatty(file):
    try:
        return file.isatty()
    except (AttributeError, ValueError):
        return False
