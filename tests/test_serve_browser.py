"""cnnkit serve in a real browser: Debian's chromium, driven by Playwright with real mouse events.

Skipped when chromium or Playwright is missing, except under CI=true, where that is a failure: CI
installs chromium (see .ci/run) and must run these tests. CNNKIT_CHROMIUM names another chromium.
"""

import base64
import itertools
import json
import os
import shutil
import signal
import statistics
from pathlib import Path

import httpx
import pytest
from conftest import start_cnnkit

pytestmark = pytest.mark.slow  # a real browser, a server and a training run

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CNNKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
PANELS = ("conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "dense3", "logits", "probabilities")

# A seven in two strokes (top bar and stem, then the crossbar), as fractions of the drawing pad.
SEVEN = [[(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)], [(0.35, 0.52), (0.62, 0.52)]]


@pytest.fixture(scope="module")
def browser():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        reason = f"Playwright is not installed ({exc})"
    if reason is None and not Path(CHROMIUM).is_file():
        reason = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is None:
        try:
            playwright = sync_playwright().start()
        except Exception as exc:
            reason = f"Playwright did not start ({exc})"
        else:
            try:
                chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            except Exception as exc:
                playwright.stop()
                reason = f"chromium did not start ({' '.join(str(exc).split())[:300]})"
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the browser tests, but: {reason}")
        pytest.skip(reason)
    yield chromium
    chromium.close()
    playwright.stop()


class Server:
    """`cnnkit serve ARGS --port 0` in a child process: its URL, and Ctrl-C at the end."""

    def __init__(self, *args):
        self.proc = start_cnnkit("serve", *args, "--port", "0", text=True)
        line = self.proc.stdout.readline()
        assert " at http://127.0.0.1:" in line, (line, self.proc.poll())
        self.url = line.split(" at ")[1].split()[0]

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 130 and "Traceback" not in err, err


def open_page(browser, url):
    """A page at `url` (1320 x 1000), collecting console errors and uncaught exceptions in page.problems."""
    page = browser.new_page(viewport={"width": 1320, "height": 1000})
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#model-picker option", state="attached")
    return page


def draw(page, strokes, steps=12):
    """Draw `strokes` (lists of points as fractions of the pad) with mouse down, moves and up."""
    box = page.locator("#pad").bounding_box()

    def at(x, y):
        return box["x"] + x * box["width"], box["y"] + y * box["height"]

    for stroke in strokes:
        page.mouse.move(*at(*stroke[0]))
        page.mouse.down()
        for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
            for i in range(1, steps + 1):
                t = i / steps
                page.mouse.move(*at(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t))
        page.mouse.up()
    settle(page)


def settle(page):
    """Wait until the page has sent every change and drawn the last answer."""
    page.wait_for_function("window.cnnkit.renders > 0 && !window.cnnkit.busy()", timeout=30_000)


def canvas_png(page) -> bytes:
    url = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
    return base64.b64decode(url.split(",", 1)[1])


def painted(page, selector) -> bool:
    """Whether a canvas holds any pixel that is neither transparent nor black."""
    return page.evaluate(
        """(selector) => {
            const c = document.querySelector(selector);
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            for (let i = 0; i < d.length; i += 4) if (d[i + 3] && (d[i] || d[i + 1] || d[i + 2])) return true;
            return false;
        }""",
        selector,
    )


def test_the_page_shows_what_the_api_answers_and_follows_training_live(browser, tiny_run, tmp_path):
    """Plumbing on tiny networks: the page's answer is /api/predict's for the same canvas; every layer
    panel is drawn; the model picker switches models; the training view follows history.jsonl."""
    first = Path(shutil.copytree(tiny_run, tmp_path / "first", ignore=shutil.ignore_patterns(".lock")))
    second = Path(shutil.copytree(tiny_run, tmp_path / "second", ignore=shutil.ignore_patterns(".lock")))
    server = Server(first, second)
    try:
        page = open_page(browser, server.url)
        assert page.locator("#model-picker option").all_text_contents()[1].startswith("second (npz:")
        assert "epoch 3 of 3" in page.text_content("#model-info")
        draw(page, SEVEN)
        shown = page.evaluate("window.cnnkit.last")
        api = httpx.post(server.url + "api/predict", files={"file": ("pad.png", canvas_png(page))}).json()
        assert page.text_content("#answer-label") == api["class_name"] == shown["class_name"]
        for name, p in api["probabilities"].items():
            assert shown["probabilities"][name] == pytest.approx(p, rel=1e-4, abs=1e-6)
        for name in PANELS:
            assert page.locator(f'.panel[data-layer="{name}"][data-rendered="1"]').count() == 1, name
        assert painted(page, "#input-view")

        page.select_option("#model-picker", "second")
        settle(page)
        assert page.evaluate("window.cnnkit.last.model") == "second"

        page.click("#tab-training")
        page.wait_for_function("document.getElementById('chart-loss').dataset.points === '3'")
        assert "This page's model is epoch 3" in page.text_content("#history-info")
        history = second / "history.jsonl"
        last = json.loads(history.read_text().splitlines()[-1])
        with open(history, "a") as f:  # as `cnnkit train --resume` would write the next epoch
            f.write(json.dumps({**last, "epoch": 4, "train_loss": last["train_loss"] / 2}) + "\n")
        page.wait_for_function("document.getElementById('chart-loss').dataset.points === '4'", timeout=15_000)
        assert page.locator("#history-table tr").count() == 5  # a header and four epochs
        for chart in ("#chart-loss", "#chart-accuracy"):  # a labelled tick at or below the lowest point
            lowest = float(page.get_attribute(chart, "data-lowest-tick"))
            assert lowest <= float(page.get_attribute(chart, "data-lowest-value")), chart

        page.click("#tab-draw")
        page.click("#clear")
        assert page.text_content("#answer-label").strip() == ""
        assert page.locator(".panel").count() == 0
        assert page.problems == []
    finally:
        server.stop()


def test_draw_a_seven_and_read_seven_layer_by_layer(browser, trained_run, tmp_path):
    """The chapter's network trained on mnist-5k: a 7 drawn with the mouse reads 7; an uploaded and a
    dropped file are read; a map enlarges with its filter. Saves a screenshot and the timings."""
    server = Server(trained_run)
    try:
        page = open_page(browser, server.url)
        draw(page, SEVEN)
        assert page.text_content("#answer-label") == "7"
        api = httpx.post(server.url + "api/predict", files={"file": ("pad.png", canvas_png(page))}).json()
        assert api["class_name"] == "7"
        for name in PANELS:
            assert page.locator(f'.panel[data-layer="{name}"][data-rendered="1"]').count() == 1, name
        for name in ("conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "dense3"):
            assert painted(page, f'.panel[data-layer="{name}"] canvas'), name
        page.screenshot(path=tmp_path / "serve.png", full_page=True)
        assert page.text_content("#tagline").startswith("Draw a digit")  # a model of digits
        # Under 1000 px the page stacks its first row; the winning class's bar keeps its three columns.
        page.set_viewport_size({"width": 900, "height": 900})
        columns = page.evaluate(
            "getComputedStyle(document.querySelector('#bars .bar.top')).gridTemplateColumns"
        )
        assert len(columns.split()) == 3, columns
        page.set_viewport_size({"width": 1320, "height": 1000})

        # A pixel of relu1 explained: a dialog whose title and close button do not overlap.
        page.locator('.panel[data-layer="relu1"] canvas').click(position={"x": 10, "y": 12})
        page.wait_for_function("window.cnnkit.explained > 0")
        assert page.text_content("#explain-title").startswith("relu1 map 0, row ")
        assert (
            page.locator("#explain-body .calc.conv table.grid").count() == 4
        )  # pixels, window, weights, products
        assert "cross-correlates" in page.text_content("#explain-body")
        page.screenshot(path=tmp_path / "serve-explain.png")
        page.keyboard.press("Escape")
        assert page.locator("#explain").is_hidden()

        docs = browser.new_page()
        docs.goto(server.url + "docs")
        docs.wait_for_selector("#intro code")
        intro = docs.text_content("#intro")
        assert "`" not in intro and server.url.rstrip("/") in intro and "127.0.0.1:8000" not in intro, intro
        docs.close()

        page.set_input_files("#upload", ROOT / "examples" / "two.png")
        page.wait_for_function("document.getElementById('answer-label').textContent === '2'")
        settle(page)
        data = base64.b64encode((ROOT / "examples" / "seven.png").read_bytes()).decode()
        page.evaluate(
            """(data) => {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const drop = new DataTransfer();
                drop.items.add(new File([bytes], "seven.png", {type: "image/png"}));
                document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", {dataTransfer: drop, bubbles: true}));
            }""",
            data,
        )
        page.wait_for_function("document.getElementById('answer-label').textContent === '7'")
        settle(page)
        assert page.problems == []

        timings = page.evaluate("window.cnnkit.timings")
        (tmp_path / "timings.json").write_text(json.dumps(timings))
        around = [t["request_and_render"] for t in timings]
        print(f"\nrequest + drawing, p50 {statistics.median(around):.1f} ms over {len(around)} answers")
        assert timings and all(t["request"] > 0 for t in timings)
    finally:
        server.stop()


LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
MAPS = ("conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "dense3")

# Bounding boxes in the viewport of the pad, the answer and every layer panel's canvas or bars.
BOXES = """() => {
    const box = (e) => { const b = e.getBoundingClientRect(); return {left: b.left, top: b.top, right: b.right, bottom: b.bottom}; };
    const out = {pad: box(document.getElementById('pad')), answer: box(document.getElementById('answer'))};
    for (const p of document.querySelectorAll('.panel[data-layer]')) out[p.dataset.layer] = box(p.querySelector('canvas, .bars'));
    return out;
}"""

# The viewport position of the largest value of a layer's maps (decoded as the page decodes them).
BRIGHTEST = """(name) => {
    const layer = window.cnnkit.last.layers.find((l) => l.name === name);
    const q = Uint8Array.from(atob(layer.data), (c) => c.charCodeAt(0));
    const [count, h, w] = layer.shape;
    let best = 0, at = [0, 0, 0];
    for (let m = 0; m < count; m++) for (let i = 0; i < h * w; i++) {
        const v = layer.min[m] + q[m * h * w + i] / 255 * (layer.max[m] - layer.min[m]);
        if (v > best) { best = v; at = [m, Math.floor(i / w), i % w]; }
    }
    const canvas = document.querySelector(`.panel[data-layer="${name}"] canvas`);
    const r = canvas.getBoundingClientRect();
    const cols = Number(canvas.dataset.cols), sx = r.width / canvas.width, sy = r.height / canvas.height;
    const x = ((at[0] % cols) * (w + 1) + at[2] + 0.5) * sx + r.left;
    const y = (Math.floor(at[0] / cols) * (h + 1) + at[1] + 0.5) * sy + r.top;
    return {channel: at[0], y: at[1], x: at[2], clientX: x, clientY: y};
}"""


def inside(box, viewport) -> bool:
    return (
        box["left"] >= 0
        and box["top"] >= 0
        and box["right"] <= viewport["width"]
        and box["bottom"] <= viewport["height"]
    )


def apart(a, b) -> bool:
    """Whether two bounding boxes (Playwright's x, y, width, height) do not overlap."""
    return (
        a["x"] + a["width"] <= b["x"]
        or b["x"] + b["width"] <= a["x"]
        or a["y"] + a["height"] <= b["y"]
        or b["y"] + b["height"] <= a["y"]
    )


def open_sized(browser, url, viewport):
    page = browser.new_page(viewport=viewport)
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#model-picker option", state="attached")
    return page


def first_mistake(run) -> int:
    """The index of the first test image the run's newest checkpoint gets wrong, as `cnnkit report` numbers them."""
    from cnnkit.checkpoint import load_network
    from cnnkit.evaluation import evaluation_split
    from cnnkit.inference import predict_proba

    network, ckpt = load_network(run, "3")
    _, _, split = evaluation_split(ckpt.record, ckpt.path)
    predicted = predict_proba(network, ckpt.record.standardization.apply(split.images)).argmax(axis=1)
    return int(next(i for i, (p, t) in enumerate(zip(predicted, split.labels, strict=True)) if p != t))


def test_one_screen_every_number_on_demand_and_every_epoch(browser, trained_run, tmp_path):
    """At 1280 x 800 the pad, the answer and every layer fit one screen; a click on a pixel shows the
    network's own arithmetic for it (as /api/explain gives it); the epoch slider shows the same drawing
    through an earlier checkpoint; on a 390 x 844 phone the answer sits under the pad and the dialog's
    close button beside its title; a report's test image opens from the address. Saves screenshots."""
    server = Server(trained_run)
    try:
        page = open_sized(browser, server.url, LAPTOP)
        draw(page, SEVEN)
        assert page.text_content("#answer-label") == "7"
        page.wait_for_selector('.panel[data-filters][data-rendered="1"]')
        layout = page.evaluate(BOXES)
        for name in ("pad", "answer", *MAPS, "logits", "probabilities"):
            assert inside(layout[name], LAPTOP), (name, layout[name])
        assert page.evaluate("window.scrollY") == 0
        page.screenshot(path=tmp_path / "laptop.png")

        # every number on demand: the brightest value of pool1, clicked with the mouse
        target = page.evaluate(BRIGHTEST, "pool1")
        page.mouse.click(target["clientX"], target["clientY"])
        page.wait_for_function("window.cnnkit.explained > 0")
        shown = page.evaluate("window.cnnkit.explanation")
        assert (shown["layer"], shown["channel"], shown["y"], shown["x"]) == (
            "pool1",
            target["channel"],
            target["y"],
            target["x"],
        )
        last = page.evaluate("window.cnnkit.last")
        request = {
            "pixels": last["pixels"],
            "checkpoint": 6,
            "layer": "pool1",
            "channel": target["channel"],
            "y": target["y"],
            "x": target["x"],
        }
        api = httpx.post(server.url + "api/explain", json=request).json()
        assert shown["steps"] == api["steps"] and [s["kind"] for s in api["steps"]] == [
            "maxpool",
            "relu",
            "conv",
        ]
        conv = api["steps"][2]
        text = page.text_content("#explain-body")
        assert "cross-correlates" in text and f"{conv['value']:.4f}" in text and f"{conv['bias']:.4f}" in text
        products = page.eval_on_selector_all(
            "#explain-body .calc.conv table.grid",
            "ts => ts.map((t) => [...t.querySelectorAll('td')].map((d) => d.textContent))",
        )[-1]
        assert products == [f"{v:.3f}" for row in conv["channels"][0]["products"] for v in row]
        assert page.locator('.panel[data-layer="pool1"] .marker').is_visible()
        assert apart(
            page.locator("#explain-close").bounding_box(), page.locator("#explain-title").bounding_box()
        )
        page.screenshot(path=tmp_path / "laptop-explain.png")

        # every epoch: the dialog's slider dragged to epoch 1 with the mouse
        slider = page.locator("#explain-epoch").bounding_box()
        page.mouse.click(slider["x"] + 3, slider["y"] + slider["height"] / 2)
        page.wait_for_function("window.cnnkit.explanation.epoch === 1 && window.cnnkit.last.epoch === 1")
        early = page.evaluate("window.cnnkit.explanation")
        assert (
            early["steps"][2]["channels"][0]["weights"] != conv["channels"][0]["weights"]
        )  # training changed the filter
        assert page.evaluate("window.cnnkit.last.probabilities") != last["probabilities"]
        assert page.get_attribute("#epoch-chart", "data-marker") == "1" and "epoch=1" in page.url
        page.wait_for_selector('.panel[data-filters][data-epoch="1"]')
        page.screenshot(path=tmp_path / "laptop-epoch-1-explain.png")
        page.keyboard.press("Escape")
        page.screenshot(path=tmp_path / "laptop-epoch-1.png")
        assert page.problems == []
        page.close()

        phone = open_sized(browser, server.url, PHONE)
        draw(phone, SEVEN)
        layout = phone.evaluate(BOXES)
        assert inside(layout["pad"], PHONE) and inside(layout["answer"], PHONE), layout
        assert 0 <= layout["answer"]["top"] - layout["pad"]["bottom"] < 40  # right under the pad
        phone.screenshot(path=tmp_path / "phone.png")
        phone.locator('.panel[data-layer="conv1"] canvas').scroll_into_view_if_needed()
        target = phone.evaluate(BRIGHTEST, "conv1")
        phone.mouse.click(target["clientX"], target["clientY"])
        phone.wait_for_function("window.cnnkit.explained > 0")
        assert phone.evaluate("window.cnnkit.explanation.layer") == "conv1"
        assert apart(
            phone.locator("#explain-close").bounding_box(), phone.locator("#explain-title").bounding_box()
        )
        phone.screenshot(path=tmp_path / "phone-explain.png")
        assert phone.problems == []
        phone.close()

        # a report's mistake opens in the page: ?test=INDEX&epoch=N
        index = first_mistake(trained_run)
        page = open_sized(browser, server.url, LAPTOP)
        page.goto(f"{server.url}?test={index}&epoch=3")
        page.wait_for_function(
            "window.cnnkit.renders > 0 && !window.cnnkit.busy() && window.cnnkit.last.epoch === 3"
        )
        last = page.evaluate("window.cnnkit.last")
        assert last["dataset"]["index"] == index and last["dataset"]["split"] == "test"
        assert last["dataset"]["class_name"] != last["class_name"] and "a mistake" in page.text_content(
            "#truth"
        )
        assert page.input_value("#epoch") == "2" and painted(page, "#pad")
        page.screenshot(path=tmp_path / "mistake.png")
        assert page.problems == []
    finally:
        server.stop()
