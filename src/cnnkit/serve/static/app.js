// cnnkit serve: the page. It draws what the JSON API returns and computes nothing about the network:
// the server prepares the image (as `cnnkit predict` does) and runs every layer (cnnkit.layer_outputs).
// ES modules, no build step: state, api, colours, arrays, maps, bars, charts, panels, explain, epochs,
// answer, pad, and this one, which picks the model, reads the address, shows the training view and
// starts the page.
//
// The address may name what to show (docs/serve-page.md): ?model=ID picks a model, &test=INDEX (or
// valid=, train=) shows that image of the model's dataset as `cnnkit report` numbers them, and
// &epoch=N the run's checkpoint of epoch N.

import { changed, clearResult, resend, showError } from "./answer.js";
import { historyOf, listModels } from "./api.js";
import { lineChart } from "./charts.js";
import { ACCURACY, TRAINING, VALIDATION } from "./colours.js";
import { loadEpochs } from "./epochs.js";
import { blankPad } from "./pad.js";
import { $, HISTORY_POLL_MS, state } from "./state.js";

const ADDRESS = new URLSearchParams(location.search);

// What the address asks for: {model, dataset: {split, index} | null, epoch: number | null}.
function fromAddress() {
  const whole = (text) => (text !== null && /^\d+$/.test(text) ? Number(text) : null);
  let dataset = null;
  for (const split of ["test", "valid", "train"]) {
    const index = whole(ADDRESS.get(split));
    if (index !== null) dataset = { split, index };
  }
  return { model: ADDRESS.get("model"), dataset, epoch: whole(ADDRESS.get("epoch")) };
}

// --- models ---

function describeModel(model) {
  const classes = model.class_names.length <= 12 ? model.class_names.join(", ") : `${model.class_names.slice(0, 10).join(", ")}, …`;
  const accuracy = model.accuracy === null ? "no validation accuracy recorded" : `validation accuracy ${(100 * model.accuracy).toFixed(1)}%`;
  return `Trained on ${model.dataset ?? "arrays (ConvNN)"}, epoch ${model.epoch} of ${model.epochs}; ${accuracy}. ` +
    `${model.class_names.length} classes: ${classes}. Input ${model.input_shape[1]}×${model.input_shape[2]}` +
    `${model.input_shape[0] === 3 ? " colour" : ""}.`;
}

function chooseModel(model, wanted = {}) {
  state.model = model;
  state.epoch = wanted.epoch ?? null;
  $("model-info").textContent = describeModel(model);
  const digits = model.preprocessing === "digit";
  $("tagline").textContent = `${digits ? "Draw a digit" : "Draw or drop an image"} and watch a trained convolutional network answer, layer by layer.`;
  $("pad-what").textContent = digits ? "Draw a digit here" : "Draw here, or drop an image";
  state.generation += 1;
  state.layout = "";
  state.historyText = "";
  state.result = null; // its maps belong to the previous model
  if (wanted.dataset) {
    state.source = { kind: "dataset", ...wanted.dataset };
    state.hasInk = true;
    clearResult();
    resend();
  } else if (state.source?.kind === "dataset") resend();
  else if (state.source && state.hasInk) changed();
  else clearResult();
  loadEpochs(model);
  if (!$("view-training").hidden) pollHistory();
}

async function loadModels() {
  const listed = await listModels();
  // A model the server could not describe comes with an `error`: listed, but it cannot be chosen.
  state.models = listed.filter((model) => !model.error);
  const picker = $("model-picker");
  picker.replaceChildren(
    ...listed.map((model) => {
      const option = document.createElement("option");
      option.value = model.id;
      if (model.error) {
        option.disabled = true;
        option.textContent = `${model.id} (cannot be used: ${model.error})`;
        return option;
      }
      const accuracy = model.accuracy === null ? "" : `, ${(100 * model.accuracy).toFixed(1)}%`;
      option.textContent = `${model.id} (${model.dataset ?? "arrays"}, epoch ${model.epoch}${accuracy})`;
      return option;
    }),
  );
  picker.addEventListener("change", () => {
    const url = new URL(location.href);
    url.searchParams.set("model", picker.value);
    url.searchParams.delete("epoch");
    history.replaceState(null, "", url);
    chooseModel(state.models.find((m) => m.id === picker.value));
  });
  if (!state.models.length) {
    showError("none of the models served can be used: see the list above and the server's log");
    return;
  }
  const wanted = fromAddress();
  const first = state.models.find((m) => m.id === wanted.model) ?? state.models[0];
  if (wanted.model && first.id !== wanted.model) showError(`no model ${wanted.model} is served here; showing ${first.id}`);
  picker.value = first.id;
  chooseModel(first, wanted);
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
    const response = await historyOf(model.id);
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
    { name: "training loss", colour: TRAINING, points: pick("train_loss") },
    { name: "validation loss", colour: VALIDATION, points: pick("valid_loss") },
  ], { xMax, marker: body.served_epoch });
  lineChart($("chart-accuracy"), [
    { name: "validation accuracy", colour: ACCURACY, points: pick("valid_accuracy") },
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

// --- start ---

blankPad();
clearResult();
loadModels().catch((error) => showError(`could not list the models (${error.message})`));
