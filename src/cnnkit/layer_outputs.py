"""What every layer of a trained network computes: the one place that opens the network up.

`activations(model, images)` runs images through the network's own layers, PyTorch's modules (for the
chapter's network not the fused ones, which skip the maps before ReLU), and returns each named layer's
output, taken by forward hooks; `filters(model)` returns the convolution kernels that made the feature
maps. Which layers are named, what they are and how a page groups them comes from the network's class
(`ACTIVATIONS`, `FILTERS`, `DESCRIPTIONS`, `STAGES` of cnnkit.model.LayerCNN and cnnkit.resnet.ResNet;
`layers_of` and `stages_of` here). The report's figures and the web page's panels both come from these
functions. (This module was cnnkit.inspect, a name that hid the standard library's; that name still
imports it.)
"""

import weakref

import numpy as np
import torch

from cnnkit.model import (
    LayerCNN,
    LowLevelCNN,
    ResNet,
    StandardizedNetwork,
    build_model,
    convert_state,
    network_class,
)

# The chapter network's layer names, from input to output, as `activations` returns them, and what each
# is (for any network: `layers_of`).
LAYERS = ("input", *LayerCNN.ACTIVATIONS.values(), "probabilities")
DESCRIPTIONS = LayerCNN.DESCRIPTIONS


def layers_of(model_or_arch) -> dict[str, str]:
    """{layer name: what it is}, from input to probabilities, for a network or its architecture."""
    kind = network_class(_architecture(model_or_arch))
    names = ("input", *kind.ACTIVATIONS.values(), "probabilities")
    return {name: kind.DESCRIPTIONS[name] for name in names}


def stages_of(model_or_arch) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(title, layer names) for each stage of maps and features a page shows, in order."""
    return network_class(_architecture(model_or_arch)).STAGES


def _architecture(model_or_arch):
    model = model_or_arch.network if isinstance(model_or_arch, StandardizedNetwork) else model_or_arch
    return getattr(model, "arch", model)


def layer_weights(model) -> dict[str, torch.Tensor]:
    """The network's state in the layer build's layout (conv (out, in, kh, kw), dense (out, in)): float32
    weights (and batch norm's int64 batch counters, as they are)."""
    if isinstance(model, StandardizedNetwork):
        model = model.network
    state = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
        for k, v in model.state_dict().items()
    }
    if isinstance(model, LowLevelCNN):
        state = convert_state(state, model.arch, "lowlevel", "layers")
    elif not isinstance(model, LayerCNN | ResNet):
        raise TypeError(
            f"expected one of cnnkit's networks (LayerCNN, LowLevelCNN or ResNet), got {type(model).__name__}"
        )
    return state


def reference_network(model) -> torch.nn.Module:
    """A float32 copy of `model` (a bare network) made of PyTorch's own modules, unfused, in eval mode: what
    hooks, int8 quantization and export can open up layer by layer.

    The copy is kept while `model` lives and its tensors stay as they are (the same storage, not written
    since): rebuilding it took 16 of the 18 ms of the web page's request for one checkpoint's maps.
    Treat it as read-only."""
    if isinstance(model, StandardizedNetwork):
        model = model.network
    stamp = tuple((t.data_ptr(), t._version) for t in model.state_dict().values())
    kept = _REFERENCES.get(model)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    reference = build_model(model.arch, "layers", fused=False)
    reference.load_state_dict(layer_weights(model))
    reference.eval()
    _REFERENCES[model] = (stamp, reference)
    return reference


_REFERENCES = weakref.WeakKeyDictionary()  # network -> (its tensors' storage and versions, the copy)


def filters(model) -> dict[str, np.ndarray]:
    """The convolution kernels, by the name of the maps they make, as float32 arrays (out, in, k, k); for
    the chapter's network {"conv1": (32, C, 5, 5), "conv2": (64, 32, 5, 5)}.

    Feature map j of "conv1" is the correlation of the input with conv1[j] (summed over channels), plus
    a bias; conv2[j] works on all of pool1's maps in the same way.
    """
    weights = layer_weights(model)
    kind = network_class(_architecture(model))
    return {name: weights[f"{path}.weight"].numpy() for path, name in kind.FILTERS.items()}


def activations(model, images, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every layer's output for standardized images (N, C, H, W): {layer: float32 array}, in LAYERS order;
    for a StandardizedNetwork (`checkpoint.load_model`), images as the dataset stores them ("input" is
    then the standardized image).

    Layers are those of `layers_of(model)`. Maps are (N, channels, H, W), features and scores (N, units).
    The network runs in fp32 and in inference mode (no dropout; batch norm with its running statistics),
    so "logits" equals what `inference.predict_logits` gives in fp32.
    """
    if isinstance(model, StandardizedNetwork):
        with torch.inference_mode():
            pixels = torch.as_tensor(np.asarray(images, dtype=np.float32), device=model.mean.device)
            images = model.standardize(pixels).cpu().numpy()
        model = model.network
    reference = reference_network(model)
    names = tuple(layers_of(model))
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.arch.input_shape):
        raise ValueError(
            f"images must have shape (N, {', '.join(map(str, model.arch.input_shape))}), got {tuple(images.shape)}"
        )
    if not len(images):
        return {name: np.empty((0,)) for name in names}
    parts = {name: [] for name in names}
    modules = dict(reference.named_modules())
    hooks = [
        modules[path].register_forward_hook(
            lambda module, inputs, output, name=name: parts[name].append(output.numpy().copy())
        )
        for path, name in reference.ACTIVATIONS.items()
    ]
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                parts["input"].append(batch.numpy())
                parts["probabilities"].append(torch.softmax(reference(batch), dim=1).numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return {name: np.concatenate(parts[name]) for name in names}
