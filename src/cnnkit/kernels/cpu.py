"""The fast path's process-wide CPU settings: how glibc keeps freed memory, and oneDNN for fp32 matrix
products. Each is one function; `give_back_large_blocks` is the opposite memory policy, for a
long-running server (cnnkit serve), and once chosen it holds for the process."""

import contextlib
import ctypes
import sys

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_policy = None  # "keep" or "give back", once chosen


@contextlib.contextmanager
def onednn_fp32_matmul():
    """fp32 matrix products through oneDNN instead of MKL, whose SGEMM takes its AVX2 path on AMD CPUs
    (a 64 x 1024 x 1024 product on a 2-core AVX-512 EPYC: 956 us in MKL, 722 in oneDNN).

    torch's switch for that is float32_matmul_precision "medium", which also lets oneDNN compute in
    bf16 on CPUs with AMX: `autocast` uses it only on CPUs without AMX, where the products stay fp32
    (the error against float64 of that product of N(0, 1) numbers: 9.7e-5 through oneDNN, 5.3e-5
    through MKL, 0.6 in bf16). The setting is global to the process; it is restored on the way out.
    """
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def keep_freed_memory():
    """Let glibc keep freed blocks of up to 32 MB for reuse instead of handing them back to the kernel.

    A training step frees and allocates the same large buffers again and again (the dense layer's
    1024 x 1024 weights cast to bf16, its gradient); glibc's defaults hand such blocks back and map
    fresh ones, whose every 4 KB page then faults when first touched. Measured for the dense layer
    alone (bf16, batch 64, forward and backward): 240-390 page faults and 1.9 ms a step by default,
    2 faults and 1.3 ms with this. Does nothing outside glibc, or after `give_back_large_blocks`.
    """
    global _policy
    if _policy is None:
        _policy = "keep"
        _mallopt((M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 64 * 2**20))


def give_back_large_blocks():
    """Have glibc map each block of 1 MB or more on its own and unmap it when freed; `keep_freed_memory`
    then does nothing. By default glibc learns to keep freed blocks as large as a decoded image in the
    freeing thread's arena, so each of cnnkit serve's workers kept its own peak: 10 uploads of 16
    megapixels took the server up by 364 MB with 4 workers (2 decoding at once), 286 MB with this, and
    its memory returned to where it was."""
    global _policy
    _policy = "give back"
    _mallopt((M_MMAP_THRESHOLD, 2**20))  # which also stops glibc adjusting it


def _mallopt(*settings):
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own allocator's policy holds
        libc = ctypes.CDLL("libc.so.6")
        for parameter, value in settings:
            libc.mallopt(parameter, value)
