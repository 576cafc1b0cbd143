"""What every layer of a trained network computes: the one place that opens the network up.

`activations(model, images)` runs images through the network's own layers, PyTorch's modules in the
chapter's order (not the fused ones, which skip the maps before ReLU), and returns each named layer's
output, taken by forward hooks; `filters(model)` returns the convolution kernels that made the feature
maps. The report's figures and the web page's panels both come from these two functions. (This module
was cnnkit.inspect, a name that hid the standard library's; that name still imports it.)
"""

import numpy as np
import torch

from cnnkit.model import LayerCNN, LowLevelCNN, StandardizedNetwork, convert_state

# Layer names, from input to output, as `activations` returns them.
LAYERS = ("input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "dense3", "logits", "probabilities")

# What each layer is, for titles and captions (the shapes come from the arrays).
DESCRIPTIONS = {
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


def layer_weights(model) -> dict[str, torch.Tensor]:
    """The network's weights in the layer build's layout (conv (out, in, kh, kw), dense (out, in)), float32."""
    if isinstance(model, StandardizedNetwork):
        model = model.network
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if isinstance(model, LowLevelCNN):
        state = convert_state(state, model.arch, "lowlevel", "layers")
    elif not isinstance(model, LayerCNN):
        raise TypeError(
            f"expected one of cnnkit's networks (LayerCNN or LowLevelCNN), got {type(model).__name__}"
        )
    return state


def filters(model) -> dict[str, np.ndarray]:
    """The convolution kernels: {"conv1": (32, C, k, k), "conv2": (64, 32, k, k)} as float32 arrays.

    Feature map j of "conv1" is the correlation of the input with conv1[j] (summed over channels), plus
    a bias; conv2[j] works on all of pool1's maps in the same way.
    """
    weights = layer_weights(model)
    return {"conv1": weights["features.0.weight"].numpy(), "conv2": weights["features.3.weight"].numpy()}


def activations(model, images, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every layer's output for standardized images (N, C, H, W): {layer: float32 array}, in LAYERS order;
    for a StandardizedNetwork (`checkpoint.load_model`), images as the dataset stores them ("input" is
    then the standardized image).

    Maps are (N, channels, H, W) up to "pool2", then (N, units). The network runs in fp32 and in
    inference mode (no dropout), so "logits" equals what `inference.predict_logits` gives in fp32.
    """
    if isinstance(model, StandardizedNetwork):
        with torch.inference_mode():
            pixels = torch.as_tensor(np.asarray(images, dtype=np.float32), device=model.mean.device)
            images = model.standardize(pixels).cpu().numpy()
        model = model.network
    reference = LayerCNN(model.arch)  # PyTorch's modules, unfused, with the model's weights
    reference.load_state_dict(layer_weights(model))
    reference.eval()
    images = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.arch.input_shape):
        raise ValueError(
            f"images must have shape (N, {', '.join(map(str, model.arch.input_shape))}), got {tuple(images.shape)}"
        )
    if not len(images):
        return {name: np.empty((0,)) for name in LAYERS}
    parts = {name: [] for name in LAYERS}
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
    return {name: np.concatenate(parts[name]) for name in LAYERS}
