// One answer on the page, and sending the image: debounced, one request in flight.

import { postImage } from "./api.js";
import { drawBars, percent } from "./bars.js";
import { drawInput } from "./maps.js";
import { padBlob } from "./pad.js";
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

export function changed() {
  state.pendingSince ??= performance.now();
  if (!state.inFlight && !state.timer) state.timer = setTimeout(send, DEBOUNCE_MS);
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
    const blob = source.kind === "file" ? source.file : await padBlob();
    const sent = performance.now();
    const response = await postImage(state.model.id, blob, source.kind === "file" ? source.file.name : "drawing.png");
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
