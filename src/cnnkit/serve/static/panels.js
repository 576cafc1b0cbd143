// The layer panels, stage by stage, and the enlarged map with the filter that made it.

import { getFilters } from "./api.js";
import { mapValues, maxAbs } from "./arrays.js";
import { drawBars, drawScores } from "./bars.js";
import { drawKernels, drawMapGrid, drawOneMap, drawStrip, mapAt } from "./maps.js";
import { $, state } from "./state.js";

export const STAGES = [
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

export function shapeText(shape) {
  if (shape.length === 3) return `${shape[0]} maps of ${shape[1]}×${shape[2]}`;
  return `${shape[0]} numbers`;
}

export function buildPanels(layers) {
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

export function drawPanels(result) {
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

function figure(caption, canvas, extra) {
  const box = document.createElement("figure");
  const text = document.createElement("figcaption");
  text.textContent = caption;
  box.append(canvas);
  if (extra) box.append(extra);
  box.append(text);
  return box;
}

export async function openZoom(stage, index) {
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
  // One colour scale for the three maps, so that a value ReLU and pooling keep keeps its colour.
  const present = names.map((name) => byName[name]).filter(Boolean);
  const scale = Math.max(...present.map((layer) => {
    const [, h, w] = layer.shape;
    return maxAbs(mapValues(layer).subarray(index * h * w, (index + 1) * h * w));
  }));
  names.forEach((name, k) => {
    const layer = byName[name];
    if (!layer) return;
    const [, h, w] = layer.shape;
    const canvas = document.createElement("canvas");
    canvas.className = "pixels big";
    canvas.dataset.scale = String(scale);
    drawOneMap(canvas, mapValues(layer), index * h * w, h, w, scale);
    parts.push(figure(`${captions[k]}, ${h}×${w}`, canvas));
  });
  parts.push(Object.assign(document.createElement("p"), {
    className: "small muted",
    textContent: `The three maps share one colour scale: black is 0, the brightest orange ${scale.toFixed(2)}, the brightest blue −${scale.toFixed(2)}.`,
  }));
  body.replaceChildren(...parts);
}

export function closeZoom() {
  $("zoom").hidden = true;
}
$("zoom-close").addEventListener("click", closeZoom);
$("zoom").addEventListener("click", (event) => {
  if (event.target === $("zoom")) closeZoom();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeZoom();
});
