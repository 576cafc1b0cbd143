"""`cnnkit serve`: a local web page that shows a trained network answer layer by layer, and a JSON API.

The routes call the library as the command line does: models come from `checkpoint.load_model` and
their one `ModelRecord`; an image is prepared by `images.load_for_model` with the record's
preprocessing and standardized with its statistics, exactly as `cnnkit predict` does; predictions
come from `inference.predict_proba` and every layer's output from `inspect.activations`. The page
(static files in `static/`, no build step) only draws what the API returns.

    GET  /                              the page
    GET  /api/models                    the models served: dataset, epoch, classes, accuracy
    POST /api/predict?model=ID          multipart field `file`: label, class name, probabilities
    POST /api/activations?model=ID      the same, plus the prepared input and every layer's output
    GET  /api/models/{id}/filters       the convolution kernels (float32, base64)
    GET  /api/models/{id}/history       the run's learning curves, re-read on every request
    GET  /docs, /openapi.json           the API's documentation

Limits: request bodies over MAX_BODY_BYTES get 413 (checked from Content-Length and while the body
streams in); an image cnnkit cannot read (not an image, truncated, over images.MAX_IMAGE_PIXELS,
blank) gets 422; a malformed request 400; every error is JSON `{"error": "..."}`, never a traceback.
Inference runs in a pool of `workers` threads; at most `max_waiting` requests wait or run at once,
and the next gets 503, so a burst queues in bounded memory.
"""

import asyncio
import base64
import errno
import ipaddress
import json
import math
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from cnnkit import __version__
from cnnkit.checkpoint import Checkpoint, load_model
from cnnkit.errors import CnnkitError
from cnnkit.images import ImageBytes, load_for_model
from cnnkit.inference import predict_proba
from cnnkit.layer_outputs import DESCRIPTIONS, activations, filters
from cnnkit.runs import HISTORY_FILE

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 5 * 2**20
MAX_WAITING = 64
MAX_HISTORY_BYTES = 32 * 2**20
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
            "best_epoch": record.best_epoch,
            "accuracy": _number(accuracy),
            "class_names": list(record.class_names),
            "input_shape": list(record.architecture.input_shape),
            "preprocessing": record.preprocessing,
            "layers": [
                {"name": name, "shape": list(shape), "parameters": count}
                for name, shape, count in record.architecture.layers()
            ],
        }


def load_models(sources, which: str | None = None) -> list[ServedModel]:
    """Load each run folder or checkpoint file in `sources` (checkpoint `which`, see resolve_checkpoint).

    Ids are the run folder's name (or the checkpoint file's, outside a run), made unique with -2, -3...
    Raises CnnkitError naming the source that cannot be loaded.
    """
    served, taken = [], set()
    for source in sources:
        model, ckpt = load_model(source, which)
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

    `cnnkit predict`'s preparation, with the record's preprocessing (digit, object, resize...).
    """
    record = served.record
    return load_for_model(ImageBytes(data, name), record.architecture.input_shape, record.preprocessing)[None]


def predict_image(served: ServedModel, data: bytes, name: str) -> dict:
    """Label, class name, confidence and probabilities of one image, as `cnnkit predict --json --proba`."""
    record = served.record
    proba = predict_proba(served.model, record.standardization.apply(prepare(served, data, name)))[0]
    return _prediction(served, proba)


def image_activations(served: ServedModel, data: bytes, name: str) -> dict:
    """`predict_image`'s answer plus the prepared input and every layer's output.

    Feature maps (layers "input" to "pool2", shape C x H x W) come as uint8 with each map's own min and
    max (value = min + byte / 255 * (max - min)); the vectors ("dense3", "logits", "probabilities")
    as numbers.
    """
    started = time.perf_counter()
    record = served.record
    raw = prepare(served, data, name)
    layers = activations(served.model, record.standardization.apply(raw))
    answer = _prediction(served, layers["probabilities"][0])
    answer["input"] = {
        "shape": list(raw.shape[1:]),
        "data": _b64(np.clip(np.round(raw[0]), 0, 255).astype(np.uint8)),
    }
    answer["layers"] = [_encode_layer(name, values[0]) for name, values in layers.items()]
    answer["server_ms"] = round(1000 * (time.perf_counter() - started), 2)
    return answer


def model_filters(served: ServedModel) -> dict:
    """The convolution kernels {"conv1": (F, C, k, k), "conv2": ...}: shape and little-endian float32 bytes."""
    return {
        name: {"shape": list(kernels.shape), "data": _b64(kernels.astype("<f4"))}
        for name, kernels in filters(served.model).items()
    }


def read_history(served: ServedModel) -> dict:
    """The run's history, one entry per epoch, from RUN/history.jsonl as `cnnkit train` writes it now
    (the checkpoint's own record when there is no run folder)."""
    record = served.record
    path = served.history_path
    entries, updated = list(record.history), None
    if path is not None and path.is_file():
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_HISTORY_BYTES + 1)
            updated = path.stat().st_mtime
        except OSError as exc:
            raise RequestError(422, f"{path}: cannot read ({exc.strerror or exc})") from None
        if len(text) > MAX_HISTORY_BYTES:
            raise RequestError(422, f"{path}: over {MAX_HISTORY_BYTES // 2**20} MB, not a run's history")
        entries = []
        for line in text.decode("utf-8", "replace").splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line being written, or not cnnkit's: the page shows the others
    history = [
        {key: entry["epoch"] if key == "epoch" else _number(entry.get(key)) for key in HISTORY_FIELDS}
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("epoch"), int)
    ]
    return {
        "model": served.id,
        "source": str(path) if updated is not None else str(served.checkpoint.path),
        "live": updated is not None,
        "updated": updated,
        "served_epoch": record.epoch,
        "epochs": record.config.epochs,
        "history": history,
    }


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


def _encode_layer(name: str, values: np.ndarray) -> dict:
    layer = {"name": name, "description": DESCRIPTIONS[name], "shape": list(values.shape)}
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


# --- the worker pool ---


class WorkerPool:
    """`workers` threads for inference; at most `max_waiting` calls waiting or running, the rest refused."""

    def __init__(self, workers: int, max_waiting: int):
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnnkit-serve")
        self.max_waiting, self.waiting = max_waiting, 0
        self.lock = threading.Lock()

    async def run(self, function, *args) -> Response:
        """`function(*args)` in a worker, answered as JSON (encoded in the worker too)."""
        with self.lock:
            if self.waiting >= self.max_waiting:
                raise RequestError(503, f"busy: {self.waiting} requests are queued; try again in a moment")
            self.waiting += 1
        try:
            return await asyncio.wrap_future(self.executor.submit(_guarded, function, *args))
        finally:
            with self.lock:
                self.waiting -= 1

    def shutdown(self):
        self.executor.shutdown(wait=False, cancel_futures=True)


def _guarded(function, *args) -> Response:
    """Run `function` in a worker, turning what a user's input can cause into RequestError."""
    try:
        body = json.dumps(function(*args), allow_nan=False, separators=(",", ":"))
        return Response(body, media_type="application/json")
    except CnnkitError as exc:
        raise RequestError(422, str(exc)) from None
    except MemoryError:
        raise RequestError(503, "out of memory; try a smaller image") from None


# --- request body limit ---


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413, by its Content-Length or as it streams in.

    The body is read here (at most `max_bytes`) and handed on to the app whole.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

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
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await _send_error(send, 413, self._too_large())
                return
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"request body is over the limit of {self.max_bytes / 2**20:g} MB; send a smaller image"


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
) -> FastAPI:
    """The FastAPI app serving `models` (the first is the default), with `workers` inference threads."""
    if not models:
        raise ValueError("serve at least one model")
    by_id = {served.id: served for served in models}
    pool = WorkerPool(workers, max_waiting)

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
    )
    app.state.pool = pool
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    def pick(model_id: str | None) -> ServedModel:
        if model_id is None:
            return models[0]
        if model_id not in by_id:
            raise RequestError(404, f"no model {model_id!r}; served: {', '.join(by_id)}")
        return by_id[model_id]

    async def upload(file: UploadFile) -> tuple[bytes, str]:
        data = await file.read()
        if not data:
            raise RequestError(400, "the file is empty; send an image (PNG, JPEG, ...)")
        return data, Path(file.filename or "").name[:100] or "upload"  # named so in error messages

    model_query = Query(None, description="a model id from /api/models (default: the first)")
    image_field = File(..., description="an image file: PNG, JPEG, BMP, GIF, TIFF...")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return FileResponse(STATIC / "docs.html")

    @app.get("/api/models", summary="The models served", tags=["models"])
    def list_models():
        """Each model: id, dataset, epoch (of `epochs` planned), class names, validation accuracy at that
        epoch (null without validation), input shape, preprocessing and layers."""
        return [served.describe() for served in models]

    @app.post("/api/predict", summary="Classify an image", tags=["predict"])
    async def predict(file: UploadFile = image_field, model: str | None = model_query):
        """`{"label", "class_name", "confidence", "probabilities": {class: p}, "model"}`, prepared
        and computed as `cnnkit predict` does."""
        served = pick(model)
        return await pool.run(predict_image, served, *await upload(file))

    @app.post("/api/activations", summary="Every layer's output for an image", tags=["predict"])
    async def layer_outputs(file: UploadFile = image_field, model: str | None = model_query):
        """The prediction, `input` (the prepared image, uint8 C x H x W in base64) and `layers`: each with
        name, description, shape, and for maps `min`, `max` per map and `data` (uint8 base64, value =
        min + byte / 255 * (max - min)), for vectors `values`."""
        served = pick(model)
        return await pool.run(image_activations, served, *await upload(file))

    @app.get("/api/models/{model_id}/filters", summary="Convolution kernels", tags=["models"])
    async def kernels(model_id: str):
        """`{"conv1": {"shape": [F, C, k, k], "data": base64 float32}, "conv2": ...}`: map j of a
        convolution layer is made by its kernel j."""
        return await pool.run(model_filters, pick(model_id))

    @app.get("/api/models/{model_id}/history", summary="Learning curves", tags=["models"])
    async def history(model_id: str):
        """One entry per epoch (losses, validation accuracy, learning rate), read afresh from the run's
        history.jsonl on every request, so it follows a `cnnkit train` still writing to the run."""
        return await pool.run(read_history, pick(model_id))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

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

    return app


# --- running it ---


def open_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port` (port 0: any free one); CnnkitError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise CnnkitError(f"--host {host}: not an address or a known host name ({reason})") from None
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
        raise CnnkitError(
            reasons.get(exc.errno, f"cannot listen on {host}:{port} ({exc.strerror or exc})")
        ) from None
    return sock


def serve(sources, host: str = "127.0.0.1", port: int = 8000, which=None, workers=None, log=print) -> int:
    """Serve the page and the API for the models in `sources` (run folders or checkpoint files) until
    Ctrl-C or SIGTERM, which stop it gracefully (KeyboardInterrupt is raised after shutdown).

    `workers` inference threads (default: the CPUs this process may use, at most 4), each running
    one request at a time on one torch thread.
    """
    import torch
    import uvicorn

    from cnnkit.threads import available_cpus

    models = load_models(sources, which)
    sock = open_socket(host, port)
    workers = workers or min(available_cpus(), 4)
    torch.set_num_threads(1)  # requests run side by side in the pool, one thread each
    app = create_app(models, workers=workers)
    address, bound_port = sock.getsockname()[:2]
    shown = f"[{address}]" if ":" in address else address
    log(f"cnnkit serve: {', '.join(m.id for m in models)} at http://{shown}:{bound_port}/ (Ctrl-C stops it)")
    if not ipaddress.ip_address(address).is_loopback:
        log(f"cnnkit serve: listening on {address}: other machines that can reach this one can use it too")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
