"""The fused first layer (cnnkit.kernels.conv_pool) built for each instruction-set level, against PyTorch's
composition (oneDNN's convolution, then the fused pooling): forward and backward of the chapter's first
layer, 64 images of 28x28, microseconds (the median of 5 runs of 200). It decides
cnnkit.kernels.conv_pool.FASTER_THAN_ONEDNN.

    python benchmarks/bench_conv_pool.py                          # oneDNN at this CPU's best
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_conv_pool.py  # oneDNN as on an AVX2 CPU
"""

import statistics
import time

import torch
import torch.nn.functional as F

from cnnkit.device import machine_line
from cnnkit.kernels import extension, pooling
from cnnkit.kernels.conv_pool import _ConvPoolReLU


def inputs(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28, generator=generator).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 1, 5, 5, generator=generator) * 0.3
    b = torch.randn(32, generator=generator) * 0.1
    w = w.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    return x.to(dtype), w, b.to(dtype).requires_grad_()


def fused_step(kernels, dtype):
    x, w, b = inputs(dtype)

    def run():
        out = _ConvPoolReLU.apply(x, w, b, kernels.conv_pool)
        out.backward(torch.ones_like(out))

    return run


def composition_step(dtype):
    x, w, b = inputs(dtype)

    def run():
        out = pooling.max_pool_relu(F.conv2d(x, w, b))
        out.backward(torch.ones_like(out))

    return run


def microseconds(run, steps=200, repeats=5) -> float:
    for _ in range(20):
        run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            run()
        samples.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(samples)


def main():
    print(f"# machine: {machine_line()}")
    pooling._resolved = extension._load_extension().pool_relu  # the fused pooling after oneDNN's conv
    levels = extension.ISA_LEVELS[extension.ISA_LEVELS.index(extension.machine_isa()) : -1]
    for dtype in (torch.float32, torch.bfloat16):
        print(f"{dtype}: oneDNN convolution + fused pooling {microseconds(composition_step(dtype)):,.0f} us")
        for level in levels:
            kernels = extension._load_extension(level)
            print(f"{dtype}: fused, built for {level} {microseconds(fused_step(kernels, dtype)):,.0f} us")


if __name__ == "__main__":
    main()
