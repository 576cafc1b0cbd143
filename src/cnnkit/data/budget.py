"""How much memory the arrays made from a dataset may take: one budget, asked before each is made.

Every large array cnnkit makes from an input (the uint8 images decoded from an IDX file, an npz member
or a folder of images, their labels as int64, converted or resized copies, and the standardized
float32 images that training holds) is first reserved here with the bytes it will take, beside the
bytes already made from the same data. A file's header says how large its arrays are, so a 2 MB
archive that would inflate to 2 GB is refused before it is inflated, and the float32 copy training
makes (four times the uint8 images) is refused before it is made, with one line naming the file and
the array.

The budget is $CNNKIT_MAX_DATA_MB megabytes (MiB) when set, else the smaller of half the memory
available when cnnkit starts (MemAvailable in /proc/meminfo) and DEFAULT_MAX_BYTES: enough for
MNIST (about 250 MB in training) and CIFAR-10 (about 800 MB), and under the 2 GiB that one array of
a file may declare. Scratch arrays of a fixed size (a chunk of statistics, a sample of images, one
decoded photo) are not counted.
"""

import functools

import numpy as np

from cnnkit.errors import DatasetError, positive_number_from_env

BUDGET_ENV = "CNNKIT_MAX_DATA_MB"
DEFAULT_MAX_BYTES = 1024**3
MB = 1024**2


def data_memory_limit() -> int:
    """The data memory budget in bytes: $CNNKIT_MAX_DATA_MB MiB, else min(MemAvailable / 2, DEFAULT_MAX_BYTES).

    Raises DatasetError when CNNKIT_MAX_DATA_MB is set to anything but a positive number.
    """
    value = positive_number_from_env(BUDGET_ENV, "megabytes, e.g. 4096", DatasetError)
    return _default_limit() if value is None else int(value * MB)


@functools.cache
def _default_limit() -> int:
    # Read once: what is available falls as the data is loaded, which the budget counts already.
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(
                int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration, ValueError, IndexError):
        return DEFAULT_MAX_BYTES
    return min(available // 2, DEFAULT_MAX_BYTES)


def array_bytes(*arrays) -> int:
    """The bytes of memory behind NumPy `arrays`, each buffer counted once (a view counts its base's)."""
    bases = {}
    for array in arrays:
        base = array
        while isinstance(base.base, np.ndarray):
            base = base.base
        bases[id(base)] = base.nbytes
    return sum(bases.values())


class MemoryBudget:
    """The bytes of the arrays made from one input, each reserved against `data_memory_limit()` before
    it is made. `held` starts as what is already in memory (see `array_bytes`)."""

    def __init__(self, held: int = 0):
        self.held = int(held)
        self.limit = data_memory_limit()

    def reserve(self, nbytes: int, what: str) -> None:
        """Count `nbytes` more, or raise DatasetError: one line saying `what` (the file and the array,
        e.g. "data.npz: X_train (60,000 x 28 x 28 uint8)"), its size and the budget."""
        nbytes = int(nbytes)
        if self.held + nbytes > self.limit:
            beside = f" beside the {_mb(self.held)} already loaded" if self.held >= MB else ""
            raise DatasetError(
                f"{what} would take {_mb(nbytes)}{beside}, over cnnkit's data memory budget "
                f"of {_mb(self.limit)}; set {BUDGET_ENV} (megabytes) to allow more"
            )
        self.held += nbytes

    def release(self, nbytes: int) -> None:
        """Count `nbytes` less: an array reserved before was freed (the source of a converted copy)."""
        self.held = max(0, self.held - int(nbytes))


def _mb(nbytes: int) -> str:
    return f"{nbytes / MB:,.0f} MB" if nbytes >= MB else f"{nbytes:,} bytes"
