"""`cnnkit serve` under load, and how fast the page answers a stroke in a real browser.

Starts `cnnkit serve RUN --port 0` in a child process on 127.0.0.1, then:

1. load: `--clients` concurrent clients (asyncio + httpx, one connection each), each sending
   `--requests` POST /api/predict requests with real digit images (mnist-5k's test split, written
   as PNG files): errors (any answer but 200), requests per second, latency p50 / p99, and the
   share of answers that name the image's true digit;
2. arithmetic: one client, as one person at the page: `--clicks` POST /api/explain requests, each
   for a random value of a random layer of a digit's answer (a click on a pixel: the arithmetic behind
   it), and `--slides` POST /api/layers requests moving through the run's kept checkpoints in turn (the
   epoch slider). Latency p50 / p99 as the client sees it and as the server reports it; the first
   request of each checkpoint, which loads it, is counted apart ("cold");
3. browser (`--browser`, needs Debian's chromium and Playwright): draws `--strokes` digits with mouse
   events and reads the page's own timings (performance.now): request + drawing of each answer
   (from sending the canvas to the layers drawn) and stroke to render (from the first pointer event
   not yet sent to the layers drawn, which includes waiting for the request in flight).

Prints one JSON object per part, then a table. `--clients 0` skips the load.

    python3 benchmarks/bench_serve.py --run runs/quickstart [--clients 50] [--requests 40] [--browser]
"""

import argparse
import asyncio
import io
import itertools
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time

import httpx
import numpy as np
from PIL import Image


def start_server(run: str, workers: int | None) -> tuple[subprocess.Popen, str]:
    extra = ["--workers", str(workers)] if workers else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", "serve", run, "--port", "0", *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise SystemExit(f"cnnkit serve did not start: {line!r}")
    return proc, line.split(" at ")[1].split()[0]


def digit_pngs(count: int) -> list[tuple[bytes, int]]:
    """`count` real MNIST digits (mnist-5k's test split, cycled) as PNG files, with their labels."""
    from cnnkit.data import load_dataset

    test = load_dataset("mnist-5k").test
    out = []
    for i in range(min(count, len(test))):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(test.images[i, 0], np.uint8)).save(buffer, "PNG")
        out.append((buffer.getvalue(), int(test.labels[i])))
    return out


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def load(url: str, clients: int, requests: int, images) -> dict:
    latencies, errors, correct = [], [], 0

    async def client(k: int):
        nonlocal correct
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1)) as http:
            for i in range(requests):
                data, label = images[(k * requests + i) % len(images)]
                started = time.perf_counter()
                try:
                    response = await http.post(url + "api/predict", files={"file": ("digit.png", data)})
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)
                    continue
                latencies.append(1000 * (time.perf_counter() - started))
                if response.status_code != 200:
                    errors.append(response.status_code)
                elif response.json()["label"] == label:
                    correct += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    seconds = time.perf_counter() - started
    total = clients * requests
    return {
        "part": "load",
        "clients": clients,
        "requests": total,
        "errors": len(errors),
        "error_kinds": sorted({str(e) for e in errors}),
        "seconds": round(seconds, 2),
        "requests_per_s": round(total / seconds, 1),
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "correct_share": round(correct / total, 4),
    }


def arithmetic(url: str, png: bytes, clicks: int, slides: int, seed: int = 0) -> dict:
    """Click-to-arithmetic and epoch-slider requests, one at a time, as one person at the page."""
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as http:
        answer = http.post(url + "api/activations", files={"file": ("digit.png", png)}).json()
        model = answer["model"]
        epochs = http.get(url + f"api/models/{model}/checkpoints").json()["epochs"]

        def timed(route, body):
            started = time.perf_counter()
            response = http.post(url + route, json=body)
            ms = 1000 * (time.perf_counter() - started)
            if response.status_code != 200:
                raise SystemExit(f"{route} answered {response.status_code}: {response.text[:300]}")
            return ms, response.json()["server_ms"]

        click, click_server = [], []
        for _ in range(clicks):
            layer = rng.choice([layer for layer in answer["layers"] if layer["name"] != "input"])
            shape = layer["shape"]
            where = {"channel": rng.randrange(shape[0])}
            if len(shape) == 3:
                where |= {"y": rng.randrange(shape[1]), "x": rng.randrange(shape[2])}
            ms, server = timed("api/explain", {"pixels": answer["pixels"], "layer": layer["name"], **where})
            click.append(ms)
            click_server.append(server)
        warm, warm_server, cold = [], [], []
        for i in range(slides):
            epoch = epochs[i % len(epochs)]
            ms, server = timed("api/layers", {"pixels": answer["pixels"], "checkpoint": epoch})
            if i < len(epochs) and epoch != answer["epoch"]:
                cold.append(ms)  # its first visit loads the checkpoint
            else:
                warm.append(ms)
                warm_server.append(server)
    return {
        "part": "arithmetic",
        "clicks": clicks,
        "explain_p50_ms": round(percentile(click, 50), 1),
        "explain_p99_ms": round(percentile(click, 99), 1),
        "explain_server_p50_ms": round(percentile(click_server, 50), 1),
        "slides": slides,
        "checkpoints": len(epochs),
        "slider_p50_ms": round(percentile(warm, 50), 1),
        "slider_p99_ms": round(percentile(warm, 99), 1),
        "slider_server_p50_ms": round(percentile(warm_server, 50), 1),
        "slider_cold_p50_ms": round(percentile(cold, 50), 1),
    }


# Strokes of the ten digits, as fractions of the pad: a few are enough to exercise every layer.
DIGITS = [
    [[(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)], [(0.35, 0.52), (0.62, 0.52)]],  # 7
    [[(0.5, 0.15), (0.5, 0.85)]],  # 1
    [[(0.3, 0.3), (0.5, 0.15), (0.7, 0.3), (0.3, 0.85), (0.75, 0.85)]],  # 2
    [[(0.5, 0.15), (0.3, 0.3), (0.3, 0.7), (0.5, 0.85), (0.7, 0.7), (0.7, 0.3), (0.5, 0.15)]],  # 0
]


def browser(url: str, strokes: int) -> dict:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        page = b.new_page(viewport={"width": 1320, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#model-picker option", state="attached")
        box = page.locator("#pad").bounding_box()
        for n in range(strokes):
            page.click("#clear")
            for stroke in DIGITS[n % len(DIGITS)]:
                points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
                page.mouse.move(*points[0])
                page.mouse.down()
                for (x0, y0), (x1, y1) in itertools.pairwise(points):
                    for i in range(1, 9):
                        page.mouse.move(x0 + (x1 - x0) * i / 8, y0 + (y1 - y0) * i / 8)
                page.mouse.up()
            page.wait_for_function("window.cnnkit.renders > 0 && !window.cnnkit.busy()")
        timings = page.evaluate("window.cnnkit.timings")
        b.close()
    pick = {
        key: [t[key] for t in timings]
        for key in ("request_and_render", "stroke_to_render", "request", "render", "server")
    }
    return {
        "part": "browser",
        "answers": len(timings),
        **{f"{key}_p50_ms": round(statistics.median(v), 1) for key, v in pick.items() if v},
        **{f"{key}_p99_ms": round(percentile(v, 99), 1) for key, v in pick.items() if v},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quickstart", help="a run folder or checkpoint to serve")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=40, help="requests per client")
    parser.add_argument("--workers", type=int, default=None, help="cnnkit serve --workers (default: its own)")
    parser.add_argument("--clicks", type=int, default=200, help="/api/explain requests (clicks on values)")
    parser.add_argument(
        "--slides", type=int, default=200, help="/api/layers requests through the checkpoints"
    )
    parser.add_argument("--browser", action="store_true", help="also time the page in chromium")
    parser.add_argument("--strokes", type=int, default=20, help="digits drawn in the browser")
    args = parser.parse_args(argv)
    from cnnkit.device import machine_line

    print(f"# machine: {machine_line()}", file=sys.stderr, flush=True)  # with every figure
    images = digit_pngs(500)
    proc, url = start_server(args.run, args.workers)
    results = {}
    try:
        httpx.post(url + "api/predict", files={"file": ("warm.png", images[0][0])}, timeout=60)  # warm-up
        if args.clients:
            results["load"] = asyncio.run(load(url, args.clients, args.requests, images))
            print(json.dumps(results["load"]), flush=True)
        if args.clicks or args.slides:
            results["arithmetic"] = arithmetic(url, images[0][0], args.clicks, args.slides)
            print(json.dumps(results["arithmetic"]), flush=True)
        if args.browser:
            results["browser"] = browser(url, args.strokes)
            print(json.dumps(results["browser"]), flush=True)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    print()
    if "load" in results:
        first = results["load"]
        print(
            f"{first['clients']} clients x {args.requests} requests: {first['errors']} errors, "
            f"{first['requests_per_s']:,.0f} requests/s, p50 {first['p50_ms']} ms, p99 {first['p99_ms']} ms, "
            f"{first['correct_share']:.1%} read correctly"
        )
    if "arithmetic" in results:
        a = results["arithmetic"]
        print(
            f"click to arithmetic (POST /api/explain, {a['clicks']} clicks): p50 {a['explain_p50_ms']} ms "
            f"(p99 {a['explain_p99_ms']}, server p50 {a['explain_server_p50_ms']})"
        )
        print(
            f"epoch slider (POST /api/layers, {a['slides']} moves over {a['checkpoints']} checkpoints): "
            f"p50 {a['slider_p50_ms']} ms (p99 {a['slider_p99_ms']}, server p50 {a['slider_server_p50_ms']}); "
            f"a checkpoint's first visit, which loads it: p50 {a['slider_cold_p50_ms']} ms"
        )
    if args.browser:
        b = results["browser"]
        print(
            f"browser ({b['answers']} answers): request + drawing p50 {b['request_and_render_p50_ms']} ms "
            f"(p99 {b['request_and_render_p99_ms']}), stroke to render p50 {b['stroke_to_render_p50_ms']} ms"
        )


if __name__ == "__main__":
    main()
