"""Moved to cnnkit.layer_outputs (this name hid the standard library's inspect); kept for code that
imports it."""

from cnnkit.layer_outputs import DESCRIPTIONS, LAYERS, activations, filters, layer_weights

__all__ = ["DESCRIPTIONS", "LAYERS", "activations", "filters", "layer_weights"]
