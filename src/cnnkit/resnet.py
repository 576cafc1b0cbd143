"""A small residual network for photos, beside the chapter's CNN: `--arch resnet`.

It is the layout of David Page's ResNet-9 (the DAWNBench CIFAR-10 network) at a quarter of its width,
sized for a 2-core CPU:

    prep    conv 3x3 (w0) -> batch norm -> ReLU
    stage1  conv 3x3 (w1) -> batch norm -> ReLU -> max-pool 2x2 -> residual block (w1)
    stage2  conv 3x3 (w2) -> batch norm -> ReLU -> max-pool 2x2
    stage3  conv 3x3 (w3) -> batch norm -> ReLU -> max-pool 2x2 -> residual block (w3)
    head    global average pooling -> dropout -> dense (logits)

A residual block adds its input to two more (conv 3x3 -> batch norm -> ReLU) layers: x + f(x). Every
convolution pads by 1 (SAME), so only the pooling shrinks the maps; pooling rounds up (ceil), so any
image of at least 1x1 pixel fits. Global average pooling makes the parameter count independent of the
image size (the chapter's dense layer grows with it: 11.1 M parameters at 64x64 RGB).

`ResNetArchitecture` holds the shapes a checkpoint needs to rebuild it, as `model.Architecture` does for
the chapter's network, and answers the same questions (layers, parameters, the maps cnnkit shows).
"""

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

from torch import nn

from cnnkit.dropout import Dropout


@dataclass(frozen=True)
class ResNetArchitecture:
    """The shapes of the residual network: input (C, H, W), classes, and the widths of prep and stages 1-3."""

    network: ClassVar[str] = "resnet"
    builds: ClassVar[tuple[str, ...]] = ("layers",)

    input_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    widths: tuple[int, int, int, int] = (16, 32, 64, 128)
    dropout_rate: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        object.__setattr__(self, "widths", tuple(int(v) for v in self.widths))
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {self.input_shape}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"widths must be four positive channel counts, got {self.widths}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    def layers(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(layer, output shape, parameters) from input to logits."""
        c, h, w = self.input_shape
        w0, w1, w2, w3 = self.widths
        rows = [("input", self.input_shape, 0)]

        def conv(name, c_in, c_out):
            return (
                f"{name} 3x3, {c_out} filters, SAME + batch norm + ReLU",
                (c_out, h, w),
                _conv_bn(c_in, c_out),
            )

        rows.append(conv("prep conv", c, w0))
        for stage, (c_in, c_out, residual) in enumerate(((w0, w1, True), (w1, w2, False), (w2, w3, True)), 1):
            rows.append(conv(f"stage{stage} conv", c_in, c_out))
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            rows.append((f"stage{stage} max-pool 2x2", (c_out, h, w), 0))
            if residual:
                rows.append(
                    (
                        f"stage{stage} residual block: x + 2 x (conv 3x3 + BN + ReLU)",
                        (c_out, h, w),
                        2 * _conv_bn(c_out, c_out),
                    )
                )
        rows.append(("global average pooling", (w3,), 0))
        if self.dropout_rate:
            rows.append((f"dropout {self.dropout_rate:g}", (w3,), 0))
        rows.append((f"dense {self.num_classes} (logits)", (self.num_classes,), (w3 + 1) * self.num_classes))
        return rows

    @property
    def num_parameters(self) -> int:
        """Weights and biases (batch norm's scale and shift counted; its running statistics not)."""
        return sum(n for _, _, n in self.layers())

    def to_dict(self) -> dict:
        return {"network": self.network, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ResNetArchitecture":
        return cls(**{k: v for k, v in d.items() if k != "network"})


def _conv_bn(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + 2 * c_out  # a 3x3 convolution without bias, batch norm's scale and shift


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    """x + f(x), f being two (conv 3x3 -> batch norm -> ReLU) layers of the same width."""

    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Sequential(conv_bn_relu(channels, channels), conv_bn_relu(channels, channels))

    def forward(self, x):
        return x + self.branch(x)


class ResNet(nn.Module):
    """The residual network of this module's docstring, from torch.nn modules.

    `ACTIVATIONS` names the modules whose outputs cnnkit.layer_outputs reports, `FILTERS` the
    convolutions whose kernels it shows, `DESCRIPTIONS` what each reported layer is, and `STAGES` how a
    page groups them.
    """

    ACTIVATIONS: ClassVar[dict[str, str]] = {
        "prep.1": "conv0",
        "prep.2": "relu0",
        "stage1.1": "conv1",
        "stage1.2": "relu1",
        "stage1.3": "pool1",
        "stage1.4": "block1",
        "stage2.1": "conv2",
        "stage2.2": "relu2",
        "stage2.3": "pool2",
        "stage3.1": "conv3",
        "stage3.2": "relu3",
        "stage3.3": "pool3",
        "stage3.4": "block3",
        "head.1": "features",
        "head.3": "logits",
    }
    FILTERS: ClassVar[dict[str, str]] = {
        "prep.0": "conv0",
        "stage1.0": "conv1",
        "stage2.0": "conv2",
        "stage3.0": "conv3",
    }
    DESCRIPTIONS: ClassVar[dict[str, str]] = {
        "input": "the image as the network receives it (standardized)",
        "conv0": "prep: 3x3 convolution then batch norm, one map per filter, before ReLU",
        "relu0": "ReLU of the prep convolution",
        "conv1": "stage 1: 3x3 convolution then batch norm, before ReLU",
        "relu1": "ReLU of stage 1's convolution",
        "pool1": "max-pooling 1 (2x2, stride 2): the strongest answer in each 2x2 block",
        "block1": "residual block 1: pooling 1's maps plus two more convolutions of them (x + f(x))",
        "conv2": "stage 2: 3x3 convolution then batch norm, before ReLU",
        "relu2": "ReLU of stage 2's convolution",
        "pool2": "max-pooling 2 (2x2, stride 2)",
        "conv3": "stage 3: 3x3 convolution then batch norm, before ReLU",
        "relu3": "ReLU of stage 3's convolution",
        "pool3": "max-pooling 3 (2x2, stride 2)",
        "block3": "residual block 3: pooling 3's maps plus two more convolutions of them",
        "features": "global average pooling: each of block 3's maps averaged to one number",
        "logits": "the dense layer: one score per class",
        "probabilities": "softmax of the scores",
    }
    STAGES: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (
        ("Prep convolution", ("conv0", "relu0")),
        ("Stage 1", ("conv1", "relu1", "pool1", "block1")),
        ("Stage 2", ("conv2", "relu2", "pool2")),
        ("Stage 3", ("conv3", "relu3", "pool3", "block3")),
        ("Global average", ("features",)),
    )

    def __init__(self, arch: ResNetArchitecture = ResNetArchitecture()):
        super().__init__()
        self.arch = arch
        w0, w1, w2, w3 = arch.widths
        self.prep = conv_bn_relu(arch.input_shape[0], w0)
        self.stage1 = nn.Sequential(*conv_bn_relu(w0, w1), _pool(), Residual(w1))
        self.stage2 = nn.Sequential(*conv_bn_relu(w1, w2), _pool())
        self.stage3 = nn.Sequential(*conv_bn_relu(w2, w3), _pool(), Residual(w3))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), Dropout(arch.dropout_rate), nn.Linear(w3, arch.num_classes)
        )

    def forward(self, x):
        return self.head(self.stage3(self.stage2(self.stage1(self.prep(x)))))


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(2, 2, ceil_mode=True)


def init_weights(network: ResNet, generator=None):
    """He (Kaiming) normal convolutions, for ReLU networks; batch norm at scale 1, shift 0, except the
    last batch norm of each residual branch, at scale 0, so every block starts as the identity (Goyal et
    al. 2017); the dense layer Glorot-uniform with zero bias, as the chapter's."""
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight, generator=generator)
            nn.init.zeros_(module.bias)
    for module in network.modules():
        if isinstance(module, Residual):
            nn.init.zeros_(module.branch[-1][1].weight)
