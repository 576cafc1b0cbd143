"""int8 inference: post-training static quantization of the layer build for x86 CPUs.

Weights are quantized per output channel, activations per tensor with ranges observed on calibration
images; convolutions and matrix products then run on int8 (VNNI) kernels, about 3x the speed of bf16
here (see docs/performance.md). Predictions agree with fp32 on >= 99% of a test set (a test).
It uses torch.ao.quantization's FX mode, which PyTorch marks deprecated but still ships (2.13).
"""

import copy
import warnings

import torch

from cnnkit.errors import ArgumentError
from cnnkit.layer_outputs import reference_network
from cnnkit.recipes import CALIBRATION_IMAGES


def quantize_int8(model, calibration_images) -> torch.nn.Module:
    """An int8 copy of `model` (either network, either build) for CPU inference; `model` itself is left as it is.

    calibration_images: standardized images (N, C, H, W) like those it will see, e.g. a few hundred
    training images; activation ranges are observed on them. Returns a module mapping images to
    float32 logits.
    """
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError:
        raise ArgumentError(
            "--precision int8 needs torch.ao.quantization, which this PyTorch does not ship; use bf16 or fp32"
        ) from None
    layers = copy.deepcopy(reference_network(model))  # PyTorch's modules, which FX quantization knows
    images = torch.as_tensor(calibration_images, dtype=torch.float32)[:CALIBRATION_IMAGES].contiguous()
    if len(images) == 0:
        raise ArgumentError("int8 quantization needs calibration images; got none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notices of torch.ao.quantization
        prepared = prepare_fx(layers, get_default_qconfig_mapping("x86"), example_inputs=(images[:1],))
        with torch.inference_mode():
            for start in range(0, len(images), 256):
                prepared(images[start : start + 256])
        quantized = convert_fx(prepared)
    return Int8CNN(quantized, model.arch)


class Int8CNN(torch.nn.Module):
    """A quantized network: float32 images in, float32 logits out."""

    prefers_large_batches = True  # its int8 kernels keep getting faster up to batches of 1,000 and more

    def __init__(self, quantized: torch.nn.Module, arch):
        super().__init__()
        self.quantized = quantized
        self.arch = arch

    def forward(self, x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized kernels repeat torch.ao's deprecation notice
            return self.quantized(x.contiguous())
