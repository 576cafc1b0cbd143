"""The chapter's CNN, built twice: from explicit weight tensors and functional ops, and from torch.nn layers.

    conv 5x5x32 (VALID) -> ReLU -> max-pool 2x2 -> conv 5x5x64 (VALID) -> ReLU -> max-pool 2x2
    -> dense 1024 -> ReLU -> dropout 0.5 -> dense 10 (logits; softmax gives probabilities)

Both builds take images (N, C, H, W) and return logits (N, num_classes). Pooling is TensorFlow's SAME
(output ceil(n / 2)), as in the chapter. The low-level build keeps the chapter's weight layout
(conv weights (kh, kw, in, out), dense weights (in, out), features flattened in H, W, C order); the
layer build keeps torch's. `convert_state` moves weights between the two, so the same weights give the
same outputs in either build.
"""

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit import kernels
from cnnkit.dropout import Dropout, dropout
from cnnkit.errors import CheckpointError
from cnnkit.kernels.conv_pool import conv_pool_relu
from cnnkit.recipes import BUILDS, NETWORKS
from cnnkit.resnet import ResNet, ResNetArchitecture, init_weights

__all__ = [  # dropout lives in cnnkit.dropout (the ResNet uses it too); importable from here as before
    "Architecture",
    "Dropout",
    "LayerCNN",
    "LowLevelCNN",
    "ResNet",
    "ResNetArchitecture",
    "StandardizedNetwork",
    "architecture_from_dict",
    "build_model",
    "convert_state",
    "dropout",
    "network_class",
    "summary",
]


@dataclass(frozen=True)
class Architecture:
    """The shapes that define the chapter's network: everything needed to rebuild it from a checkpoint.

    `network` names it among cnnkit's networks (see `architecture_from_dict`); `builds` are its builds.
    """

    network: ClassVar[str] = "chapter"
    builds: ClassVar[tuple[str, ...]] = BUILDS

    input_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W)
    num_classes: int = 10
    conv_channels: tuple[int, int] = (32, 64)
    kernel_size: int = 5
    hidden_units: int = 1024
    dropout_rate: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        object.__setattr__(self, "conv_channels", tuple(int(v) for v in self.conv_channels))
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {self.input_shape}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        _ = self.feature_shape  # raises ValueError if the images are too small for the network

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the second pooling layer's output, the input of the first dense layer."""
        _, h, w = self.input_shape
        for stage in (1, 2):
            h, w = h - self.kernel_size + 1, w - self.kernel_size + 1
            if h < 1 or w < 1:
                need = _min_input_size(self.kernel_size)
                raise ValueError(
                    f"input_shape {self.input_shape} is too small: convolution {stage} "
                    f"({self.kernel_size}x{self.kernel_size}, VALID) needs images of at least {need}x{need}"
                )
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return (self.conv_channels[1], h, w)

    @property
    def flat_features(self) -> int:
        return math.prod(self.feature_shape)

    @property
    def num_parameters(self) -> int:
        """Weights and biases of the network (either build has the same)."""
        return sum(n for _, _, n in self.layers())

    def layers(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(layer, output shape, parameters) from input to logits, as the layer build computes them."""
        c_in, height, width = self.input_shape
        k, (c1, c2) = self.kernel_size, self.conv_channels
        rows = [("input", self.input_shape, 0)]
        for stage, (c_prev, c) in enumerate(((c_in, c1), (c1, c2)), 1):
            height, width = height - k + 1, width - k + 1
            rows.append(
                (f"conv{stage} {k}x{k}, {c} filters, VALID", (c, height, width), (k * k * c_prev + 1) * c)
            )
            height, width = math.ceil(height / 2), math.ceil(width / 2)
            rows.append((f"max-pool{stage} 2x2 SAME + ReLU", (c, height, width), 0))
        rows.append(
            (
                f"dense3 {self.hidden_units} + ReLU",
                (self.hidden_units,),
                (self.flat_features + 1) * self.hidden_units,
            )
        )
        rows.append((f"dropout {self.dropout_rate:g}", (self.hidden_units,), 0))
        rows.append(
            (
                f"dense4 {self.num_classes} (logits)",
                (self.num_classes,),
                (self.hidden_units + 1) * self.num_classes,
            )
        )
        return rows

    def to_dict(self) -> dict:
        return {"network": self.network, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        return cls(**{k: v for k, v in d.items() if k != "network"})


ARCHITECTURES = {"chapter": Architecture, "resnet": ResNetArchitecture}
assert tuple(ARCHITECTURES) == NETWORKS


def architecture_from_dict(d: dict):
    """The architecture a record's dict describes: its "network" key names which (absent: the chapter's,
    as in checkpoints written before there were two)."""
    name = d.get("network", "chapter")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown network {name!r}; cnnkit knows {', '.join(NETWORKS)}")
    return ARCHITECTURES[name].from_dict(d)


def _min_input_size(k: int) -> int:
    # smallest n with ceil((n - k + 1) / 2) - k + 1 >= 1
    return 3 * k - 2


# --- the low-level build: explicit tensors and the chapter's conv_layer / fc_layer ---


def conv_pool_layer(x, weights, biases):
    """The chapter's conv_layer (VALID convolution, bias, ReLU) and the 2x2 max pooling after it (stride 2,
    TensorFlow's SAME padding). weights (kh, kw, in, out), x (N, in, H, W) -> (N, out, ceil(H'/2), ceil(W'/2)).

    ReLU runs after the pooling, fused with it (`cnnkit.kernels.conv_pool`, `cnnkit.kernels.pooling`): ReLU
    and max commute (ReLU is monotone), so values and gradients are those of the chapter's order, and ReLU
    touches 4x fewer values. With one input channel the convolution is fused in too.
    """
    return conv_pool_relu(x, weights.permute(3, 2, 0, 1), biases)


def fc_layer(x, weights, biases, activation=None):
    """The chapter's fc_layer: flatten to (N, in) in H, W, C order, then x @ weights + biases."""
    if x.dim() > 2:
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    out = torch.addmm(biases, x, weights)
    return out if activation is None else activation(out)


class LowLevelCNN(nn.Module):
    """The chapter's first build: named weight tensors in its layout, and functional ops."""

    def __init__(self, arch: Architecture = Architecture()):
        super().__init__()
        self.arch = arch
        c_in = arch.input_shape[0]
        c1, c2 = arch.conv_channels
        k = arch.kernel_size
        self.conv_1_weights = nn.Parameter(torch.empty(k, k, c_in, c1))
        self.conv_1_biases = nn.Parameter(torch.zeros(c1))
        self.conv_2_weights = nn.Parameter(torch.empty(k, k, c1, c2))
        self.conv_2_biases = nn.Parameter(torch.zeros(c2))
        self.fc_3_weights = nn.Parameter(torch.empty(arch.flat_features, arch.hidden_units))
        self.fc_3_biases = nn.Parameter(torch.zeros(arch.hidden_units))
        self.fc_4_weights = nn.Parameter(torch.empty(arch.hidden_units, arch.num_classes))
        self.fc_4_biases = nn.Parameter(torch.zeros(arch.num_classes))

    def forward(self, x):
        h1 = conv_pool_layer(x, self.conv_1_weights, self.conv_1_biases)
        h2 = conv_pool_layer(h1, self.conv_2_weights, self.conv_2_biases)
        h3 = fc_layer(h2, self.fc_3_weights, self.fc_3_biases, activation=F.relu)
        h3 = dropout(h3, self.arch.dropout_rate, self.training)
        return fc_layer(h3, self.fc_4_weights, self.fc_4_biases)


# --- the layer build: torch.nn modules ---


class LayerCNN(nn.Module):
    """The chapter's second build, from layers (its tf.layers version), with torch's weight layout.

    The layers are the chapter's, in its order; `build_model` swaps the fused C++ layers in
    (cnnkit.kernels.fuse), which keeps the parameters and their names. `ACTIVATIONS` names the layers
    whose outputs cnnkit.layer_outputs reports, `FILTERS` the convolutions whose kernels it shows,
    `DESCRIPTIONS` what each reported layer is, and `STAGES` how a page groups them (the ResNet has the same).
    """

    ACTIVATIONS: ClassVar[dict[str, str]] = {  # module -> the name of its output
        "features.0": "conv1",
        "features.1": "relu1",
        "features.2": "pool1",
        "features.3": "conv2",
        "features.4": "relu2",
        "features.5": "pool2",
        "classifier.2": "dense3",
        "classifier.4": "logits",
    }
    FILTERS: ClassVar[dict[str, str]] = {"features.0": "conv1", "features.3": "conv2"}
    DESCRIPTIONS: ClassVar[dict[str, str]] = {
        "input": "the image as the network receives it (standardized)",
        "conv1": "convolution 1: one map per filter, before ReLU",
        "relu1": "ReLU of convolution 1: negative values set to 0",
        "pool1": "max-pooling 1 (2x2, stride 2): the strongest answer in each 2x2 block",
        "conv2": "convolution 2: each filter looks at all of pooling 1's maps",
        "relu2": "ReLU of convolution 2",
        "pool2": "max-pooling 2 (2x2, stride 2)",
        "dense3": "dense layer 3 with ReLU: the features the classifier reads",
        "logits": "dense layer 4: one score per class",
        "probabilities": "softmax of the scores",
    }
    STAGES: ClassVar[tuple[tuple[str, tuple[str, ...]], ...]] = (
        ("Convolution 1", ("conv1", "relu1", "pool1")),
        ("Convolution 2", ("conv2", "relu2", "pool2")),
        ("Dense layer 3", ("dense3",)),
    )

    def __init__(self, arch: Architecture = Architecture()):
        super().__init__()
        self.arch = arch
        c1, c2 = arch.conv_channels
        k = arch.kernel_size
        self.features = nn.Sequential(
            nn.Conv2d(arch.input_shape[0], c1, k),
            nn.ReLU(),
            nn.MaxPool2d(2, 2, ceil_mode=True),  # TensorFlow's SAME pooling: ceil(n / 2)
            nn.Conv2d(c1, c2, k),
            nn.ReLU(),
            nn.MaxPool2d(2, 2, ceil_mode=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(arch.flat_features, arch.hidden_units),
            nn.ReLU(),
            Dropout(arch.dropout_rate),
            nn.Linear(arch.hidden_units, arch.num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class StandardizedNetwork(nn.Module):
    """A network with its input standardization inside: images as a dataset stores them (pixel values,
    (N, C, H, W)) in, logits out. Standardizes as `cnnkit.data.Standardization.apply` does, in float32:
    (x - mean) / std per channel. `network` is the network itself, which takes standardized images."""

    def __init__(self, network: nn.Module, mean, std):
        super().__init__()
        self.network = network
        self.arch = network.arch
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(shape))

    def standardize(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels - self.mean) / self.std

    def forward(self, pixels):
        return self.network(self.standardize(pixels))


def network_class(arch) -> type[nn.Module]:
    """The torch.nn class of the network `arch` describes (LayerCNN or ResNet): its ACTIVATIONS, FILTERS,
    DESCRIPTIONS and STAGES say what cnnkit shows of it."""
    return ResNet if isinstance(arch, ResNetArchitecture) else LayerCNN


def summary(arch, build: str = "layers") -> str:
    """A table of the network's layers, output shapes and parameter counts, with the checkpoint size."""
    rows = arch.layers()
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'layer':<{width}}  {'output shape':<14}  {'parameters':>11}"]
    for name, shape, count in rows:
        shape_text = " x ".join(str(d) for d in shape)
        lines.append(
            f"{name:<{width}}  {shape_text:<14}  {count:>11,}" if count else f"{name:<{width}}  {shape_text}"
        )
    weights_mb = 4 * arch.num_parameters / 2**20
    lines.append(
        f"{arch.num_parameters:,} parameters ({_network_build(arch, build)}): {weights_mb:,.1f} MB of weights per "
        "checkpoint, "
        f"{3 * weights_mb:,.1f} MB with Adam's state for resuming"
    )
    return "\n".join(lines)


def _network_build(arch, build: str) -> str:
    return f"{build} build" if arch.network == "chapter" else f"the {arch.network} network"


def build_model(
    arch: Architecture = Architecture(), build: str = "layers", seed: int | None = None, fused: bool = True
) -> nn.Module:
    """A freshly initialized network of the kind `arch` describes (an Architecture: the chapter's; a
    ResNetArchitecture: the ResNet, see cnnkit.resnet.init_weights).

    The chapter's: Glorot-uniform weights and zero biases, as TensorFlow's defaults; the same `seed`
    gives the same initial weights in both builds. `fused`: the layer build with the fused C++ layers
    swapped in (cnnkit.kernels.fuse); the low-level build calls the fused functions itself.
    """
    if build not in arch.builds:
        raise ValueError(f"build must be one of {arch.builds} for the {arch.network} network, got {build!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if isinstance(arch, ResNetArchitecture):
        network = ResNet(arch)
        init_weights(network, generator)
        return network
    layers = LayerCNN(arch)
    for module in layers.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight, generator=generator)
            nn.init.zeros_(module.bias)
    if build == "layers":
        return kernels.fuse(layers) if fused else layers
    lowlevel = LowLevelCNN(arch)
    lowlevel.load_state_dict(convert_state(layers.state_dict(), arch, "layers", "lowlevel"))
    return lowlevel


# Parameter names in the two builds, in matching order: (layers name, lowlevel name, kind).
_PARAMS = (
    ("features.0.weight", "conv_1_weights", "conv"),
    ("features.0.bias", "conv_1_biases", "bias"),
    ("features.3.weight", "conv_2_weights", "conv"),
    ("features.3.bias", "conv_2_biases", "bias"),
    ("classifier.1.weight", "fc_3_weights", "flat_dense"),
    ("classifier.1.bias", "fc_3_biases", "bias"),
    ("classifier.4.weight", "fc_4_weights", "dense"),
    ("classifier.4.bias", "fc_4_biases", "bias"),
)


def convert_state(state: dict, arch: Architecture, source: str, target: str) -> dict:
    """Re-lay a state dict from one build's weight layout to the other's; same numbers, same outputs.

    source and target are "layers" or "lowlevel". Tensors come back contiguous.
    """
    for name, value in (("source", source), ("target", target)):
        if value not in BUILDS:
            raise ValueError(f"{name} must be one of {BUILDS}, got {value!r}")
    if source == target:
        return {k: v.clone() for k, v in state.items()}
    c, h, w = arch.feature_shape
    out = {}
    for layers_name, lowlevel_name, kind in _PARAMS:
        src_name, dst_name = (
            (layers_name, lowlevel_name) if source == "layers" else (lowlevel_name, layers_name)
        )
        if src_name not in state:
            raise CheckpointError(
                f"weights have no tensor {src_name!r}: not a {source} build of this network"
            )
        t = state[src_name]
        if kind == "conv":  # (out, in, kh, kw) <-> (kh, kw, in, out)
            t = t.permute(2, 3, 1, 0) if source == "layers" else t.permute(3, 2, 0, 1)
        elif kind == "dense":  # (out, in) <-> (in, out)
            t = t.t()
        elif kind == "flat_dense":  # also reorder the inputs: C, H, W (torch) <-> H, W, C (chapter)
            if source == "layers":
                t = t.reshape(-1, c, h, w).permute(2, 3, 1, 0).reshape(c * h * w, -1)
            else:
                t = t.reshape(h, w, c, -1).permute(3, 2, 0, 1).reshape(-1, c * h * w)
        out[dst_name] = t.contiguous()
    return out
