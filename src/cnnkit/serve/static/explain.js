// Every number on demand: a click on any value of any layer asks /api/explain how the trained network
// made it from this image (the window under the filter, the weights, their products, the sum, the bias,
// ReLU, the pooling window, a dense unit's largest contributions) and shows the answer step by step.
// Every number shown is the server's (cnnkit.arithmetic); nothing about the network is computed here.

import { postExplain } from "./api.js";
import { mapValues, maxAbs } from "./arrays.js";
import { colour } from "./colours.js";
import { cellBox, drawInput, drawOneMap } from "./maps.js";
import { describeTarget, markTarget } from "./panels.js";
import { $, state } from "./state.js";

let shownFor = null; // the answer (state.result) the explanation shown belongs to
let asked = 0; // requests made: an older answer is dropped

const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};
const fmt = (v, digits = 4) => (v === null || v === undefined ? "–" : Math.abs(v) >= 1000 ? v.toFixed(1) : v.toFixed(digits));
const layerOf = (name) => state.result?.layers.find((l) => l.name === name);

export function openExplain(target) {
  state.target = target;
  $("explain").hidden = false;
  $("explain-close").focus({ preventScroll: true });
  ask();
}

// A new answer came (another epoch, another image): explain the same value in it.
export function refreshExplain() {
  if (!$("explain").hidden && state.target && shownFor !== state.result) ask();
}

export function closeExplain() {
  $("explain").hidden = true;
  markTarget();
}

async function ask() {
  const target = state.target;
  const result = state.result;
  if (!result || !target) return;
  const mine = ++asked;
  const shape = target.layer === "input" ? result.input.shape : layerOf(target.layer)?.shape;
  $("explain-title").textContent = `${describeTarget(target, shape)}, epoch ${result.epoch}`;
  markTarget();
  try {
    const response = await postExplain({ model: result.model, checkpoint: result.epoch, pixels: result.pixels, ...target });
    const body = await response.json();
    if (mine !== asked) return;
    if (!response.ok) {
      $("explain-body").replaceChildren(el("p", "error", body.error || `the server answered ${response.status}`));
      return;
    }
    shownFor = result;
    show(body, result);
    window.cnnkit.explanation = body;
    window.cnnkit.explained += 1;
  } catch (error) {
    if (mine === asked) $("explain-body").replaceChildren(el("p", "error", `no answer from the server (${error.message})`));
  }
}

function show(body, result) {
  const where = el("div", "explain-where");
  const big = bigMap(body);
  if (big) where.append(big);
  const steps = el("div", "explain-steps");
  const forward = [...body.steps].reverse();
  forward.forEach((step, i) => {
    // A module no layer names (the dense layer under dense3's ReLU) is named by the layer it feeds.
    const feeds = forward.slice(i + 1).find((s) => layerOf(s.layer))?.layer ?? body.layer;
    const name = layerOf(step.layer) || step.layer === "input" ? step.layer : `${step.layer}, which feeds ${feeds}`;
    steps.append((STEPS[step.kind] ?? other)({ ...step, name }));
  });
  const target = { layer: body.layer, channel: body.channel, y: body.y ?? 0, x: body.x ?? 0 };
  const last = el("p", "result");
  last.append("= ", el("b", "", fmt(body.value, 5)), `: ${describeTarget(target, body.shape)} at epoch ${body.epoch}, the value you clicked.`);
  steps.append(last);
  $("explain-body").replaceChildren(where, steps);
  $("explain-body").dataset.layer = body.layer;
}

// --- pictures: the clicked map enlarged (click another pixel), a source map with a window outlined ---

function mapFigure(layerName, channel, caption, outline, onPick) {
  const layer = layerName === "input" ? null : layerOf(layerName);
  const figure = el("figure", "where");
  const box = el("div", "canvas-box");
  const canvas = el("canvas", "pixels big");
  if (layerName === "input") {
    drawInput(canvas, state.result.input);
  } else if (layer?.shape.length === 3) {
    const [, h, w] = layer.shape;
    drawOneMap(canvas, mapValues(layer), channel * h * w, h, w);
  } else return null;
  canvas.dataset.cols = "1";
  canvas.dataset.cell = JSON.stringify([canvas.width + 1, canvas.height + 1]);
  canvas.dataset.map = JSON.stringify([canvas.height, canvas.width]);
  box.append(canvas);
  if (outline) {
    const marker = el("span", "marker");
    box.append(marker);
    requestAnimationFrame(() => {
      const [y0, x0, y1, x1] = outline;
      const r = cellBox(canvas, 0, y0, x0, [y1 - y0 + 1, x1 - x0 + 1]);
      Object.assign(marker.style, { left: `${r.left - 2}px`, top: `${r.top - 2}px`, width: `${r.width + 4}px`, height: `${r.height + 4}px` });
    });
  }
  if (onPick) {
    canvas.classList.add("pick");
    canvas.title = "click a pixel to explain it";
    canvas.addEventListener("click", (event) => {
      const box = canvas.getBoundingClientRect();
      const x = Math.floor(((event.clientX - box.left) / box.width) * canvas.width);
      const y = Math.floor(((event.clientY - box.top) / box.height) * canvas.height);
      if (x >= 0 && y >= 0 && x < canvas.width && y < canvas.height) onPick(y, x);
    });
  }
  figure.append(box, el("figcaption", "", caption));
  return figure;
}

function bigMap(body) {
  if (body.y === null) return null;
  const pick = (y, x) => openExplain({ layer: body.layer, channel: body.channel, y, x });
  const what = body.layer === "input" ? "the image as the network receives it" : `${body.layer} map ${body.channel}`;
  return mapFigure(body.layer, body.channel, `${what}; the value explained is outlined. Click another pixel to explain it.`, [body.y, body.x, body.y, body.x], pick);
}

// A window of a named source layer, outlined, its pixels clickable to explain them.
function sourceFigure(source, channel, rows, cols) {
  if (source !== "input" && !(layerOf(source)?.shape.length === 3)) return null;
  const inside = (v, n) => Math.min(Math.max(v, 0), n - 1);
  const [h, w] = source === "input" ? state.result.input.shape.slice(1) : layerOf(source).shape.slice(1);
  const outline = [inside(rows[0], h), inside(cols[0], w), inside(rows[rows.length - 1], h), inside(cols[cols.length - 1], w)];
  const what = source === "input" ? "the input" : `${source} map ${channel}`;
  return mapFigure(source, channel, `The window on ${what}`, outline, (y, x) => openExplain({ layer: source, channel, y, x }));
}

// --- numbers: a matrix as a table coloured like the maps ---

// `grey`: pixels 0..255, drawn as they look; else signed values in the maps' colours.
function grid(matrix, { digits = 2, winner = null, pick = null, title = "", grey = false } = {}) {
  const table = el("table", "grid");
  if (title) table.append(el("caption", "", title));
  const scale = maxAbs(matrix.flat()) || 1;
  const rgb = new Uint8ClampedArray(4);
  matrix.forEach((row, i) => {
    const tr = el("tr");
    row.forEach((v, j) => {
      const td = el("td", "", v === null ? "" : fmt(v, digits));
      if (v !== null) {
        if (grey) rgb.fill(Math.max(0, Math.min(255, Math.round(v))));
        else colour(v, scale, rgb, 0);
        td.style.background = `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
        td.style.color = 0.3 * rgb[0] + 0.59 * rgb[1] + 0.11 * rgb[2] > 140 ? "#000" : "#fff";
        td.title = String(v);
      }
      if (winner && winner[0] === i && winner[1] === j) td.classList.add("winner");
      if (pick && v !== null) {
        td.classList.add("pick");
        td.addEventListener("click", () => pick(i, j));
      }
      tr.append(td);
    });
    table.append(tr);
  });
  return table;
}

function section(title, words) {
  const box = el("section", "calc");
  box.append(el("h3", "", title));
  if (words) box.append(el("p", "small words", words));
  return box;
}

function line(...parts) {
  const p = el("p", "sum");
  p.append(...parts);
  return p;
}

const b = (text) => el("b", "", text);
const span = (text) => `${text[0]}–${text[text.length - 1]}`;

// --- one renderer per kind of step (cnnkit.arithmetic) ---

function conv(step) {
  const box = section(
    `Convolution: ${step.name}, filter ${step.filter} at row ${step.at[1]}, column ${step.at[2]}`,
    "A CNN layer cross-correlates: it lays the filter on its input as it is, not flipped (true convolution, as np.convolve computes it, would flip it first), multiplies each weight by the value under it, adds up the products and adds a bias.",
  );
  box.classList.add("conv");
  const rows = step.rows;
  const cols = step.cols;
  const from = step.source === "input" ? "the input" : step.source;
  box.append(el("p", "small", `The window: rows ${span(rows)}, columns ${span(cols)} of ${from}${rows[0] < 0 || cols[0] < 0 ? " (outside it: padding, 0)" : ""}, ${step.in_channels} channel${step.in_channels > 1 ? "s" : ""}.`));
  const detail = el("div", "channel-detail");
  const pickSource = (k) => (i, j) => {
    const y = rows[i];
    const x = cols[j];
    if (step.source && y >= 0 && x >= 0) openExplain({ layer: step.source, channel: k, y, x });
  };
  const showChannel = (entry) => {
    const parts = [];
    const figure = sourceFigure(step.source, entry.channel, rows, cols);
    if (figure) parts.push(figure);
    if (step.pixels) {
      parts.push(grid(step.pixels[entry.channel], { digits: 0, title: "pixels (0–255)", grey: true }));
      parts.push(el("span", "op", "→"));
    }
    const named = step.source === "input" ? "standardized" : `${step.source}, channel ${entry.channel}`;
    parts.push(grid(entry.window, { title: `window (${named})`, pick: pickSource(entry.channel) }));
    parts.push(el("span", "op", "×"));
    parts.push(grid(entry.weights, { title: `weights (filter ${step.filter}${step.in_channels > 1 ? `, channel ${entry.channel}` : ""})` }));
    parts.push(el("span", "op", "="));
    parts.push(grid(entry.products, { digits: 3, title: "products" }));
    const grids = el("div", "grids");
    grids.append(...parts);
    const count = entry.products.length * entry.products[0].length;
    detail.replaceChildren(grids);
    if (step.in_channels > 1) detail.append(line(`Channel ${entry.channel}: the sum of its ${count} products is `, b(fmt(entry.sum))));
    if (step.pixels) {
      const mean = step.mean[entry.channel];
      const std = step.std[entry.channel];
      detail.prepend(el("p", "small muted", `Each pixel is standardized first: (pixel − ${fmt(mean, 2)}) / ${fmt(std, 2)}, the mean and spread of the training images.`));
    }
  };
  if (step.in_channels > 1) {
    const list = el("div", "channels");
    list.append(el("p", "small", `Filter ${step.filter} has a ${step.kernel[0]}×${step.kernel[1]} grid of weights for each of the ${step.in_channels} channels of ${from}. Each channel's window × weights, summed (largest first; click one to see its numbers):`));
    const scale = Math.max(...step.channels.map((e) => Math.abs(e.sum)), 1e-12);
    const buttons = el("div", "channel-list");
    for (const entry of step.channels) {
      const button = el("button", "channel");
      const bar = el("span", `bar-fill ${entry.sum < 0 ? "neg" : "pos"}`);
      bar.style.width = `${(Math.abs(entry.sum) / scale) * 100}%`;
      const track = el("span", "bar-track");
      track.append(bar);
      button.append(el("span", "", `ch ${entry.channel}`), track, el("span", "", fmt(entry.sum, 3)));
      button.addEventListener("click", () => {
        for (const other of buttons.children) other.classList.toggle("selected", other === button);
        showChannel(entry);
      });
      buttons.append(button);
    }
    buttons.firstChild?.classList.add("selected");
    list.append(buttons);
    if (step.channels.length < step.in_channels) list.append(el("p", "small muted", `${step.in_channels - step.channels.length} more channels add smaller sums.`));
    box.append(list, detail);
  } else box.append(detail);
  showChannel(step.channels[0]);
  box.append(
    line(
      step.in_channels > 1 ? `All ${step.in_channels} channels' sums added: ` : `Sum of the ${step.kernel[0] * step.kernel[1]} products: `,
      b(fmt(step.sum)),
      ...(step.has_bias ? [" + bias ", b(fmt(step.bias))] : [" (this convolution has no bias)"]),
      " = ",
      b(fmt(step.value)),
    ),
    el("p", "small muted", `cnnkit.ops.conv2d_multi on this window gives ${fmt(step.value, 6)}; the network computed ${fmt(step.network_value, 6)} (float32).`),
  );
  return box;
}

function relu(step) {
  const box = section(`ReLU: ${step.name}`, step.input < 0 ? "A negative value becomes 0; a positive one passes unchanged." : "A positive value passes unchanged (a negative one would become 0).");
  box.append(line("max(0, ", b(fmt(step.input)), ") = ", b(fmt(step.value))));
  return box;
}

function maxpool(step) {
  const [c] = step.at;
  const box = section(
    `Max-pooling ${step.size[0]}×${step.size[1]}, stride ${step.stride[0]}: ${step.name}`,
    `The largest of ${step.source}'s values in rows ${span(step.rows)}, columns ${span(step.cols)} of map ${c}; the steps above made the winner, at row ${step.winner[1]}, column ${step.winner[2]}.`,
  );
  const grids = el("div", "grids");
  const figure = sourceFigure(step.source, c, step.rows, step.cols);
  if (figure) grids.append(figure);
  const winner = [step.rows.indexOf(step.winner[1]), step.cols.indexOf(step.winner[2])];
  grids.append(grid(step.window, { digits: 3, winner, title: `${step.source}, map ${c}`, pick: (i, j) => openExplain({ layer: step.source, channel: c, y: step.rows[i], x: step.cols[j] }) }));
  box.append(grids, line("max = ", b(fmt(step.value))));
  return box;
}

function batchnorm(step) {
  const box = section(`Batch norm: ${step.name}`, "The value is shifted and scaled by statistics fixed in training (the running mean and variance of this channel), then by a learned scale and shift.");
  box.append(line("(", b(fmt(step.input)), ` − ${fmt(step.mean)}) / √(${fmt(step.var)} + ${step.eps}) × ${fmt(step.scale)} + ${fmt(step.shift)} = `, b(fmt(step.value))));
  return box;
}

function dense(step) {
  const box = section(
    `Dense layer: ${step.name}, unit ${step.unit}`,
    `Each of the ${step.inputs.toLocaleString()} inputs (from ${step.source}) is multiplied by its own weight; the products are added up, plus a bias. The largest contributions:`,
  );
  const table = el("table", "contributions small");
  table.append(Object.assign(el("tr"), { innerHTML: "<th>input</th><th>value</th><th>× weight</th><th>= product</th><th></th>" }));
  const scale = Math.max(...step.top.map((t) => Math.abs(t.product)), 1e-12);
  for (const t of step.top) {
    const tr = el("tr");
    const where = t.from.length === 3 ? `${step.source} map ${t.from[0]} (${t.from[1]}, ${t.from[2]})` : `${step.source} ${t.from[0]}`;
    const name = el("td", "", where);
    const target = t.from.length === 3 ? { layer: step.source, channel: t.from[0], y: t.from[1], x: t.from[2] } : { layer: step.source, channel: t.from[0], y: 0, x: 0 };
    if (layerOf(step.source)) {
      name.classList.add("pick");
      name.title = "click to explain this input";
      name.addEventListener("click", () => openExplain(target));
    }
    const bar = el("span", `bar-fill ${t.product < 0 ? "neg" : "pos"}`);
    bar.style.width = `${(Math.abs(t.product) / scale) * 100}%`;
    const track = el("span", "bar-track");
    track.append(bar);
    const cell = el("td");
    cell.append(track);
    tr.append(name, el("td", "", fmt(t.input, 3)), el("td", "", fmt(t.weight, 4)), el("td", "", fmt(t.product, 4)), cell);
    table.append(tr);
  }
  box.append(
    table,
    el("p", "small", `The other ${step.rest_count.toLocaleString()} products add up to ${fmt(step.rest_sum)}${step.zero_inputs ? ` (${step.zero_inputs.toLocaleString()} inputs are 0 and add nothing)` : ""}. All positive products: +${fmt(step.positive_sum, 3)}; all negative: ${fmt(step.negative_sum, 3)}.`),
    line("Sum: ", b(fmt(step.sum)), " + bias ", b(fmt(step.bias)), " = ", b(fmt(step.computed))),
  );
  return box;
}

function softmax(step) {
  const names = state.model.class_names;
  const box = section("Softmax: scores to probabilities", "Each class's score minus the largest, exponentiated, divided by their total: the probabilities are positive and add up to 1.");
  const table = el("table", "contributions small");
  table.append(Object.assign(el("tr"), { innerHTML: `<th>class</th><th>score</th><th>e^(score − ${fmt(step.max, 2)})</th><th>÷ ${fmt(step.total, 4)}</th>` }));
  step.logits.forEach((z, i) => {
    const tr = el("tr", i === step.at[0] ? "winner" : "");
    tr.append(el("td", "", names[i] ?? String(i)), el("td", "", fmt(z, 3)), el("td", "", fmt(step.exps[i], 5)), el("td", "", fmt(step.exps[i] / step.total, 5)));
    table.append(tr);
  });
  box.append(table, line(`${names[step.at[0]]}: `, b(fmt(step.exps[step.at[0]], 5)), ` / ${fmt(step.total, 5)} = `, b(fmt(step.value, 5))));
  return box;
}

function average(step) {
  const box = section(`Global average pooling: ${step.name}`, `The mean of all ${step.count} values of ${step.source}'s map ${step.at[0]}.`);
  if (step.window) box.append(grid(step.window, { digits: 2, title: `${step.source}, map ${step.at[0]}` }));
  box.append(line("sum ", b(fmt(step.sum)), ` / ${step.count} = `, b(fmt(step.computed))));
  return box;
}

function add(step) {
  const box = section(`Residual sum: ${step.name}`, "A residual block adds its input to what its own layers made of it: x + f(x).");
  box.append(line(b(fmt(step.terms[0].value)), ` (${step.terms[0].from}) + `, b(fmt(step.terms[1].value)), ` (${step.terms[1].from}) = `, b(fmt(step.computed))));
  return box;
}

function standardize(step) {
  const box = section("Standardize the pixel", "The network reads each pixel standardized with the mean and spread of its training images.");
  box.append(line("(", b(fmt(step.pixel, 2)), ` − ${fmt(step.mean, 3)}) / ${fmt(step.std, 3)} = `, b(fmt(step.computed))));
  return box;
}

function other(step) {
  const box = section(`${step.name} (${step.module})`, "Computed by a kind of layer this page does not take apart.");
  box.append(line("value ", b(fmt(step.value))));
  return box;
}

const STEPS = { conv, relu, maxpool, batchnorm, dense, softmax, average, add, standardize, other };

$("explain-close").addEventListener("click", closeExplain);
$("explain").addEventListener("click", (event) => {
  if (event.target === $("explain")) closeExplain();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !$("explain").hidden) closeExplain();
});
$("input-view").addEventListener("click", (event) => {
  const canvas = $("input-view");
  if (!state.result) return;
  const box = canvas.getBoundingClientRect();
  const x = Math.floor(((event.clientX - box.left) / box.width) * canvas.width);
  const y = Math.floor(((event.clientY - box.top) / box.height) * canvas.height);
  if (x >= 0 && y >= 0 && x < canvas.width && y < canvas.height) openExplain({ layer: "input", channel: 0, y, x });
});
