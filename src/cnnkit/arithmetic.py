"""How one number inside a trained network was made: the arithmetic behind any value of any layer.

`explain(network, pixels, standardization, layer, channel, y, x)` runs one image through the network's
own PyTorch modules (`layer_outputs.reference_network`: unfused, as `layer_outputs.activations` runs
them), records what every module received and returned, and walks back from the value asked for:

    a convolution  the input window under the filter, the filter's weights, their products, the sum
                   and the bias (a CNN layer cross-correlates: the filter is not flipped)
    ReLU           max(0, v) of the value before it, which is then explained
    max-pooling    the pooling window and where its largest value lies, which is then explained
    batch norm     (v - running mean) / sqrt(running var + eps) * scale + shift, then v is explained
    a dense unit   its largest contributions (input x weight), the rest summed, the bias
    softmax, global average pooling, a residual sum, the input's standardization

Layers are named as the network's `ACTIVATIONS` name them ("conv1", "pool2", ...; "input" and
"probabilities" too); a module no layer names (the ResNet's convolution before its batch norm) is
still explained, by its module path. Every number is computed here in float64 from the float32 tensors
the network holds, the convolution's value by `cnnkit.ops.conv2d_multi`; each step also gives the
value the network itself computed (float32), so a reader can see the two agree.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cnnkit import ops

DENSE_TOP = 12  # a dense unit's largest contributions listed one by one; the rest are summed
MAX_CHANNELS = 64  # a convolution's input channels shown weight by weight (the largest sums first)
MAX_AVERAGED = 1024  # global average pooling: the values averaged are listed up to this many

_PASS_THROUGH = (nn.Identity, nn.Flatten, nn.Dropout)  # modules that hand their input on (in eval mode)


class ExplainError(ValueError):
    """A request the network cannot answer: no such layer, or a position outside it."""


def layer_names(network: nn.Module) -> dict[str, str]:
    """{layer name: module path} of the layers `network` names (its class's ACTIVATIONS)."""
    return {name: path for path, name in getattr(type(network), "ACTIVATIONS", {}).items()}


@dataclass
class Call:
    """One module's call during the traced forward pass: what it received and returned (one image), and
    which call produced what it received ("input": the network's input; None: computed outside a module)."""

    path: str
    module: nn.Module
    input: np.ndarray
    output: np.ndarray
    source: str | None


class Trace:
    """Every module's input and output for one standardized image (1, C, H, W), by module path."""

    def __init__(self, network: nn.Module, image: torch.Tensor):
        self.network = network
        self.image = image[0].numpy().astype(np.float64)
        self.calls: dict[str, Call] = {}
        producers, kept, pending = {id(image): "input"}, [image], {}
        hooks = []
        for path, module in network.named_modules():
            if not path:
                continue
            container = isinstance(module, nn.Sequential | nn.ModuleList | nn.ModuleDict)

            def before(module, inputs, path=path):
                x = inputs[0]
                pending[path] = (producers.get(id(x)), x[0].detach().clone().numpy())

            def after(module, inputs, output, path=path, container=container):
                source, received = pending.pop(path)
                self.calls[path] = Call(path, module, received, output[0].detach().clone().numpy(), source)
                kept.extend((inputs[0], output))  # alive until the end, so no id is reused
                if not container:  # a Sequential returns its last module's tensor: that module made it
                    producers[id(output)] = path

            hooks.append(module.register_forward_pre_hook(before))
            hooks.append(module.register_forward_hook(after))
        try:
            with torch.inference_mode():
                self.logits = network(image)[0].numpy().astype(np.float64)
        finally:
            for hook in hooks:
                hook.remove()

    def producer(self, call: Call, named=()) -> tuple[str, "Call | None"]:
        """Where `call`'s input came from, looking through unnamed modules that hand it on unchanged
        (Identity, Flatten, Dropout; a path in `named` is a layer of its own): ("input", None), (path,
        that call) or (None, None)."""
        source = call.source
        while source not in (None, "input"):
            before = self.calls[source]
            if source in named or not _passes_on(before.module):
                return source, before
            source = before.source
        return source, None


def explain(
    network: nn.Module, pixels, standardization, layer: str, channel: int, y: int = 0, x: int = 0
) -> dict:
    """How value (`channel`, `y`, `x`) of `layer` (or unit `channel` of a vector layer) was computed for
    one image.

    network: from `layer_outputs.reference_network`. pixels: the image as the network takes it before standardization,
    (C, H, W) or (1, C, H, W). standardization: the model's (`data.Standardization`). Returns
    {"layer", "channel", "y", "x", "value", "steps": [...]} where each step is a dict with a "kind"
    (conv, relu, maxpool, batchnorm, dense, softmax, average, add, standardize, other), the "layer" (or
    module path) it computed, its "source" layer and the numbers, from the value asked for back to the
    nearest convolution, dense layer or the input. Raises ExplainError for an unknown layer or position.
    """
    pixels = np.asarray(pixels, dtype=np.float32).reshape(1, *np.shape(pixels)[-3:])
    standardized = torch.as_tensor(standardization.apply(pixels), dtype=torch.float32)
    trace = Trace(network, standardized)
    names = layer_names(network)
    paths = {path: name for name, path in names.items()}
    if layer == "input":
        shape = trace.image.shape
    elif layer == "probabilities":
        shape = trace.logits.shape
    elif layer in names and names[layer] in trace.calls:
        shape = trace.calls[names[layer]].output.shape
    else:
        known = ", ".join(["input", *names, "probabilities"])
        raise ExplainError(f"no layer {layer!r} in this network; its layers: {known}")
    at = _position(layer, shape, channel, y, x)
    walker = _Walker(trace, paths, pixels[0].astype(np.float64), standardization)
    if layer == "input":
        steps = [walker.standardize(at)]
        value = steps[0]["value"]
    elif layer == "probabilities":
        steps = [_softmax(trace.logits, channel)]
        value = steps[0]["value"]
    else:
        call = trace.calls[names[layer]]
        value = float(call.output[at])
        steps = walker.walk(call, at)
    return {
        "layer": layer,
        "channel": channel,
        "y": at[1] if len(at) == 3 else None,
        "x": at[2] if len(at) == 3 else None,
        "shape": list(shape),
        "value": value,
        "steps": steps,
    }


def _position(layer: str, shape, channel: int, y: int, x: int) -> tuple:
    if len(shape) == 3:
        c, h, w = shape
        if not (0 <= channel < c and 0 <= y < h and 0 <= x < w):
            raise ExplainError(
                f"{layer} has {c} maps of {h}x{w}: channel must be 0..{c - 1}, y 0..{h - 1} and x 0..{w - 1}; "
                f"got channel {channel}, y {y}, x {x}"
            )
        return (channel, y, x)
    if not 0 <= channel < shape[0] or y or x:
        raise ExplainError(
            f"{layer} is a vector of {shape[0]} values: channel must be 0..{shape[0] - 1} and y, x 0; "
            f"got channel {channel}, y {y}, x {x}"
        )
    return (channel,)


class _Walker:
    """Walks back from one value through the trace, one step per module."""

    def __init__(self, trace: Trace, paths: dict, pixels: np.ndarray, standardization):
        self.trace, self.paths, self.pixels, self.standardization = trace, paths, pixels, standardization

    def name(self, source: str | None) -> str | None:
        """A layer's name, or the module path of a module no layer names."""
        return self.paths.get(source, source)

    def walk(self, call: Call, at: tuple) -> list[dict]:
        steps = []
        while call is not None:
            module = call.module
            if _passes_on(module):  # a layer named at a Flatten's output, say: explain what it was given
                at = np.unravel_index(np.ravel_multi_index(at, call.output.shape), call.input.shape)
                at = tuple(int(v) for v in at)
                if call.source == "input":
                    steps.append(self.standardize(at))
                    break
                call = self.trace.calls.get(call.source)
                continue
            source, before = self.trace.producer(call, self.paths)
            head = {
                "layer": self.name(call.path),
                "module": type(module).__name__,
                "source": self.name(source),
            }
            if isinstance(module, nn.Conv2d):
                steps.append(head | self.conv(call, module, at, source))
                break
            if isinstance(module, nn.Linear):
                steps.append(head | self.dense(call, module, at[0], before))
                break
            if isinstance(module, nn.ReLU):
                steps.append(
                    head
                    | {
                        "kind": "relu",
                        "at": list(at),
                        "input": float(call.input[at]),
                        "value": float(call.output[at]),
                    }
                )
            elif isinstance(module, nn.MaxPool2d) and len(at) == 3:
                step, at = self.maxpool(call, module, at)
                steps.append(head | step)
            elif isinstance(module, nn.BatchNorm2d) and len(at) == 3:
                steps.append(head | self.batchnorm(call, module, at))
            elif isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
                steps.append(head | self.average(call, at))
                break
            elif hasattr(module, "branch") and call.output.shape == call.input.shape:
                steps.append(head | self.residual(call, at))
                break
            else:
                steps.append(head | {"kind": "other", "at": list(at), "value": float(call.output[at])})
                break
            if source == "input":
                steps.append(self.standardize(at))
                break
            if before is None or before.output.shape != call.input.shape:
                break
            call = before
        return steps

    def conv(self, call: Call, module: nn.Conv2d, at: tuple, source) -> dict:
        c, y, x = at
        if module.groups != 1 or isinstance(module.padding, str):
            return {"kind": "other", "at": list(at), "value": float(call.output[at])}
        weights = module.weight[c].detach().double().numpy()  # (C_in, kh, kw)
        bias = float(module.bias[c].detach()) if module.bias is not None else 0.0
        (sh, sw), (ph, pw), (dh, dw) = module.stride, module.padding, module.dilation
        _, kh, kw = weights.shape
        rows = y * sh - ph + dh * np.arange(kh)
        cols = x * sw - pw + dw * np.arange(kw)
        image = call.input.astype(np.float64)
        window = _take(image, rows, cols)  # (C_in, kh, kw), zeros where the window overhangs the padding
        products = window * weights
        sums = products.sum(axis=(1, 2))
        value = float(ops.conv2d_multi(window, weights[None], np.array([bias]))[0, 0, 0])
        order = np.argsort(-np.abs(sums), kind="stable")[:MAX_CHANNELS]
        step = {
            "kind": "conv",
            "at": list(at),
            "filter": c,
            "kernel": [kh, kw],
            "stride": [sh, sw],
            "padding": [ph, pw],
            "dilation": [dh, dw],
            "rows": rows.tolist(),
            "cols": cols.tolist(),
            "in_channels": int(window.shape[0]),
            "channel_sums": sums.tolist(),
            "channels": [
                {
                    "channel": int(k),
                    "sum": float(sums[k]),
                    "window": window[k].tolist(),
                    "weights": weights[k].tolist(),
                    "products": products[k].tolist(),
                }
                for k in order
            ],
            "sum": float(products.sum()),
            "bias": bias,
            "has_bias": module.bias is not None,
            "value": value,
            "network_value": float(call.output[at]),
        }
        if source == "input":
            step["pixels"] = _take(self.pixels, rows, cols).tolist()
            step["mean"] = list(self.standardization.mean)
            step["std"] = list(self.standardization.std)
        return step

    def maxpool(self, call: Call, module: nn.MaxPool2d, at: tuple) -> tuple[dict, tuple]:
        c, y, x = at
        kh, kw = _pair(module.kernel_size)
        (sh, sw), (ph, pw), (dh, dw) = (
            _pair(module.stride or module.kernel_size),
            _pair(module.padding),
            _pair(module.dilation),
        )
        h, w = call.input.shape[1:]
        rows = [r for r in y * sh - ph + dh * np.arange(kh) if 0 <= r < h]  # ceil_mode's windows overhang
        cols = [q for q in x * sw - pw + dw * np.arange(kw) if 0 <= q < w]
        window = call.input[c][np.ix_(rows, cols)].astype(np.float64)
        i, j = np.unravel_index(int(np.argmax(window)), window.shape)
        winner = (c, int(rows[i]), int(cols[j]))
        step = {
            "kind": "maxpool",
            "at": list(at),
            "size": [kh, kw],
            "stride": [sh, sw],
            "rows": [int(r) for r in rows],
            "cols": [int(q) for q in cols],
            "window": window.tolist(),
            "winner": list(winner),
            "value": float(call.output[at]),
        }
        return step, winner

    def batchnorm(self, call: Call, module: nn.BatchNorm2d, at: tuple) -> dict:
        c = at[0]
        mean, var = float(module.running_mean[c]), float(module.running_var[c])
        scale = float(module.weight[c].detach()) if module.weight is not None else 1.0
        shift = float(module.bias[c].detach()) if module.bias is not None else 0.0
        v = float(call.input[at])
        return {
            "kind": "batchnorm",
            "at": list(at),
            "input": v,
            "mean": mean,
            "var": var,
            "eps": module.eps,
            "scale": scale,
            "shift": shift,
            "computed": (v - mean) / np.sqrt(var + module.eps) * scale + shift,
            "value": float(call.output[at]),
        }

    def dense(self, call: Call, module: nn.Linear, unit: int, before: Call | None) -> dict:
        inputs = call.input.astype(np.float64).reshape(-1)
        weights = module.weight[unit].detach().double().numpy()
        bias = float(module.bias[unit].detach()) if module.bias is not None else 0.0
        products = inputs * weights
        top = np.argsort(-np.abs(products), kind="stable")[:DENSE_TOP]
        maps = before.output.shape if before is not None and before.output.ndim == 3 else None
        rest = np.ones(len(products), bool)
        rest[top] = False
        return {
            "kind": "dense",
            "at": [unit],
            "unit": unit,
            "inputs": len(inputs),
            "source_shape": list(maps) if maps else [len(inputs)],
            "top": [
                {
                    "index": int(i),
                    "from": [int(v) for v in np.unravel_index(int(i), maps)] if maps else [int(i)],
                    "input": float(inputs[i]),
                    "weight": float(weights[i]),
                    "product": float(products[i]),
                }
                for i in top
            ],
            "rest_count": int(rest.sum()),
            "rest_sum": float(products[rest].sum()),
            "positive_sum": float(products[products > 0].sum()),
            "negative_sum": float(products[products < 0].sum()),
            "zero_inputs": int((inputs == 0).sum()),
            "sum": float(products.sum()),
            "bias": bias,
            "computed": float(products.sum()) + bias,
            "value": float(call.output[unit]),
        }

    def average(self, call: Call, at: tuple) -> dict:
        values = call.input[at[0]].astype(np.float64)
        return {
            "kind": "average",
            "at": list(at),
            "count": int(values.size),
            "window": values.tolist() if values.size <= MAX_AVERAGED else None,
            "sum": float(values.sum()),
            "computed": float(values.mean()),
            "value": float(call.output.reshape(-1)[at[0]]),
        }

    def residual(self, call: Call, at: tuple) -> dict:
        branch = self.trace.calls.get(f"{call.path}.branch")
        f = float(branch.output[at]) if branch is not None else float(call.output[at]) - float(call.input[at])
        return {
            "kind": "add",
            "at": list(at),
            "terms": [
                {"from": self.name(call.source), "value": float(call.input[at])},
                {"from": f"{self.name(call.path)}'s branch f(x)", "value": f},
            ],
            "computed": float(call.input[at]) + f,
            "value": float(call.output[at]),
        }

    def standardize(self, at: tuple) -> dict:
        c = at[0]
        pixel = float(self.pixels[at])
        mean, std = float(self.standardization.mean[c]), float(self.standardization.std[c])
        return {
            "kind": "standardize",
            "layer": "input",
            "source": None,
            "at": list(at),
            "pixel": pixel,
            "mean": mean,
            "std": std,
            "computed": (pixel - mean) / std,
            "value": float(self.trace.image[at]),
        }


def _softmax(logits: np.ndarray, unit: int) -> dict:
    shifted = logits - logits.max()
    exps = np.exp(shifted)
    return {
        "kind": "softmax",
        "layer": "probabilities",
        "source": "logits",
        "at": [unit],
        "logits": logits.tolist(),
        "max": float(logits.max()),
        "exps": exps.tolist(),
        "total": float(exps.sum()),
        "value": float(exps[unit] / exps.sum()),
    }


def _take(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """image[:, rows][:, :, cols], with 0 where a row or column lies outside the image (zero padding)."""
    channels, h, w = image.shape
    inside_r, inside_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    out = np.zeros((channels, len(rows), len(cols)))
    inside = image[:, rows[inside_r]][:, :, cols[inside_c]]
    out[:, inside_r[:, None] & inside_c[None, :]] = inside.reshape(channels, -1)
    return out


def _passes_on(module: nn.Module) -> bool:
    """Whether `module` hands its input on unchanged in eval mode (cnnkit's own Dropout included)."""
    return isinstance(module, _PASS_THROUGH) or type(module).__name__ == "Dropout"


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
