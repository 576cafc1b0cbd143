// One answer on the page, and sending the image: debounced, one request in flight.

import { postImage, postLayers } from "./api.js";
import { drawBars, percent } from "./bars.js";
import { showEpoch } from "./epochs.js";
import { refreshExplain } from "./explain.js";
import { drawInput } from "./maps.js";
import { padBlob, showOnPad } from "./pad.js";
import { drawPanels } from "./panels.js";
import { $, DEBOUNCE_MS, state } from "./state.js";

export const PREPARATION = {
  digit: "made grayscale and light-on-dark, cropped to the ink, scaled into a 20×20 box and centred in the frame, as MNIST's digits were made",
  object: "made grayscale and light-on-dark, trimmed to the object, fitted to the frame and centred, as Fashion-MNIST's images were made",
  resize: "resized to the network's input, nothing cropped",
  "resize-dark": "made grayscale and light-on-dark, then resized, nothing cropped",
};

export function render(result) {
  state.result = result;
  const [c, h, w] = result.input.shape;
  drawInput($("input-view"), result.input);
  const how = result.dataset
    ? `image ${result.dataset.index} of ${result.dataset.dataset}'s ${result.dataset.split} split, as the dataset stores it (nothing prepared)`
    : `your image ${PREPARATION[state.model.preprocessing] || "prepared"}`;
  $("input-caption").textContent =
    `${h}×${w} pixels${c === 3 ? " in colour" : ""}: ${how}. ` +
    "The network reads these numbers standardized with its training images' mean and spread: click a pixel of the small picture to see the arithmetic.";
  $("answer-label").textContent = result.class_name;
  $("answer-confidence").textContent = `${percent(result.confidence)} sure`;
  drawBars($("bars"), result.probabilities, result.class_name);
  const truth = $("truth");
  truth.hidden = !result.dataset;
  if (result.dataset) {
    const d = result.dataset;
    const right = d.class_name === result.class_name;
    truth.textContent = `${d.split} image ${d.index} of ${d.dataset} (${d.count} images): truly ${d.class_name}` + (right ? ", read correctly." : `; the network reads ${result.class_name}: a mistake.`);
    truth.classList.toggle("error", !right);
    showOnPad(result.input);
  }
  $("status").textContent = `epoch ${result.epoch} · ${Math.round(result.server_ms)} ms on the server`;
  $("status").classList.remove("error");
  drawPanels(result);
  showEpoch();
  document.body.classList.add("has-result");
  window.cnnkit.last = result;
  window.cnnkit.renders += 1;
  refreshExplain();
}

export function showError(message) {
  $("status").textContent = message;
  $("status").classList.add("error");
  $("answer-label").textContent = "?";
  $("answer-confidence").textContent = "";
  window.cnnkit.errors += 1;
}

export function clearResult() {
  state.result = null;
  document.body.classList.remove("has-result");
  $("answer-label").innerHTML = "&nbsp;";
  $("answer-confidence").textContent = "";
  $("bars").replaceChildren();
  $("status").textContent = "";
  $("truth").hidden = true;
  const view = $("input-view");
  view.getContext("2d").clearRect(0, 0, view.width, view.height);
  $("input-caption").textContent = "Draw or drop an image to see it as the network receives it.";
  $("layers").replaceChildren(Object.assign(document.createElement("p"), {
    className: "muted placeholder",
    textContent: "Draw something: every layer's answer appears here.",
  }));
  state.layout = "";
}

// --- sending: debounced, one request in flight ---

// The drawing or the file changed: send it (prepared again on the server).
export function changed() {
  state.dirty = true;
  schedule();
}

// Only the epoch (or the model) changed: send the same image again.
export function resend() {
  if (state.source) schedule();
}

function schedule() {
  state.pendingSince ??= performance.now();
  if (!state.inFlight && !state.timer) state.timer = setTimeout(send, DEBOUNCE_MS);
}

// The request for the current image: the file or the drawing when it changed (or nothing was answered
// yet), else the last answer's `pixels` (the epoch slider; nothing to prepare again), or a dataset image.
async function request(source) {
  const model = state.model;
  if (source.kind === "dataset") {
    return postLayers({ model: model.id, checkpoint: state.epoch, dataset: { split: source.split, index: source.index } });
  }
  if (!state.dirty && state.result && state.result.model === model.id) {
    return postLayers({ model: model.id, checkpoint: state.epoch, pixels: state.result.pixels });
  }
  state.dirty = false;
  const blob = source.kind === "file" ? source.file : await padBlob();
  return postImage(model.id, blob, source.kind === "file" ? source.file.name : "drawing.png", state.epoch);
}

export async function send() {
  state.timer = null;
  if (state.pendingSince === null || !state.source || !state.model) return;
  const since = state.pendingSince;
  const generation = state.generation;
  const source = state.source;
  state.pendingSince = null;
  state.inFlight = true;
  try {
    const sent = performance.now();
    const response = await request(source);
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
