// The epoch slider: the run's kept checkpoints, the same image seen through each (every layer, the
// filters, the probabilities, the explanation open), and the learning curve marking the epoch shown.

import { resend } from "./answer.js";
import { checkpointsOf, historyOf } from "./api.js";
import { lineChart } from "./charts.js";
import { TRAINING, VALIDATION } from "./colours.js";
import { $, state } from "./state.js";

const sliders = () => [$("epoch"), $("explain-epoch")];

// The epochs the model's run keeps, and its history. An epoch asked for (the address's) that the run
// does not keep falls back to the checkpoint served.
export async function loadEpochs(model) {
  state.epochs = [model.epoch];
  state.history = null;
  try {
    const [kept, history] = await Promise.all([checkpointsOf(model.id), historyOf(model.id).then((r) => (r.ok ? r.json() : null))]);
    if (model !== state.model) return;
    state.epochs = kept.epochs.length ? kept.epochs : [model.epoch];
    state.history = history;
  } catch {
    // the slider stays on the served checkpoint alone
  }
  if (model !== state.model) return;
  if (state.epoch !== null && !state.epochs.includes(state.epoch)) {
    state.epoch = null;
    resend();
  }
  showEpoch();
}

// The epoch shown: the last answer's, else the one asked for, else the served one.
function shownEpoch() {
  return state.result?.epoch ?? state.epoch ?? state.model?.epoch;
}

export function showEpoch() {
  if (!state.model) return;
  const epoch = state.epoch ?? state.model.epoch;
  const index = Math.max(0, state.epochs.indexOf(epoch));
  const many = state.epochs.length > 1;
  for (const slider of sliders()) {
    slider.max = String(Math.max(0, state.epochs.length - 1));
    slider.value = String(index);
    slider.disabled = !many;
  }
  const kept = many ? `${state.epochs.length} checkpoints kept` : "the only checkpoint kept (train with --keep 0 to keep every epoch)";
  const entry = state.history?.history.find((e) => e.epoch === epoch);
  const accuracy = entry?.valid_accuracy != null ? ` · validation accuracy ${(100 * entry.valid_accuracy).toFixed(1)}%` : "";
  const text = `${epoch} of ${state.model.epochs}${accuracy} · ${kept}`;
  $("epoch-label").textContent = text;
  $("explain-epoch-label").textContent = `${epoch}: the same image through the network as it was after epoch ${epoch}`;
  $("explain-epochs").hidden = !many;
  drawCurve(shownEpoch());
}

function drawCurve(epoch) {
  const canvas = $("epoch-chart");
  const box = canvas.getBoundingClientRect();
  if (box.width > 0 && Math.round(box.width) !== canvas.width) canvas.width = Math.round(box.width);
  const h = state.history?.history || [];
  const pick = (key) => h.filter((e) => e[key] !== null).map((e) => [e.epoch, e[key]]);
  const xMax = Math.max(state.history?.epochs || 1, h.length ? h[h.length - 1].epoch : 1);
  lineChart(canvas, [
    { name: "training loss", colour: TRAINING, points: pick("train_loss") },
    { name: "validation loss", colour: VALIDATION, points: pick("valid_loss") },
  ], { xMax, marker: epoch, compact: true, marks: state.epochs });
  canvas.dataset.marker = String(epoch);
}

function moved(event) {
  const epoch = state.epochs[Number(event.target.value)];
  if (epoch === undefined || epoch === (state.epoch ?? state.model.epoch)) return;
  state.epoch = epoch;
  const url = new URL(location.href);
  url.searchParams.set("epoch", String(epoch));
  history.replaceState(null, "", url);
  showEpoch();
  resend();
}

for (const slider of sliders()) slider.addEventListener("input", moved);
window.addEventListener("resize", () => drawCurve(shownEpoch()));
