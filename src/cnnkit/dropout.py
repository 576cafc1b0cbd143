"""Dropout for every network cnnkit builds: the chapter's (both builds) and the ResNet's head."""

import torch
from torch import nn

_INT64 = torch.iinfo(torch.int64)


def dropout(x, p: float, training: bool = True):
    """Zero each element with probability p and scale the rest by 1 / (1 - p), as nn.Dropout.

    The mask comes from 64-bit random words, 16 bits an element (p is resolved to 1/65536), drawn
    from torch's generator: on a CPU that is about 4x faster than torch's bernoulli_ (0.7 against
    3.3 ms for a 256 x 1024 batch here), which was 9% of a training step.
    """
    if not training or p == 0:
        return x
    n = x.numel()
    words = torch.randint(_INT64.min, _INT64.max, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform16 = words.view(torch.int16)[:n].view(x.shape).to(torch.int32) + 32768  # 0 .. 65535
    keep = uniform16 >= round(p * 65536)
    return x * keep * (1.0 / (1.0 - p))


class Dropout(nn.Module):
    """`dropout` as a layer (the layer build's counterpart of nn.Dropout)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
