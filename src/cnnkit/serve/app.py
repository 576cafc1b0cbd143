"""`cnnkit serve`: a local web page that shows a trained network answer layer by layer, and a JSON API.

The routes call the library as the command line does: models come from `checkpoint.load_network` and
their one `ModelRecord`; an image is prepared by `images.prepare_for_model` with the record's
preprocessing and standardized with its statistics, as `cnnkit predict` does (decoded within a memory
bound first, see `prepare`); predictions
come from `inference.predict_proba`, every layer's output from `layer_outputs.activations` and the
arithmetic behind any one value from `cnnkit.arithmetic`. The page (static files in `static/`, no
build step) only draws what the API returns: it computes nothing about the network.

    GET  /                              the page (docs/serve-page.md; ?model=ID&test=INDEX&epoch=N)
    GET  /api/models                    the models served: dataset, epoch, classes, accuracy, stages
    POST /api/predict?model=ID          multipart field `file`: label, class name, probabilities
    POST /api/activations?model=ID      the same, plus the prepared input and every layer's output
         &checkpoint=N                  ... computed by the run's checkpoint of epoch N
    POST /api/layers                    JSON {image | pixels | dataset, model?, checkpoint?}: the same
    POST /api/explain                   JSON {..., layer, channel, y, x}: how that one value was made
    GET  /api/models/{id}/checkpoints   the epochs whose checkpoints the run keeps
    GET  /api/models/{id}/filters       the convolution kernels (float32, base64); ?checkpoint=N
    GET  /api/models/{id}/history       the run's learning curves, re-read on every request
    GET  /docs, /openapi.json           the API's documentation

A run's other checkpoints and a model's dataset split are loaded at first use and kept within a bound
(`serve.loaded`).

Limits, so that no request and no burst of them can take unbounded memory, time or sockets:
- request bodies over MAX_BODY_BYTES get 413 (checked from Content-Length and while the body streams
  in), and at most MAX_BODIES_BYTES of bodies are held at once (the next request gets 503);
- an image cnnkit cannot read (not an image, truncated, over images.MAX_IMAGE_PIXELS, blank) gets 422,
  and so does one that would be decoded whole over MAX_UPLOAD_PIXELS (a JPEG is decoded reduced);
  uploads are decoded at most `max_images` at a time, reduced to UPLOAD_DETAIL_PIXELS;
- inference runs in a pool of `workers` threads; at most `max_waiting` requests wait or run at once,
  and the next gets 503, so a burst queues in bounded memory;
- a history is read 1 MB at a time, at most MAX_HISTORY_BYTES, and answered as at most
  MAX_HISTORY_POINTS entries;
- with `allowed_hosts`, a request whose Host header is none of them gets 400 (DNS rebinding);
- a model whose record cannot be described is listed with its error, and only its requests fail.
Every error is JSON `{"error": "..."}`, never a traceback, and no answer holds a bare NaN. The
connections themselves (deadlines, how many are open) are limited in `connections`.
"""

import asyncio
import base64
import binascii
import errno
import io
import ipaddress
import json
import math
import os
import re
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from cnnkit import __version__
from cnnkit.arithmetic import ExplainError, explain
from cnnkit.checkpoint import Checkpoint, load_network
from cnnkit.errors import ArgumentError, CnnkitError, FileError, one_line
from cnnkit.images import ImageBytes, image_shape, prepare_for_model, read_image
from cnnkit.inference import predict_proba
from cnnkit.kernels.cpu import give_back_large_blocks
from cnnkit.layer_outputs import activations, filters, layers_of, stages_of
from cnnkit.metrics import strict_json
from cnnkit.runs import HISTORY_FILE
from cnnkit.serve.connections import BACKLOG, REQUEST_TIMEOUT, connection_limit, guarded_protocol
from cnnkit.serve.loaded import (
    Loaded,
    LoadedCheckpoints,
    LoadedSplits,
    checkpoint_of,
    kept_epochs,
    same_network,
)

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 5 * 2**20
MAX_BODIES_BYTES = 32 * 2**20  # request bodies held at once, all requests together
MAX_WAITING = 64
MAX_IMAGES = 2  # uploads decoded at once: each may hold MAX_UPLOAD_PIXELS as RGBA, twice
# An upload whose format is decoded whole (all but JPEG, which Pillow decodes at 1/2 to 1/8 scale) is
# refused above this many pixels: 16 megapixels is 64 MB as RGBA, a 4,000 x 4,000 picture.
MAX_UPLOAD_PIXELS = 16_000_000
# "digit" and "object" crop a photo to what it shows; a larger upload is reduced to about this many
# pixels first (1,000 x 1,000), which bounds the float64 steps of the preparation to about 64 MB.
UPLOAD_DETAIL_PIXELS = 1_000_000
MAX_HISTORY_BYTES = 32 * 2**20
MAX_HISTORY_LINE = 64 * 2**10  # a longer line is not one epoch's entry: skipped
MAX_HISTORY_POINTS = 1000  # a longer history is answered evenly thinned, with its first and last entry
MAX_PIXEL_VALUE = 1e6  # `pixels` sent back to /api/layers and /api/explain: any finite value up to this
HISTORY_FIELDS = (
    "epoch",
    "train_loss",
    "valid_loss",
    "valid_accuracy",
    "learning_rate",
    "images_per_s",
    "epoch_seconds",
)


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and a message for `{"error": ...}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- the models served ---


@dataclass
class ServedModel:
    """One trained network, loaded once: its id in the API, the network, its checkpoint and record."""

    id: str
    model: object
    checkpoint: Checkpoint
    source: str  # the RUN_OR_CHECKPOINT it was given as

    @property
    def record(self):
        return self.checkpoint.record

    @property
    def history_path(self) -> Path | None:
        """RUN/history.jsonl when the checkpoint lies in a run folder (RUN/checkpoints/epoch-NNN...)."""
        path = self.checkpoint.path
        return path.parent.parent / HISTORY_FILE if path.parent.name == "checkpoints" else None

    def describe(self) -> dict:
        """What the model picker shows: dataset, epoch, classes and validation accuracy."""
        record = self.record
        entry = next((h for h in record.history if h.get("epoch") == record.epoch), {})
        accuracy = entry.get("valid_accuracy")
        return {
            "id": self.id,
            "source": self.source,
            "checkpoint": str(self.checkpoint.path),
            "dataset": record.dataset,
            "epoch": record.epoch,
            "epochs": record.config.epochs,
            "best_epoch": _whole(record.best_epoch),
            "accuracy": _number(accuracy),
            "class_names": list(record.class_names),
            "input_shape": list(record.architecture.input_shape),
            "preprocessing": record.preprocessing,
            "layers": [
                {"name": name, "shape": list(shape), "parameters": count}
                for name, shape, count in record.architecture.layers()
            ],
            "stages": self.stages(),
        }

    def stages(self) -> list[dict]:
        """How the page groups the layers `activations` names: [{"title", "layers": [name, ...]}]
        (`layer_outputs.stages_of`); the layers no stage names are the page's "Output"."""
        return [{"title": title, "layers": list(names)} for title, names in stages_of(self.model)]

    def epochs(self) -> list[int]:
        """The epochs whose checkpoints the run keeps now, oldest first (this checkpoint's alone outside
        a run folder)."""
        return sorted(kept_epochs(self.checkpoint.path)) or [self.record.epoch]

    def description(self) -> dict:
        """`describe()`, or where the record cannot be described (a field of the wrong kind), the model's
        id, source and checkpoint with `error`: one line saying why, so that the other models are served."""
        try:
            return self.describe()
        except Exception as exc:  # whatever the record holds: this model only is refused
            return {
                "id": self.id,
                "source": self.source,
                "checkpoint": str(self.checkpoint.path),
                "error": f"model {self.id!r} ({self.checkpoint.path}) cannot be served: its record "
                f"cannot be read ({type(exc).__name__}: {one_line(exc)}); the other models are served",
            }


def load_models(sources, which: str | None = None) -> list[ServedModel]:
    """Load each run folder or checkpoint file in `sources` (checkpoint `which`, see resolve_checkpoint).

    Ids are the run folder's name (or the checkpoint file's, outside a run), made unique with -2, -3...
    Raises CnnkitError naming the source that cannot be loaded.
    """
    served, taken = [], set()
    for source in sources:
        model, ckpt = load_network(source, which)
        path = ckpt.path
        name = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
        model_id, n = base, 1
        while model_id in taken:
            n += 1
            model_id = f"{base}-{n}"
        taken.add(model_id)
        served.append(ServedModel(model_id, model, ckpt, str(source)))
    return served


# --- what the routes compute (in the worker pool) ---


def prepare(served: ServedModel, data: bytes, name: str) -> np.ndarray:
    """The uploaded image as the network's input before standardization: float32 (1, C, H, W), 0..255.

    `cnnkit predict`'s preparation (`images.prepare_for_model` with the record's preprocessing), on the
    image decoded within a bounded memory: reduced to the input's size for "resize" (as `predict` does),
    and to at most UPLOAD_DETAIL_PIXELS for "digit" and "object" (`predict` keeps up to 8 megapixels,
    so the two agree on any image up to 1 megapixel). A JPEG is decoded reduced (1/2 to 1/8 scale);
    another format, decoded whole, is refused above MAX_UPLOAD_PIXELS. Raises FileError (422) naming
    the upload.
    """
    record = served.record
    upload = ImageBytes(data, name)
    style, (_, height, width) = record.preprocessing, record.architecture.input_shape
    rows, cols, _ = image_shape(upload)  # from the header: not an image, over MAX_IMAGE_PIXELS...
    if rows * cols > MAX_UPLOAD_PIXELS and _image_format(data) != "JPEG":
        raise FileError(
            f"{name}: {cols}x{rows} = {rows * cols / 1e6:.0f} megapixels is over the "
            f"{MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels that cnnkit serve decodes from an upload that is "
            "not a JPEG; send a smaller image or a JPEG"
        )
    if style in ("digit", "object"):
        factor = math.ceil(math.sqrt(rows * cols / UPLOAD_DETAIL_PIXELS))
        height, width = max(1, rows // factor), max(1, cols // factor)
    image = read_image(upload, min_size=(height, width))
    if style in ("digit", "object"):  # a JPEG's draft scale can leave up to 4 times as many pixels
        image = _reduced(image, UPLOAD_DETAIL_PIXELS)
    try:
        return prepare_for_model(image, record.architecture.input_shape, style)[None]
    except ValueError as exc:  # nothing shown: blank
        raise FileError(f"{name}: {exc}") from None


def _reduced(image: np.ndarray, most: int) -> np.ndarray:
    """uint8 (H, W, C) reduced by the least whole factor that leaves at most `most` pixels (block means)."""
    factor = math.ceil(math.sqrt(image.shape[0] * image.shape[1] / most))
    if factor < 2:
        return image
    reduced = np.asarray(Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).reduce(factor))
    return reduced.reshape(*reduced.shape[:2], image.shape[2])


def _image_format(data: bytes) -> str | None:
    """The format Pillow reads `data` as ("JPEG", "PNG", ...), from its header alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            return img.format


def network_at(served: ServedModel, checkpoints: LoadedCheckpoints, epoch: int | None) -> Loaded:
    """The network of the served run's checkpoint of `epoch` (None: the one served), loaded or held.
    Raises CnnkitError (422) for an epoch the run does not keep or a checkpoint that cannot be read."""
    path = checkpoint_of(served.checkpoint.path, served.record, epoch)
    loaded = checkpoints.get(path)
    if path != served.checkpoint.path:
        same_network(served.record, loaded.record, path)
    return loaded


def predict_image(served: ServedModel, data: bytes, name: str) -> dict:
    """Label, class name, confidence and probabilities of one image, as `cnnkit predict --json --proba`."""
    record = served.record
    proba = predict_proba(served.model, record.standardization.apply(prepare(served, data, name)))[0]
    return _prediction(served, proba)


def image_activations(served: ServedModel, data: bytes, name: str, loaded: Loaded | None = None) -> dict:
    """`predict_image`'s answer plus the prepared input and every layer's output (see `layer_answer`),
    computed by checkpoint `loaded` (default: the one served)."""
    started = time.perf_counter()
    return layer_answer(served, loaded, prepare(served, data, name), started)


def layer_answer(served: ServedModel, loaded: Loaded | None, raw: np.ndarray, started: float) -> dict:
    """The prediction for `raw` (float32 (1, C, H, W), the image as the network takes it before
    standardization) by checkpoint `loaded` (None: the one served), with `epoch`, `input` (uint8 C x H x W,
    for showing), `pixels` (`raw` itself as little-endian float32, to send back to /api/explain) and
    `layers`: every layer `activations` names, in its order. Maps (C x H x W) come as uint8 with each
    map's own min and max (value = min + byte / 255 * (max - min)), vectors as numbers."""
    network, record = (served.model, served.record) if loaded is None else (loaded.network, loaded.record)
    layers = activations(network, record.standardization.apply(raw))
    answer = _prediction(served, layers["probabilities"][0])
    answer["epoch"] = record.epoch
    answer["input"] = {
        "shape": list(raw.shape[1:]),
        "data": _b64(np.clip(np.round(raw[0]), 0, 255).astype(np.uint8)),
    }
    answer["pixels"] = {"shape": list(raw.shape[1:]), "data": _b64(raw[0].astype("<f4"))}
    descriptions = layers_of(network)
    answer["layers"] = [
        _encode_layer(name, values[0], descriptions.get(name, "")) for name, values in layers.items()
    ]
    answer["server_ms"] = round(1000 * (time.perf_counter() - started), 2)
    return answer


# --- the JSON requests: an image by value, by its prepared pixels, or by its place in the dataset ---


class Pixels(BaseModel):
    """The image as the network takes it before standardization: `shape` [C, H, W] (the model's input)
    and `data`, its C*H*W values as little-endian float32 in base64 (what /api/layers answers as `pixels`)."""

    model_config = ConfigDict(extra="forbid")
    shape: list[Annotated[int, Field(strict=True, ge=1, le=4096)]] = Field(min_length=3, max_length=3)
    data: str = Field(max_length=8 * 2**20)


class DatasetImage(BaseModel):
    """Image `index` (from 0) of a split of the dataset the model was trained on, as `cnnkit evaluate` and
    `cnnkit report` number them."""

    model_config = ConfigDict(extra="forbid")
    split: Literal["test", "valid", "train"] = "test"
    index: Annotated[int, Field(strict=True, ge=0)]


class ImageRequest(BaseModel):
    """One image, given exactly one way, for one model (default: the first) at one checkpoint (an epoch
    the run keeps; default: the one served)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=200, description="a model id from /api/models")
    checkpoint: Annotated[int, Field(strict=True, ge=0)] | None = Field(
        None, description="an epoch from /api/models/{id}/checkpoints (default: the checkpoint served)"
    )
    image: str | None = Field(
        None,
        max_length=8 * 2**20,
        description="an image file (PNG, JPEG...) in base64, prepared as /api/predict does",
    )
    pixels: Pixels | None = Field(
        None, description="the image as the network takes it: an earlier answer's `pixels` ({shape, data})"
    )
    dataset: DatasetImage | None = Field(
        None,
        description='an image of the model\'s dataset: {"split": "test", "index": N}, as cnnkit report numbers them',
    )


class ExplainRequest(ImageRequest):
    """An image (as for /api/layers) and one value of one layer: map `channel` at row `y`, column `x`
    (from 0), or unit `channel` of a vector layer (y and x then 0)."""

    layer: str = Field(max_length=100, description="a layer's name, as /api/layers names them")
    channel: Annotated[int, Field(strict=True, ge=0)]
    y: Annotated[int, Field(strict=True, ge=0)] = 0
    x: Annotated[int, Field(strict=True, ge=0)] = 0


def request_pixels(
    served: ServedModel, splits: LoadedSplits, query: ImageRequest
) -> tuple[np.ndarray, dict | None]:
    """The image `query` gives, as float32 (1, C, H, W) before standardization, and for a dataset image
    what it is ({"split", "index", "count", "label", "class_name", "dataset"}). Raises RequestError (400,
    422) or CnnkitError (422) saying what is wrong with it."""
    given = [name for name in ("image", "pixels", "dataset") if getattr(query, name) is not None]
    if len(given) != 1:
        raise RequestError(
            400,
            "give the image exactly one way: `image` (an image file in base64), `pixels` (as /api/layers "
            f'answers them) or `dataset` ({{"split": "test", "index": N}}); got {", ".join(given) or "none"}',
        )
    record = served.record
    if query.image is not None:
        try:
            data = base64.b64decode(query.image, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image: not base64; send the image file's bytes in base64") from None
        if not data:
            raise RequestError(400, "image: empty; send an image file (PNG, JPEG, ...) in base64")
        return prepare(served, data, "image"), None
    if query.pixels is not None:
        return _decode_pixels(query.pixels, tuple(record.architecture.input_shape)), None
    wanted = query.dataset
    split = splits.get(record, served.checkpoint.path, wanted.split)
    count = len(split.images)
    if wanted.index >= count:
        raise RequestError(
            422,
            f"dataset.index {wanted.index} is past the end: the {wanted.split} split of {split.source} "
            f"has {count:,} images (0 to {count - 1:,})",
        )
    label = int(split.labels[wanted.index])
    about = {
        "dataset": split.source,
        "split": wanted.split,
        "index": wanted.index,
        "count": count,
        "label": label,
        "class_name": record.class_names[label] if 0 <= label < len(record.class_names) else None,
    }
    return split.images[wanted.index][None].astype(np.float32), about


def _decode_pixels(pixels: Pixels, shape: tuple) -> np.ndarray:
    if tuple(pixels.shape) != shape:
        raise RequestError(422, f"pixels.shape {pixels.shape} is not the model's input shape {list(shape)}")
    try:
        data = base64.b64decode(pixels.data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "pixels.data: not base64") from None
    if len(data) != 4 * math.prod(shape):
        raise RequestError(
            422,
            f"pixels.data holds {len(data):,} bytes; shape {list(shape)} needs {4 * math.prod(shape):,} "
            "(one little-endian float32 per value)",
        )
    values = np.frombuffer(data, "<f4").reshape(1, *shape).astype(np.float32)
    if not np.isfinite(values).all() or np.abs(values).max() > MAX_PIXEL_VALUE:
        raise RequestError(
            422, f"pixels.data: every value must be a finite number within ±{MAX_PIXEL_VALUE:g}"
        )
    return values


def json_layers(
    served: ServedModel, checkpoints: LoadedCheckpoints, splits: LoadedSplits, query: ImageRequest
) -> dict:
    """/api/layers: `layer_answer` for the image `query` gives, with `dataset` for a dataset image."""
    started = time.perf_counter()
    loaded = network_at(served, checkpoints, query.checkpoint)
    raw, about = request_pixels(served, splits, query)
    answer = layer_answer(served, loaded, raw, started)
    if about is not None:
        answer["dataset"] = about
    return answer


def json_explain(
    served: ServedModel, checkpoints: LoadedCheckpoints, splits: LoadedSplits, query: ExplainRequest
) -> dict:
    """/api/explain: `arithmetic.explain` of one value for the image `query` gives, by the checkpoint it
    names, with `model`, `epoch` and `server_ms`."""
    started = time.perf_counter()
    loaded = network_at(served, checkpoints, query.checkpoint)
    raw, _ = request_pixels(served, splits, query)
    record, network = loaded.record, loaded.reference()
    try:
        with loaded.tracing:
            answer = explain(
                network, raw, record.standardization, query.layer, query.channel, query.y, query.x
            )
    except ExplainError as exc:
        raise RequestError(422, str(exc)) from None
    answer["model"], answer["epoch"] = served.id, loaded.epoch
    answer["server_ms"] = round(1000 * (time.perf_counter() - started), 2)
    return answer


def list_checkpoints_of(served: ServedModel) -> dict:
    """/api/models/{id}/checkpoints: the epochs the run keeps now (read afresh: a run may be training)."""
    return {"model": served.id, "served_epoch": served.record.epoch, "epochs": served.epochs()}


def model_filters(served: ServedModel, loaded: Loaded | None = None) -> dict:
    """The convolution kernels {"conv1": (F, C, k, k), "conv2": ...} of checkpoint `loaded` (default: the
    one served): shape and little-endian float32 bytes."""
    network = served.model if loaded is None else loaded.network
    return {
        name: {"shape": list(kernels.shape), "data": _b64(kernels.astype("<f4"))}
        for name, kernels in filters(network).items()
    }


def read_history(served: ServedModel) -> dict:
    """The run's learning curves, one entry per epoch, from RUN/history.jsonl as `cnnkit train` writes it
    now (the checkpoint's own record when there is no run folder).

    The file is read 1 MB at a time: one over MAX_HISTORY_BYTES is refused (422), and lines over
    MAX_HISTORY_LINE characters or that are not an object with a whole "epoch" are skipped. At most
    MAX_HISTORY_POINTS entries are answered, evenly thinned with the first and last kept (`thin`);
    `entries` says how many there were. So the memory and the answer stay small whatever the file holds.
    """
    record = served.record
    path = served.history_path
    if path is None or not path.is_file():
        points, count = _history_points(record.history)
        updated = None
    else:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_HISTORY_BYTES:
                    raise RequestError(
                        422, f"{path}: over {MAX_HISTORY_BYTES // 2**20} MB, not a run's history"
                    )
                lines = _lines(f, MAX_HISTORY_LINE, MAX_HISTORY_BYTES)
                points, count = _history_points(map(_json_line, lines))
            updated = path.stat().st_mtime
        except OSError as exc:
            raise RequestError(422, f"{path}: cannot read ({exc.strerror or exc})") from None
    return {
        "model": served.id,
        "source": str(path) if updated is not None else str(served.checkpoint.path),
        "live": updated is not None,
        "updated": updated,
        "served_epoch": record.epoch,
        "epochs": record.config.epochs,
        "entries": count,
        "history": points,
    }


def thin(items, most: int, keep=lambda item: item) -> tuple[list, int]:
    """`keep(item)` for at most `most` (2 or more) of `items`, evenly spaced with the first and the last,
    and how many `items` there were. Holds no more than `most` kept items at once, however many come."""
    kept, step, count, last = [], 1, 0, None
    for item in items:
        if count % step == 0:
            kept.append(keep(item))
            if len(kept) == most:  # keep every other one: the spacing doubles
                kept, step = kept[::2], 2 * step
        last, count = item, count + 1
    if count and (count - 1) % step != 0:  # the last one was not kept
        kept.append(keep(last))
    return kept, count


def _history_points(entries) -> tuple[list, int]:
    """`thin` of the entries that are objects with a whole "epoch", as {field: number or None} for
    HISTORY_FIELDS; and how many there were."""
    epochs = (
        entry for entry in entries if isinstance(entry, dict) and _whole(entry.get("epoch")) is not None
    )
    return thin(epochs, MAX_HISTORY_POINTS, _history_point)


def _history_point(entry: dict) -> dict:
    return {key: entry["epoch"] if key == "epoch" else _number(entry.get(key)) for key in HISTORY_FIELDS}


def _lines(f, longest: int, most: int):
    """The lines of the binary UTF-8 file `f` as text, at most `most` bytes read, skipping empty lines and
    any over `longest` characters. Read 1 MB at a time."""
    rest, skipping, total = b"", False, 0
    while total < most:
        chunk = f.read(min(2**20, most - total))
        if not chunk:
            break
        total += len(chunk)
        whole, newline, rest = (rest + chunk).rpartition(b"\n")
        if newline:
            lines = whole.decode("utf-8", "replace").split("\n")
            if skipping:  # the end of a long line
                lines[0], skipping = "", False
            yield from [line for line in lines if 0 < len(line) <= longest]
        if len(rest) > longest:
            rest, skipping = b"", True
    if rest and not skipping:
        yield rest.decode("utf-8", "replace")


_DECODER = json.JSONDecoder()


def _json_line(line: str):
    try:
        return _DECODER.raw_decode(line)[0]  # a third of json.loads's time on short lines
    except (ValueError, RecursionError):
        return None  # a line being written, or not cnnkit's: the page shows the others


def _prediction(served: ServedModel, proba: np.ndarray) -> dict:
    names = served.record.class_names
    label = int(np.argmax(proba))
    return {
        "model": served.id,
        "label": label,
        "class_name": names[label],
        "confidence": _number(proba[label]),
        "probabilities": {name: _number(p) for name, p in zip(names, proba, strict=True)},
    }


def _encode_layer(name: str, values: np.ndarray, description: str) -> dict:
    layer = {"name": name, "description": description, "shape": list(values.shape)}
    if values.ndim == 1:
        layer["values"] = [_number(v) for v in values]
        return layer
    maps = values.reshape(len(values), -1).astype(np.float64)
    maps = np.where(np.isfinite(maps), maps, 0.0)
    low, high = maps.min(axis=1), maps.max(axis=1)
    scale = np.divide(255.0, high - low, out=np.zeros_like(low), where=high > low)
    layer["min"] = [_number(v) for v in low]
    layer["max"] = [_number(v) for v in high]
    layer["data"] = _b64(np.round((maps - low[:, None]) * scale[:, None]).astype(np.uint8))
    return layer


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _number(value):
    """A finite number rounded to 6 significant digits, else None (JSON has no NaN)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return float(f"{value:.6g}") if math.isfinite(value) else None


def _whole(value) -> int | None:
    """A whole number 0 <= value < 2**53 (exact in JavaScript), else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53
    return value if ok else None


def json_bytes(value) -> bytes:
    """`value` as compact JSON, with null for NaN and the infinities (JSON has neither)."""
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a float that is not finite, somewhere
        text = json.dumps(strict_json(value), allow_nan=False, separators=(",", ":"))
    return text.encode()


class JSONAnswer(JSONResponse):
    """FastAPI's JSON response, with null for NaN and the infinities (see `json_bytes`)."""

    def render(self, content) -> bytes:
        return json_bytes(content)


# --- the worker pool ---


class WorkerPool:
    """`workers` threads for inference; at most `max_waiting` calls waiting or running, the rest refused;
    of those that decode an upload, at most `max_images` at once (each may briefly hold a hundred MB)."""

    def __init__(self, workers: int, max_waiting: int, max_images: int = MAX_IMAGES):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnnkit-serve")
        self.max_waiting, self.waiting = max_waiting, 0
        self.lock = threading.Lock()
        self.images = asyncio.Semaphore(max_images)

    async def run(self, function, *args, image: bool = False) -> Response:
        """`function(*args)` in a worker, answered as JSON (encoded in the worker too); `image`: it decodes
        an upload, so it waits (without holding a worker) while `max_images` others do."""
        with self.lock:
            if self.waiting >= self.max_waiting:
                raise RequestError(503, f"busy: {self.waiting} requests are queued; try again in a moment")
            self.waiting += 1
        try:
            if not image:
                return await asyncio.wrap_future(self.executor.submit(_guarded, function, *args))
            async with self.images:
                return await asyncio.wrap_future(self.executor.submit(_guarded, function, *args))
        finally:
            with self.lock:
                self.waiting -= 1

    def shutdown(self):
        self.executor.shutdown(wait=False, cancel_futures=True)


def _guarded(function, *args) -> Response:
    """Run `function` in a worker, turning what a user's input can cause into RequestError."""
    try:
        return Response(json_bytes(function(*args)), media_type="application/json")
    except CnnkitError as exc:
        raise RequestError(422, str(exc)) from None
    except MemoryError:
        raise RequestError(503, "out of memory; try a smaller image") from None


# --- request body limit ---


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, by its Content-Length or as it streams in;
    while the bodies held by all requests together would go over `max_held` bytes, 503.

    The body is read here (at most `max_bytes`) and handed on to the app whole; it counts as held until
    the app has answered.
    """

    def __init__(self, app, max_bytes: int, max_held: int = MAX_BODIES_BYTES):
        self.app, self.max_bytes, self.max_held = app, max_bytes, max_held
        self.held = 0  # bytes, all requests together (one event loop: no lock needed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(send, 400, "Content-Length is not a whole number")
                return
            if int(length) > self.max_bytes:
                await _send_error(send, 413, self._too_large())
                return
        body, counted, more = bytearray(), 0, True
        try:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                if self.held + len(chunk) > self.max_held:
                    held = self.held / 2**20
                    await _send_error(send, 503, f"busy: {held:.0f} MB of uploads are being read; try again")
                    return
                self.held += len(chunk)
                counted += len(chunk)
                body += chunk
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    await _send_error(send, 413, self._too_large())
                    return
            data = bytes(body)
            del body  # the buffer goes now; the copy handed on stays counted until the app has answered
            delivered = False

            async def replay():
                nonlocal delivered
                if delivered:
                    return await receive()
                delivered = True
                return {"type": "http.request", "body": data, "more_body": False}

            await self.app(scope, replay, send)
        finally:
            self.held -= counted

    def _too_large(self) -> str:
        return f"request body is over the limit of {self.max_bytes / 2**20:g} MB; send a smaller image"


# --- the Host header ---


class HostCheck:
    """ASGI middleware: a request whose Host header is not an IP address nor one of the names in `allowed`
    gets 400. A page of another site that has its own name resolve to this machine (DNS rebinding) sends
    that name as its Host, so it is refused; a request without a Host (HTTP/1.0) passes."""

    def __init__(self, app, allowed):
        self.app, self.allowed = app, frozenset(allowed)

    async def __call__(self, scope, receive, send):
        host = dict(scope["headers"]).get(b"host") if scope["type"] == "http" else None
        if host is not None:
            name = host_name(host.decode("latin-1"))
            if name not in self.allowed and not _is_address(name):
                await _send_error(
                    send,
                    400,
                    f"Host {name!r} is not a name this server answers to (it answers to IP addresses and "
                    f"{', '.join(sorted(self.allowed))}); to use it under that name, start cnnkit serve "
                    f"with --allow-host {name}",
                )
                return
        await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """The name or address of a Host header or --host, lowercase, without port, brackets or final dot:
    "[::1]:8000" -> "::1", "LocalHost.:80" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return (host.rpartition(":")[0] if host.count(":") == 1 else host).rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def _send_error(send, status: int, message: str):
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --- the app ---


def create_app(
    models: list[ServedModel],
    workers: int = 2,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_waiting: int = MAX_WAITING,
    max_images: int = MAX_IMAGES,
    max_bodies_bytes: int = MAX_BODIES_BYTES,
    allowed_hosts=None,
) -> FastAPI:
    """The FastAPI app serving `models` (the first is the default), with `workers` inference threads.

    `allowed_hosts`: the host names (besides IP addresses) a request's Host header may name; None lets
    any through (an app not listening on a socket, as in tests). The other limits are the module's.
    """
    if not models:
        raise ValueError("serve at least one model")
    descriptions = {served.id: served.description() for served in models}  # records do not change
    pool = WorkerPool(workers, max_waiting, max_images)
    checkpoints = LoadedCheckpoints()
    for served in models:
        checkpoints.pin(served.model, served.record, served.checkpoint.path)

    @asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown()

    app = FastAPI(
        title="cnnkit",
        version=__version__,
        description="Draw or upload an image and see a trained cnnkit network answer, layer by layer. "
        "Images go in a multipart form field named `file` "
        "(`curl -F file=@digit.png http://127.0.0.1:8000/api/predict`).",
        docs_url=None,  # FastAPI's /docs loads Swagger UI from a CDN; ours works offline
        redoc_url=None,
        lifespan=lifespan,
        default_response_class=JSONAnswer,
    )
    app.state.pool = pool
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, max_held=max_bodies_bytes)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)  # added last: it runs first

    app.include_router(page_routes())
    app.include_router(api_routes(models, descriptions, pool, checkpoints, LoadedSplits()))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    add_error_handlers(app)
    return app


def page_routes() -> APIRouter:
    """The page and its API docs (both offline: no CDN)."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @router.get("/docs", include_in_schema=False)
    def docs():
        return FileResponse(STATIC / "docs.html")

    return router


def api_routes(
    models: list[ServedModel],
    descriptions: dict,
    pool: "WorkerPool",
    checkpoints: LoadedCheckpoints | None = None,
    splits: LoadedSplits | None = None,
) -> APIRouter:
    """The JSON API over `models` (the first is the default), their `descriptions` (made once: records do
    not change), the inference `pool`, the run's `checkpoints` loaded on demand (the served ones pinned)
    and the dataset `splits` loaded on demand."""
    if checkpoints is None:
        checkpoints = LoadedCheckpoints()
        for served in models:
            checkpoints.pin(served.model, served.record, served.checkpoint.path)
    splits = splits or LoadedSplits()
    router = APIRouter()
    by_id = {served.id: served for served in models}

    def pick(model_id: str | None) -> ServedModel:
        if model_id is not None and model_id not in by_id:
            raise RequestError(404, f"no model {model_id!r}; served: {', '.join(by_id)}")
        served = by_id[model_id] if model_id is not None else models[0]
        if "error" in descriptions[served.id]:
            raise RequestError(500, descriptions[served.id]["error"])
        return served

    async def upload(file: UploadFile) -> tuple[bytes, str]:
        data = await file.read()
        if not data:
            raise RequestError(400, "the file is empty; send an image (PNG, JPEG, ...)")
        return data, Path(file.filename or "").name[:100] or "upload"  # named so in error messages

    model_query = Query(None, description="a model id from /api/models (default: the first)")
    checkpoint_query = Query(
        None, ge=0, description="an epoch from /api/models/{id}/checkpoints (default: the checkpoint served)"
    )
    image_field = File(..., description="an image file: PNG, JPEG, BMP, GIF, TIFF...")

    @router.get("/api/models", summary="The models served", tags=["models"])
    def list_models():
        """Each model: id, dataset, epoch (of `epochs` planned), class names, validation accuracy at that
        epoch (null without validation), input shape, preprocessing and layers. A model whose record
        cannot be read has only `id`, `source`, `checkpoint` and `error`."""
        return [descriptions[served.id] for served in models]

    @router.post("/api/predict", summary="Classify an image", tags=["predict"])
    async def predict(file: UploadFile = image_field, model: str | None = model_query):
        """`{"label", "class_name", "confidence", "probabilities": {class: p}, "model"}`, prepared
        and computed as `cnnkit predict` does."""
        served = pick(model)
        return await pool.run(predict_image, served, *await upload(file), image=True)

    @router.post("/api/activations", summary="Every layer's output for an image", tags=["predict"])
    async def layer_outputs(
        file: UploadFile = image_field,
        model: str | None = model_query,
        checkpoint: int | None = checkpoint_query,
    ):
        """The prediction, `epoch`, `input` (the prepared image, uint8 C x H x W in base64), `pixels` (the
        same as float32, to send to /api/explain) and `layers`: each with name, description, shape, and
        for maps `min`, `max` per map and `data` (uint8 base64, value = min + byte / 255 * (max - min)),
        for vectors `values`. `checkpoint=N`: computed by the run's checkpoint of epoch N."""
        served = pick(model)
        data, name = await upload(file)

        def run():
            return image_activations(served, data, name, network_at(served, checkpoints, checkpoint))

        return await pool.run(run, image=True)

    @router.post("/api/layers", summary="Every layer's output for an image given as JSON", tags=["predict"])
    async def json_layer_outputs(query: ImageRequest):
        """/api/activations's answer for an image given one of three ways: `image` (an image file in
        base64, prepared as /api/predict does), `pixels` (the `pixels` of an earlier answer: no preparation)
        or `dataset` (`{"split": "test", "index": 17}`: that image of the dataset the model was trained
        on, as `cnnkit evaluate` and `cnnkit report` number them, with its true class under `dataset`).
        `checkpoint`: an epoch the run keeps (the page's epoch slider)."""
        served = pick(query.model)
        return await pool.run(json_layers, served, checkpoints, splits, query, image=query.image is not None)

    @router.post("/api/explain", summary="How one value of one layer was computed", tags=["predict"])
    async def explain_value(query: ExplainRequest):
        """For an image given as for /api/layers, the arithmetic behind value (`channel`, `y`, `x`) of
        `layer` (unit `channel` of a vector layer), by the trained network's own weights: `value`, and
        `steps` from that value back to the nearest convolution or dense layer, each with a `kind`:
        `conv` (the input window, the filter's weights and their products per input channel, their `sum`,
        the `bias`, `value`; a CNN layer cross-correlates: the filter is not flipped), `relu`, `maxpool`
        (the pooling window and its `winner`), `batchnorm`, `dense` (the `top` contributions input x
        weight, the rest summed, the bias), `softmax`, `average`, `add` (a residual block), `standardize`
        (the input's pixel, mean and std) or `other`. See cnnkit.arithmetic."""
        served = pick(query.model)
        return await pool.run(json_explain, served, checkpoints, splits, query, image=query.image is not None)

    @router.get("/api/models/{model_id}/checkpoints", summary="The epochs a run keeps", tags=["models"])
    async def kept(model_id: str):
        """`{"model", "served_epoch", "epochs": [...]}`: the epochs whose checkpoints the run folder keeps
        now (read afresh), each a valid `checkpoint` for /api/activations, /api/layers and /api/explain."""
        return await pool.run(list_checkpoints_of, pick(model_id))

    @router.get("/api/models/{model_id}/filters", summary="Convolution kernels", tags=["models"])
    async def kernels(model_id: str, checkpoint: int | None = checkpoint_query):
        """`{"conv1": {"shape": [F, C, k, k], "data": base64 float32}, "conv2": ...}`: map j of a
        convolution layer is made by its kernel j. `checkpoint=N`: the kernels at epoch N."""
        served = pick(model_id)
        return await pool.run(lambda: model_filters(served, network_at(served, checkpoints, checkpoint)))

    @router.get("/api/models/{model_id}/history", summary="Learning curves", tags=["models"])
    async def history(model_id: str):
        """One entry per epoch (losses, validation accuracy, learning rate), read afresh from the run's
        history.jsonl on every request, so it follows a `cnnkit train` still writing to the run."""
        return await pool.run(read_history, pick(model_id))

    return router


def add_error_handlers(app: FastAPI):
    """Every error as a JSON body `{"error": "..."}`, with its status code."""

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems, about_file = [], False
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                reason = (error.get("ctx") or {}).get("error", "")
                problems.append(f"the body is not JSON ({reason}); send a JSON object".replace(" ()", ""))
                continue
            where = [str(part) for part in error.get("loc", ()) if part != "body"]
            about_file = about_file or where[-1:] == ["file"]
            problems.append(
                f"{'.'.join(where)}: {error.get('msg', 'invalid')}" if where else error.get("msg", "")
            )
        hint = "; send the image as a multipart form field named 'file' (curl -F file=@digit.png URL)"
        return JSONResponse({"error": "; ".join(problems) + (hint if about_file else "")}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        # Starlette raises the exception again after this response, so the server's log gets the traceback.
        return JSONResponse(
            {"error": f"internal error ({type(exc).__name__}); the server's log has the details"},
            status_code=500,
        )


# --- running it ---


def open_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port` (port 0: any free one); CnnkitError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ArgumentError(f"--host {host}: not an address or a known host name ({reason})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        reasons = {
            errno.EADDRINUSE: f"{host}:{port} is already in use; choose another --port (--port 0 picks a free one)",
            errno.EADDRNOTAVAIL: f"--host {host}: not an address of this machine",
            errno.EACCES: f"port {port}: permission denied (ports below 1024 need privileges); choose another --port",
        }
        raise ArgumentError(
            reasons.get(exc.errno, f"cannot listen on {host}:{port} ({exc.strerror or exc})")
        ) from None
    return sock


def serve(
    sources,
    host: str = "127.0.0.1",
    port: int = 8000,
    which=None,
    workers=None,
    log=print,
    allow_hosts=(),
    timeout: float | None = None,
) -> int:
    """Serve the page and the API for the models in `sources` (run folders or checkpoint files) until
    Ctrl-C or SIGTERM, which stop it gracefully (KeyboardInterrupt is raised after shutdown).

    `workers` inference threads (default: the CPUs this process may use, at most 4), each running
    one request at a time on one torch thread. Requests may name this server in their Host header as
    an IP address, localhost, `host` or one of `allow_hosts`. Each connection must send a whole request
    within `timeout` seconds (default: connections.REQUEST_TIMEOUT), and at most `connections.connection_limit()` are open at once.
    """
    import torch
    import uvicorn

    from cnnkit.threads import available_cpus

    models = load_models(sources, which)
    sock = open_socket(host, port)
    workers = workers or min(available_cpus(), 4)
    torch.set_num_threads(1)  # requests run side by side in the pool, one thread each
    give_back_large_blocks()  # see cnnkit.kernels.cpu
    timeout = timeout or REQUEST_TIMEOUT
    allowed = {"localhost", host_name(host), *(host_name(name) for name in allow_hosts)}
    app = create_app(models, workers=workers, allowed_hosts=allowed)
    address, bound_port = sock.getsockname()[:2]
    shown = f"[{address}]" if ":" in address else address
    log(f"cnnkit serve: {', '.join(m.id for m in models)} at http://{shown}:{bound_port}/ (Ctrl-C stops it)")
    if not ipaddress.ip_address(address).is_loopback:
        log(f"cnnkit serve: listening on {address}: other machines that can reach this one can use it too")
    for served in models:
        problem = served.description().get("error")
        if problem:
            log(f"cnnkit serve: {problem}")
    config = uvicorn.Config(
        app,
        http=guarded_protocol(timeout, connection_limit()),
        backlog=BACKLOG,
        ws="none",  # no WebSocket route: an upgrade request is answered as plain HTTP
        timeout_keep_alive=min(5, timeout),  # an idle keep-alive connection is closed sooner
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
