"""Moved to cnnkit.kernels.extension; this name is kept for code that imports it."""

from cnnkit.kernels.extension import (
    ISA_LEVELS,
    building_message,
    isa,
    isa_cap,
    load,
    machine_isa,
    start_loading,
)

__all__ = ["ISA_LEVELS", "building_message", "isa", "isa_cap", "load", "machine_isa", "start_loading"]
