// cnnkit serve: the page. It draws what the JSON API returns and computes nothing about the network:
// the server prepares the image (as `cnnkit predict` does) and runs every layer (cnnkit.inspect).
"use strict";

const $ = (id) => document.getElementById(id);
const DEBOUNCE_MS = 15; // after a stroke, wait this long before sending (one request in flight at most)
const HISTORY_POLL_MS = 2000;

// Exposed for tests and the benchmark: stroke-to-render timings (ms) and the last answer.
window.cnnkit = { timings: [], renders: 0, last: null, errors: 0 };

const state = {
  models: [],
  model: null,
  source: null, // {kind: "pad"} or {kind: "file", file}
  hasInk: false,
  pendingSince: null, // performance.now() of the first change not yet sent
  inFlight: false,
  timer: null,
  generation: 0, // bumped by Clear and model changes: answers to older requests are dropped
  result: null,
  layout: "", // the layer panels' structure (names and shapes), rebuilt when it changes
  filters: new Map(), // model id -> Promise of its decoded kernels
  historyTimer: null,
  historyText: "",
};

// True while a change waits to be sent or an answer is awaited.
window.cnnkit.busy = () => state.inFlight || state.pendingSince !== null || state.timer !== null;

// --- colours: black is zero; warm colours positive, blue negative ---

function ramp(stops) {
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = (i / 255) * (stops.length - 1);
    const k = Math.min(Math.floor(t), stops.length - 2);
    const f = t - k;
    for (let c = 0; c < 3; c++) lut[i * 3 + c] = stops[k][c] + (stops[k + 1][c] - stops[k][c]) * f;
  }
  return lut;
}
const WARM = ramp([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]);
const COLD = ramp([[0, 0, 4], [20, 50, 120], [45, 110, 200], [150, 200, 245]]);

function colour(value, scale, out, at) {
  const t = scale > 0 ? Math.min(Math.abs(value) / scale, 1) : 0;
  const lut = value < 0 ? COLD : WARM;
  const i = Math.round(t * 255) * 3;
  out[at] = lut[i];
  out[at + 1] = lut[i + 1];
  out[at + 2] = lut[i + 2];
  out[at + 3] = 255;
}

// --- decoding the API's compact arrays ---

function bytes(b64) {
  const text = atob(b64);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

// A layer of maps (C, H, W) as Float32Array values: min + byte / 255 * (max - min), per map.
function mapValues(layer) {
  if (layer._values) return layer._values;
  const q = bytes(layer.data);
  const size = layer.shape[1] * layer.shape[2];
  const values = new Float32Array(q.length);
  for (let m = 0; m < layer.shape[0]; m++) {
    const lo = layer.min[m] ?? 0;
    const step = ((layer.max[m] ?? 0) - lo) / 255;
    for (let i = m * size; i < (m + 1) * size; i++) values[i] = lo + q[i] * step;
  }
  layer._values = values;
  return values;
}

function maxAbs(values) {
  let m = 0;
  for (const v of values) m = Math.max(m, Math.abs(v));
  return m;
}

// --- drawing maps ---

const GAP = 1;

function gridColumns(count) {
  return count <= 8 ? count : count <= 32 ? 8 : 16;
}

// Draw maps (C, H, W) as a grid on `canvas`, one pixel per value, gaps between maps left transparent.
function drawMapGrid(canvas, layer) {
  const [count, h, w] = layer.shape;
  const values = mapValues(layer);
  const cols = gridColumns(count);
  const rows = Math.ceil(count / cols);
  const width = cols * (w + GAP) - GAP;
  const height = rows * (h + GAP) - GAP;
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const image = new ImageData(width, height);
  const scale = maxAbs(values);
  for (let m = 0; m < count; m++) {
    const x0 = (m % cols) * (w + GAP);
    const y0 = Math.floor(m / cols) * (h + GAP);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        colour(values[m * h * w + y * w + x], scale, image.data, ((y0 + y) * width + x0 + x) * 4);
      }
    }
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
  canvas.dataset.cols = cols;
  canvas.dataset.cell = JSON.stringify([w + GAP, h + GAP]);
}

// Which map of a grid canvas a click at (clientX, clientY) falls on, or -1.
function mapAt(canvas, event, count) {
  const box = canvas.getBoundingClientRect();
  const [cw, ch] = JSON.parse(canvas.dataset.cell || "[1,1]");
  const x = ((event.clientX - box.left) / box.width) * canvas.width;
  const y = ((event.clientY - box.top) / box.height) * canvas.height;
  const index = Math.floor(y / ch) * Number(canvas.dataset.cols) + Math.floor(x / cw);
  return index >= 0 && index < count ? index : -1;
}

// One map (H, W) of `values` starting at `offset`, on its own canvas; scale: its own largest |value|.
function drawOneMap(canvas, values, offset, h, w) {
  canvas.width = w;
  canvas.height = h;
  const part = values.subarray(offset, offset + h * w);
  const scale = maxAbs(part);
  const image = new ImageData(w, h);
  for (let i = 0; i < h * w; i++) colour(part[i], scale, image.data, i * 4);
  canvas.getContext("2d").putImageData(image, 0, 0);
}

// A vector as a strip of cells, 64 a row.
function drawStrip(canvas, values) {
  const cols = Math.min(values.length, 64);
  const rows = Math.ceil(values.length / cols);
  canvas.width = cols;
  canvas.height = rows;
  const image = new ImageData(cols, rows);
  const scale = maxAbs(values);
  for (let i = 0; i < cols * rows; i++) {
    if (i < values.length) colour(values[i] ?? 0, scale, image.data, i * 4);
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

// The prepared input (C, H, W) uint8: gray, or RGB for three channels.
function drawInput(canvas, input) {
  const [c, h, w] = input.shape;
  const q = bytes(input.data);
  canvas.width = w;
  canvas.height = h;
  const image = new ImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    for (let k = 0; k < 3; k++) image.data[i * 4 + k] = q[(c === 3 ? k : 0) * h * w + i];
    image.data[i * 4 + 3] = 255;
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

// --- the answer: probability bars ---

function percent(p) {
  if (p === null || p === undefined) return "–";
  return p >= 0.999 ? ">99.9%" : p < 0.001 ? "<0.1%" : `${(100 * p).toFixed(1)}%`;
}

// Classes to list: all of them when few, else the 10 most probable.
function shownClasses(probabilities) {
  const entries = Object.entries(probabilities);
  if (entries.length <= 12) return entries;
  return entries.sort((a, b) => (b[1] ?? 0) - (a[1] ?? 0)).slice(0, 10);
}

function drawBars(container, probabilities, top) {
  container.replaceChildren(
    ...shownClasses(probabilities).map(([name, p]) => {
      const row = document.createElement("div");
      row.className = "bar" + (name === top ? " top" : "");
      row.dataset.class = name;
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = name;
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(1, p ?? 0)) * 100}%`;
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = percent(p);
      row.append(label, track, value);
      return row;
    }),
  );
}

// Scores (logits): signed bars around a middle line.
function drawScores(container, names, values) {
  const scale = Math.max(...values.map((v) => Math.abs(v ?? 0)), 1e-9);
  const order = names.length <= 12 ? names.map((_, i) => i) : [...names.keys()].sort((a, b) => values[b] - values[a]).slice(0, 10);
  container.replaceChildren(
    ...order.map((i) => {
      const row = document.createElement("div");
      row.className = "bar signed";
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = names[i];
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      const v = values[i] ?? 0;
      fill.className = "bar-fill " + (v < 0 ? "neg" : "pos");
      fill.style.width = `${(Math.abs(v) / scale) * 50}%`;
      fill.style.left = v < 0 ? `${50 - (Math.abs(v) / scale) * 50}%` : "50%";
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = v.toFixed(2);
      row.append(label, track, value);
      return row;
    }),
  );
}

// --- the layer panels ---

const STAGES = [
  {
    title: "Stage 1: convolution, ReLU, max-pooling",
    note: "Each of the first convolution's filters looks for one small pattern (an edge, a stroke end) everywhere in the image.",
    layers: [["conv1", "Convolution 1"], ["relu1", "ReLU"], ["pool1", "Max-pooling"]],
    stage: 1,
  },
  {
    title: "Stage 2: convolution, ReLU, max-pooling",
    note: "The second convolution combines stage 1's maps into larger patterns (loops, corners, crossings).",
    layers: [["conv2", "Convolution 2"], ["relu2", "ReLU"], ["pool2", "Max-pooling"]],
    stage: 2,
  },
  {
    title: "Dense layer",
    note: "Every value of stage 2's maps feeds each of these units: the features the classifier reads.",
    layers: [["dense3", "Dense layer 3"]],
  },
  {
    title: "Output",
    note: "One score per class; softmax turns the scores into probabilities that add up to 1.",
    layers: [["logits", "Scores (dense layer 4)"], ["probabilities", "Probabilities (softmax)"]],
  },
];

function shapeText(shape) {
  if (shape.length === 3) return `${shape[0]} maps of ${shape[1]}×${shape[2]}`;
  return `${shape[0]} numbers`;
}

function buildPanels(layers) {
  const byName = Object.fromEntries(layers.map((l) => [l.name, l]));
  const root = $("layers");
  root.replaceChildren();
  for (const stage of STAGES) {
    const present = stage.layers.filter(([name]) => byName[name]);
    if (!present.length) continue;
    const box = document.createElement("div");
    box.className = "stage";
    const title = document.createElement("h3");
    title.textContent = stage.title;
    const note = document.createElement("p");
    note.className = "small muted";
    note.textContent = stage.note;
    const row = document.createElement("div");
    row.className = "stage-panels";
    for (const [name, label] of present) {
      const layer = byName[name];
      const panel = document.createElement("figure");
      panel.className = "panel";
      panel.dataset.layer = name;
      const head = document.createElement("figcaption");
      head.innerHTML = `<b></b> <span class="shape"></span><span class="desc"></span>`;
      head.querySelector("b").textContent = label;
      head.querySelector(".shape").textContent = shapeText(layer.shape);
      head.querySelector(".desc").textContent = layer.description;
      panel.append(head);
      if (name === "logits" || name === "probabilities") {
        const bars = document.createElement("div");
        bars.className = "bars";
        panel.append(bars);
      } else {
        const canvas = document.createElement("canvas");
        canvas.className = "pixels" + (layer.shape.length === 3 ? " maps" : " strip");
        if (layer.shape.length === 3 && stage.stage) {
          canvas.addEventListener("click", (event) => {
            const index = mapAt(canvas, event, layer.shape[0]);
            if (index >= 0) openZoom(stage.stage, index);
          });
          canvas.addEventListener("mousemove", (event) => {
            const index = mapAt(canvas, event, layer.shape[0]);
            canvas.title = index >= 0 ? `map ${index + 1}: click to enlarge` : "";
          });
        }
        panel.append(canvas);
      }
      row.append(panel);
    }
    box.append(title, note, row);
    root.append(box);
  }
}

function drawPanels(result) {
  const layout = result.layers.map((l) => `${l.name}:${l.shape}`).join(" ");
  if (layout !== state.layout) {
    buildPanels(result.layers);
    state.layout = layout;
  }
  const names = state.model.class_names;
  for (const layer of result.layers) {
    const panel = document.querySelector(`.panel[data-layer="${layer.name}"]`);
    if (!panel) continue;
    if (layer.name === "logits") drawScores(panel.querySelector(".bars"), names, layer.values);
    else if (layer.name === "probabilities") {
      drawBars(panel.querySelector(".bars"), Object.fromEntries(names.map((n, i) => [n, layer.values[i]])), result.class_name);
    } else if (layer.shape.length === 3) drawMapGrid(panel.querySelector("canvas"), layer);
    else drawStrip(panel.querySelector("canvas"), layer.values);
    panel.dataset.rendered = "1";
  }
}

// --- one answer on the page ---

const PREPARATION = {
  digit: "made grayscale and light-on-dark, cropped to the ink, scaled into a 20×20 box and centred in the frame, as MNIST's digits were made",
  object: "made grayscale and light-on-dark, trimmed to the object, fitted to the frame and centred, as Fashion-MNIST's images were made",
  resize: "resized to the network's input, nothing cropped",
  "resize-dark": "made grayscale and light-on-dark, then resized, nothing cropped",
};

function render(result) {
  state.result = result;
  const [c, h, w] = result.input.shape;
  drawInput($("input-view"), result.input);
  $("input-caption").textContent =
    `${h}×${w} pixels${c === 3 ? " in colour" : ""}: your image ${PREPARATION[state.model.preprocessing] || "prepared"}. ` +
    "The network reads these numbers (standardized with its training images' mean and spread).";
  $("answer-label").textContent = result.class_name;
  $("answer-confidence").textContent = `${percent(result.confidence)} sure`;
  drawBars($("bars"), result.probabilities, result.class_name);
  $("status").textContent = `answered in ${result.server_ms} ms on the server`;
  $("status").classList.remove("error");
  drawPanels(result);
  document.body.classList.add("has-result");
  window.cnnkit.last = result;
  window.cnnkit.renders += 1;
}

function showError(message) {
  $("status").textContent = message;
  $("status").classList.add("error");
  $("answer-label").textContent = "?";
  $("answer-confidence").textContent = "";
  window.cnnkit.errors += 1;
}

function clearResult() {
  state.result = null;
  document.body.classList.remove("has-result");
  $("answer-label").innerHTML = "&nbsp;";
  $("answer-confidence").textContent = "";
  $("bars").replaceChildren();
  $("status").textContent = "";
  const view = $("input-view");
  view.getContext("2d").clearRect(0, 0, view.width, view.height);
  $("input-caption").textContent = "Draw or drop an image to see it as the network receives it.";
  $("layers").replaceChildren(Object.assign(document.createElement("p"), {
    className: "muted placeholder",
    textContent: "Draw something above: every layer's answer appears here.",
  }));
  state.layout = "";
}

// --- sending: debounced, one request in flight ---

function changed() {
  state.pendingSince ??= performance.now();
  if (!state.inFlight && !state.timer) state.timer = setTimeout(send, DEBOUNCE_MS);
}

async function send() {
  state.timer = null;
  if (state.pendingSince === null || !state.source || !state.model) return;
  const since = state.pendingSince;
  const generation = state.generation;
  const source = state.source;
  state.pendingSince = null;
  state.inFlight = true;
  try {
    const blob = source.kind === "file" ? source.file : await new Promise((done) => pad.toBlob(done, "image/png"));
    const form = new FormData();
    form.append("file", blob, source.kind === "file" ? source.file.name : "drawing.png");
    const sent = performance.now();
    const response = await fetch(`/api/activations?model=${encodeURIComponent(state.model.id)}`, { method: "POST", body: form });
    const body = await response.json();
    const received = performance.now();
    if (generation !== state.generation) return;
    if (!response.ok) {
      showError(body.error || `the server answered ${response.status}`);
      return;
    }
    render(body);
    const drawn = performance.now();
    window.cnnkit.timings.push({
      stroke_to_render: drawn - since,
      request_and_render: drawn - sent,
      request: received - sent,
      render: drawn - received,
      server: body.server_ms,
    });
  } catch (error) {
    if (generation === state.generation) showError(`no answer from the server (${error.message}); is cnnkit serve still running?`);
  } finally {
    state.inFlight = false;
    // Changes made while this request was out have waited long enough: send them at once.
    if (state.pendingSince !== null && !state.timer) state.timer = setTimeout(send, 0);
  }
}

// --- the drawing pad: pointer events (mouse, pen, touch) ---

const pad = $("pad");
const ink = pad.getContext("2d");
let drawing = false;
let last = null;

function blankPad() {
  ink.fillStyle = "#fff";
  ink.fillRect(0, 0, pad.width, pad.height);
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return [((event.clientX - box.left) / box.width) * pad.width, ((event.clientY - box.top) / box.height) * pad.height];
}

function stroke(from, to) {
  ink.strokeStyle = "#000";
  ink.fillStyle = "#000";
  ink.lineWidth = 20;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  ink.beginPath();
  if (from[0] === to[0] && from[1] === to[1]) {
    ink.arc(from[0], from[1], ink.lineWidth / 2, 0, 2 * Math.PI); // a tap leaves a dot
    ink.fill();
    return;
  }
  ink.moveTo(...from);
  ink.lineTo(...to);
  ink.stroke();
}

function startedDrawing() {
  state.source = { kind: "pad" };
  state.hasInk = true;
  $("pad-hint").hidden = true;
}

pad.addEventListener("pointerdown", (event) => {
  if (event.pointerType === "mouse" && event.button !== 0) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  last = padPoint(event);
  startedDrawing();
  stroke(last, last);
  changed();
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const points = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const point of points.length ? points : [event]) {
    const next = padPoint(point);
    stroke(last, next);
    last = next;
  }
  changed();
});

for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => {
    drawing = false;
  });
}

$("clear").addEventListener("click", () => {
  blankPad();
  state.source = null;
  state.hasInk = false;
  state.pendingSince = null;
  state.generation += 1;
  $("pad-hint").hidden = false;
  clearResult();
});

// --- upload and drag-and-drop: the file itself is sent, as `cnnkit predict` would read it ---

async function useFile(file) {
  if (!file) return;
  state.source = { kind: "file", file };
  state.hasInk = true;
  state.generation += 1;
  $("pad-hint").hidden = true;
  blankPad();
  try {
    const picture = await createImageBitmap(file);
    const scale = Math.min(pad.width / picture.width, pad.height / picture.height);
    const w = picture.width * scale;
    const h = picture.height * scale;
    ink.drawImage(picture, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
  } catch {
    ink.fillStyle = "#555";
    ink.font = "14px sans-serif";
    ink.fillText(file.name.slice(0, 36), 10, 140);
  }
  changed();
}

$("upload").addEventListener("change", (event) => {
  useFile(event.target.files[0]);
  event.target.value = "";
});

const dropZone = $("drop-zone");
for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    dropZone.classList.add("dropping");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropZone.addEventListener(type, () => dropZone.classList.remove("dropping"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  useFile(event.dataTransfer.files[0]);
});
// A file dropped beside the box should not replace the page.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());

// --- enlarging a map, with the filter that made it ---

function getFilters(model) {
  if (!state.filters.has(model.id)) {
    const promise = fetch(`/api/models/${encodeURIComponent(model.id)}/filters`)
      .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`status ${response.status}`))))
      .then((body) => {
        const out = {};
        for (const [name, entry] of Object.entries(body)) {
          out[name] = { shape: entry.shape, values: new Float32Array(bytes(entry.data).buffer) };
        }
        return out;
      });
    promise.catch(() => state.filters.delete(model.id));
    state.filters.set(model.id, promise);
  }
  return state.filters.get(model.id);
}

function figure(caption, canvas, extra) {
  const box = document.createElement("figure");
  const text = document.createElement("figcaption");
  text.textContent = caption;
  box.append(canvas);
  if (extra) box.append(extra);
  box.append(text);
  return box;
}

// Filter `index`: its C kernels (k x k) side by side; a single kernel with its weights written in.
function drawKernels(kernels, index) {
  const [, c, kh, kw] = kernels.shape;
  const size = c * kh * kw;
  const weights = kernels.values.subarray(index * size, (index + 1) * size);
  const scale = maxAbs(weights);
  const numbers = c === 1; // one kernel: its weights written in
  const cols = c <= 3 ? c : 8;
  const rows = Math.ceil(c / cols);
  const cell = numbers ? 44 : c <= 3 ? 16 : 8;
  const gap = c <= 3 ? 10 : 3;
  const canvas = document.createElement("canvas");
  canvas.width = cols * (kw * cell + gap) - gap;
  canvas.height = rows * (kh * cell + gap) - gap;
  canvas.className = "kernel";
  const context = canvas.getContext("2d");
  const pixel = new Uint8ClampedArray(4);
  for (let ch = 0; ch < c; ch++) {
    const x0 = (ch % cols) * (kw * cell + gap);
    const y0 = Math.floor(ch / cols) * (kh * cell + gap);
    for (let y = 0; y < kh; y++) {
      for (let x = 0; x < kw; x++) {
        const w = weights[ch * kh * kw + y * kw + x];
        colour(w, scale, pixel, 0);
        context.fillStyle = `rgb(${pixel[0]},${pixel[1]},${pixel[2]})`;
        context.fillRect(x0 + x * cell, y0 + y * cell, cell, cell);
        if (numbers) {
          context.fillStyle = Math.abs(w) / (scale || 1) > 0.55 && w > 0 ? "#000" : "#fff";
          context.font = "12px sans-serif";
          context.textAlign = "center";
          context.textBaseline = "middle";
          context.fillText(w.toFixed(2), x0 + (x + 0.5) * cell, y0 + (y + 0.5) * cell);
        }
      }
    }
  }
  return canvas;
}

async function openZoom(stage, index) {
  const result = state.result;
  if (!result) return;
  const byName = Object.fromEntries(result.layers.map((l) => [l.name, l]));
  const names = stage === 1 ? ["conv1", "relu1", "pool1"] : ["conv2", "relu2", "pool2"];
  const conv = byName[names[0]];
  $("zoom-title").textContent = `Convolution ${stage}, map ${index + 1} of ${conv.shape[0]}`;
  $("zoom-caption").textContent =
    stage === 1
      ? `Filter ${index + 1} is a grid of weights the network learned. It slides over the input; at each position the pixels under it are multiplied by its weights and added up, plus a bias. The map is bright (orange) where the image looks like the filter's positive weights, blue where it looks like the opposite.`
      : `Filter ${index + 1} holds one small grid of weights for each of stage 1's ${byName.pool1?.shape[0] ?? ""} pooled maps. Each grid slides over its map and all the answers are added up, so this map lights up where stage 1's patterns occur together in the right places.`;
  const body = $("zoom-body");
  body.replaceChildren(Object.assign(document.createElement("p"), { className: "muted", textContent: "loading the filter…" }));
  $("zoom").hidden = false;
  $("zoom-close").focus();
  const parts = [];
  try {
    const kernels = (await getFilters(state.model))[names[0]];
    const [, c, kh, kw] = kernels.shape;
    const what = c === 1 ? `${kh}×${kw} weights` : c === 3 ? `${kh}×${kw} weights for each of red, green and blue` : `${c} grids of ${kh}×${kw} weights, one per input map`;
    parts.push(figure(`The filter: ${what}`, drawKernels(kernels, index)));
  } catch (error) {
    parts.push(Object.assign(document.createElement("p"), { className: "error", textContent: `could not load the filter (${error.message})` }));
  }
  const captions = ["Its map (before ReLU)", "After ReLU: negatives become 0", "After max-pooling: the largest of each 2×2 block"];
  names.forEach((name, k) => {
    const layer = byName[name];
    if (!layer) return;
    const [, h, w] = layer.shape;
    const canvas = document.createElement("canvas");
    canvas.className = "pixels big";
    drawOneMap(canvas, mapValues(layer), index * h * w, h, w);
    parts.push(figure(`${captions[k]}, ${h}×${w}`, canvas));
  });
  body.replaceChildren(...parts);
}

function closeZoom() {
  $("zoom").hidden = true;
}
$("zoom-close").addEventListener("click", closeZoom);
$("zoom").addEventListener("click", (event) => {
  if (event.target === $("zoom")) closeZoom();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeZoom();
});

// --- models ---

function describeModel(model) {
  const classes = model.class_names.length <= 12 ? model.class_names.join(", ") : `${model.class_names.slice(0, 10).join(", ")}, …`;
  const accuracy = model.accuracy === null ? "no validation accuracy recorded" : `validation accuracy ${(100 * model.accuracy).toFixed(1)}%`;
  return `Trained on ${model.dataset ?? "arrays (ConvNN)"}, epoch ${model.epoch} of ${model.epochs}; ${accuracy}. ` +
    `${model.class_names.length} classes: ${classes}. Input ${model.input_shape[1]}×${model.input_shape[2]}` +
    `${model.input_shape[0] === 3 ? " colour" : ""}.`;
}

function chooseModel(model) {
  state.model = model;
  $("model-info").textContent = describeModel(model);
  state.generation += 1;
  state.layout = "";
  state.historyText = "";
  state.result = null; // its maps belong to the previous model
  if (state.source && state.hasInk) changed();
  else clearResult();
  if (!$("view-training").hidden) pollHistory();
}

async function loadModels() {
  const response = await fetch("/api/models");
  state.models = await response.json();
  const picker = $("model-picker");
  picker.replaceChildren(
    ...state.models.map((model) => {
      const option = document.createElement("option");
      option.value = model.id;
      const accuracy = model.accuracy === null ? "" : `, ${(100 * model.accuracy).toFixed(1)}%`;
      option.textContent = `${model.id} (${model.dataset ?? "arrays"}, epoch ${model.epoch}${accuracy})`;
      return option;
    }),
  );
  picker.addEventListener("change", () => chooseModel(state.models.find((m) => m.id === picker.value)));
  chooseModel(state.models[0]);
}

// --- tabs and the training view ---

for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll("[role=tab]")) {
      other.setAttribute("aria-selected", String(other === tab));
      $(other.dataset.view).hidden = other !== tab;
    }
    if (tab.dataset.view === "view-training") pollHistory();
    else clearTimeout(state.historyTimer);
  });
}

async function pollHistory() {
  clearTimeout(state.historyTimer);
  const model = state.model;
  try {
    const response = await fetch(`/api/models/${encodeURIComponent(model.id)}/history`);
    const text = await response.text();
    if (model !== state.model) return;
    const body = JSON.parse(text);
    if (!response.ok) $("history-info").textContent = body.error;
    else if (text !== state.historyText) {
      state.historyText = text;
      drawHistory(body);
    }
    if (response.ok) updateHistoryAge(body);
  } catch (error) {
    $("history-info").textContent = `no answer from the server (${error.message})`;
  }
  if (!$("view-training").hidden) state.historyTimer = setTimeout(pollHistory, HISTORY_POLL_MS);
}

function updateHistoryAge(body) {
  const done = body.history.length ? body.history[body.history.length - 1].epoch : 0;
  let text = `${done} of ${body.epochs} epochs. This page's model is epoch ${body.served_epoch}.`;
  if (body.live) {
    const age = Math.max(0, Date.now() / 1000 - body.updated);
    const ago = age < 90 ? `${Math.round(age)} s` : age < 5400 ? `${Math.round(age / 60)} min` : `${Math.round(age / 3600)} h`;
    text += ` Read from ${body.source} every ${HISTORY_POLL_MS / 1000} s (last written ${ago} ago), so a run still training shows each new epoch.`;
  } else {
    text += " From the checkpoint's record (no run folder beside it).";
  }
  $("history-info").textContent = text;
}

function drawHistory(body) {
  const h = body.history;
  const pick = (key) => h.filter((e) => e[key] !== null).map((e) => [e.epoch, e[key]]);
  const xMax = Math.max(body.epochs, h.length ? h[h.length - 1].epoch : 1);
  lineChart($("chart-loss"), [
    { name: "training loss", colour: "#e07b00", points: pick("train_loss") },
    { name: "validation loss", colour: "#2b6cb0", points: pick("valid_loss") },
  ], { xMax, marker: body.served_epoch });
  lineChart($("chart-accuracy"), [
    { name: "validation accuracy", colour: "#2f855a", points: pick("valid_accuracy") },
  ], { xMax, marker: body.served_epoch, percent: true });
  const table = $("history-table");
  const head = "<tr><th>epoch</th><th>training loss</th><th>validation loss</th><th>validation accuracy</th><th>learning rate</th><th>seconds</th></tr>";
  const fmt = (v, digits) => (v === null ? "–" : v.toFixed(digits));
  table.innerHTML = head + h.map((e) =>
    `<tr><td>${e.epoch}</td><td>${fmt(e.train_loss, 4)}</td><td>${fmt(e.valid_loss, 4)}</td>` +
    `<td>${e.valid_accuracy === null ? "–" : (100 * e.valid_accuracy).toFixed(2) + "%"}</td>` +
    `<td>${e.learning_rate === null ? "–" : e.learning_rate.toPrecision(3)}</td><td>${fmt(e.epoch_seconds, 1)}</td></tr>`,
  ).join("");
  $("chart-loss").dataset.points = String(h.length);
}

// Round tick values between lo and hi, about `count` of them; `ticks.digits` decimals show them exactly.
function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const step = 10 ** Math.floor(Math.log10(span / count));
  const best = [1, 2, 5, 10].map((m) => m * step).find((s) => span / s <= count) || step * 10;
  const ticks = [];
  for (let k = Math.ceil(lo / best - 1e-9); k * best <= hi + 1e-9; k++) ticks.push(k * best);
  ticks.digits = Math.max(0, -Math.floor(Math.log10(best) + 1e-9));
  return ticks;
}

function lineChart(canvas, series, { xMax, marker, percent: asPercent }) {
  const context = canvas.getContext("2d");
  const W = canvas.width;
  const H = canvas.height;
  const pad = { left: 56, right: 16, top: 28, bottom: 36 };
  context.clearRect(0, 0, W, H);
  const ys = series.flatMap((s) => s.points.map((p) => p[1]));
  if (!ys.length) {
    context.fillStyle = "#888";
    context.font = "14px sans-serif";
    context.fillText("no epoch finished yet", pad.left, H / 2);
    return;
  }
  let lo = Math.min(...ys);
  let hi = Math.max(...ys);
  if (asPercent) hi = Math.min(1, hi + 0.02);
  if (!asPercent) lo = Math.min(0, lo);
  if (hi - lo < 1e-9) hi = lo + 1;
  const x = (v) => pad.left + ((v - 0) / Math.max(xMax, 1)) * (W - pad.left - pad.right);
  const y = (v) => H - pad.bottom - ((v - lo) / (hi - lo)) * (H - pad.top - pad.bottom);
  context.font = "12px sans-serif";
  context.strokeStyle = "#ddd";
  context.fillStyle = "#555";
  context.textAlign = "right";
  context.textBaseline = "middle";
  const ticks = niceTicks(lo, hi, 5);
  for (const t of ticks) {
    context.beginPath();
    context.moveTo(pad.left, y(t));
    context.lineTo(W - pad.right, y(t));
    context.stroke();
    const label = asPercent ? `${(100 * t).toFixed(Math.max(0, ticks.digits - 2))}%` : t.toFixed(ticks.digits);
    context.fillText(label, pad.left - 6, y(t));
  }
  context.textAlign = "center";
  context.textBaseline = "top";
  for (const t of niceTicks(0, xMax, 10).filter((v) => Number.isInteger(v))) context.fillText(String(t), x(t), H - pad.bottom + 6);
  context.fillText("epoch", (pad.left + W - pad.right) / 2, H - 16);
  if (marker) {
    context.strokeStyle = "#999";
    context.setLineDash([4, 4]);
    context.beginPath();
    context.moveTo(x(marker), pad.top);
    context.lineTo(x(marker), H - pad.bottom);
    context.stroke();
    context.setLineDash([]);
  }
  let legendX = pad.left;
  for (const s of series) {
    context.strokeStyle = s.colour;
    context.fillStyle = s.colour;
    context.lineWidth = 2;
    context.beginPath();
    s.points.forEach(([px, py], i) => (i ? context.lineTo(x(px), y(py)) : context.moveTo(x(px), y(py))));
    context.stroke();
    for (const [px, py] of s.points) {
      context.beginPath();
      context.arc(x(px), y(py), 3, 0, 2 * Math.PI);
      context.fill();
    }
    context.lineWidth = 1;
    context.textAlign = "left";
    context.textBaseline = "middle";
    context.fillRect(legendX, 10, 14, 3);
    context.fillStyle = "#333";
    context.fillText(s.name, legendX + 20, 12);
    legendX += context.measureText(s.name).width + 44;
  }
}

// --- start ---

blankPad();
clearResult();
loadModels().catch((error) => showError(`could not list the models (${error.message})`));
