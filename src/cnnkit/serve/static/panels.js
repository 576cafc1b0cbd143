// The layer panels: every layer the API returns, grouped by the network's stages (/api/models), in rows
// sized so that all of them fit the window beside the pad; a click on any value explains it.

import { getFilters } from "./api.js";
import { mapValues } from "./arrays.js";
import { drawBars, drawScores } from "./bars.js";
import { openExplain } from "./explain.js";
import { cellBox, drawFilterGrid, drawMapGrid, drawStrip, mapAt } from "./maps.js";
import { $, state } from "./state.js";

const PHONE = window.matchMedia("(max-width: 699px)");
const WIDE = window.matchMedia("(min-width: 1000px)");

export function shapeText(shape) {
  if (shape.length === 3) return `${shape[0]} maps of ${shape[1]}×${shape[2]}`;
  return `${shape[0]} numbers`;
}

// The rows of panels: the network's stages in order (each stage's convolution filters first when they
// look at the image itself), then the layers no stage names; stages that fit share a row.
export function panelRows(layers, stages, filters) {
  const shown = layers.filter((l) => l.name !== "input");
  const byName = new Set(shown.map((l) => l.name));
  const groups = [];
  const grouped = new Set();
  for (const stage of stages || []) {
    const names = stage.layers.filter((n) => byName.has(n));
    if (!names.length) continue;
    const items = [];
    for (const n of names) {
      if (filters.includes(n)) items.push({ kind: "filters", name: n });
      items.push({ kind: "layer", name: n });
    }
    groups.push({ title: stage.title, items });
    names.forEach((n) => grouped.add(n));
  }
  const rest = shown.filter((l) => !grouped.has(l.name)).map((l) => ({ kind: "layer", name: l.name }));
  for (let i = 0; i < rest.length; i += 3) groups.push({ title: i ? "" : "Output", items: rest.slice(i, i + 3) });
  const columns = Math.max(3, ...groups.map((g) => g.items.length));
  const rows = [];
  for (const group of groups) {
    const last = rows[rows.length - 1];
    if (last && last.items.length + group.items.length <= columns) {
      last.titles.push(group.title);
      last.items.push(...group.items);
    } else rows.push({ titles: [group.title], items: [...group.items] });
  }
  return { rows, columns };
}

function isScores(layer, names) {
  return layer.shape.length === 1 && layer.shape[0] === names.length;
}

export function buildPanels(result) {
  const byName = Object.fromEntries(result.layers.map((l) => [l.name, l]));
  const names = state.model.class_names;
  const first = result.layers.find((l) => l.shape.length === 3 && l.name !== "input");
  // Filters are shown for the convolutions that look at the image itself (3 channels or fewer).
  const filterNames = result.input.shape[0] <= 3 && first ? [first.name] : [];
  const { rows, columns } = panelRows(result.layers, state.model.stages, filterNames);
  const root = $("layers");
  root.replaceChildren();
  root.style.setProperty("--columns", columns);
  for (const row of rows) {
    const box = document.createElement("div");
    box.className = "layer-row";
    for (const item of row.items) {
      const layer = byName[item.name];
      const panel = document.createElement("figure");
      panel.className = "panel";
      const head = document.createElement("figcaption");
      head.innerHTML = `<b></b> <span class="shape"></span>`;
      if (item.kind === "filters") {
        panel.dataset.filters = item.name;
        head.querySelector("b").textContent = `${item.name} filters`;
        head.querySelector(".shape").textContent = `${layer.shape[0]}`;
        head.title = `The ${layer.shape[0]} filters (learned weights) that make ${item.name}'s maps: click one to see it at work`;
        const canvas = document.createElement("canvas");
        canvas.className = "pixels maps";
        canvas.addEventListener("click", (event) => clickFilter(canvas, event, item.name));
        panel.append(head, canvas);
      } else {
        panel.dataset.layer = item.name;
        head.querySelector("b").textContent = item.name;
        head.querySelector(".shape").textContent = shapeText(layer.shape);
        head.title = layer.description;
        panel.append(head);
        if (isScores(layer, names)) {
          const bars = document.createElement("div");
          bars.className = "bars compact";
          bars.addEventListener("click", (event) => {
            const row = event.target.closest(".bar");
            if (row) openExplain({ layer: item.name, channel: names.indexOf(row.dataset.class), y: 0, x: 0 });
          });
          panel.append(bars);
        } else {
          const wrap = document.createElement("div");
          wrap.className = "canvas-box";
          const canvas = document.createElement("canvas");
          canvas.className = "pixels " + (layer.shape.length === 3 ? "maps" : "strip");
          const marker = document.createElement("span");
          marker.className = "marker";
          marker.hidden = true;
          wrap.append(canvas, marker);
          canvas.addEventListener("click", (event) => clickValue(canvas, event, item.name));
          canvas.addEventListener("mousemove", (event) => hover(canvas, event, item.name));
          panel.append(wrap);
        }
      }
      box.append(panel);
    }
    root.append(box);
  }
}

function valueAt(layer, index, y, x) {
  if (layer.shape.length === 3) {
    const [, h, w] = layer.shape;
    return mapValues(layer)[index * h * w + y * w + x];
  }
  return layer.values[index];
}

function targetAt(canvas, event, name) {
  const layer = state.result?.layers.find((l) => l.name === name);
  if (!layer) return null;
  const at = mapAt(canvas, event, layer.shape[0]);
  if (!at) return null;
  return layer.shape.length === 3 ? { layer: name, channel: at.index, y: at.y, x: at.x } : { layer: name, channel: at.index, y: 0, x: 0 };
}

export function describeTarget(target, shape) {
  if (target.layer === "input") return `input pixel (row ${target.y}, column ${target.x})`;
  if (shape && shape.length === 1) return `${target.layer} unit ${target.channel}`;
  return `${target.layer} map ${target.channel}, row ${target.y}, column ${target.x}`;
}

function hover(canvas, event, name) {
  const target = targetAt(canvas, event, name);
  if (!target) {
    canvas.title = "";
    return;
  }
  const layer = state.result.layers.find((l) => l.name === name);
  const value = valueAt(layer, target.channel, target.y, target.x);
  canvas.title = `${describeTarget(target, layer.shape)}: ${value?.toFixed(3)}. Click to see how it was computed.`;
}

function clickValue(canvas, event, name) {
  const target = targetAt(canvas, event, name);
  if (target) openExplain(target);
}

// A filter: its map's strongest answer (the largest |value|), explained.
function clickFilter(canvas, event, name) {
  const layer = state.result?.layers.find((l) => l.name === name);
  if (!layer) return;
  const at = mapAt(canvas, event, layer.shape[0]);
  if (!at) return;
  const [, h, w] = layer.shape;
  const values = mapValues(layer);
  let best = 0;
  for (let i = 1; i < h * w; i++) if (Math.abs(values[at.index * h * w + i]) > Math.abs(values[at.index * h * w + best])) best = i;
  openExplain({ layer: name, channel: at.index, y: Math.floor(best / w), x: best % w });
}

export function drawPanels(result) {
  const layout = result.layers.map((l) => `${l.name}:${l.shape}`).join(" ") + JSON.stringify(state.model.stages);
  if (layout !== state.layout) {
    buildPanels(result);
    state.layout = layout;
  }
  const names = state.model.class_names;
  for (const layer of result.layers) {
    const panel = document.querySelector(`.panel[data-layer="${layer.name}"]`);
    if (!panel) continue;
    if (isScores(layer, names)) {
      const probabilities = layer.values.every((v) => v >= 0) && Math.abs(layer.values.reduce((a, b) => a + b, 0) - 1) < 1e-3;
      if (probabilities) drawBars(panel.querySelector(".bars"), Object.fromEntries(names.map((n, i) => [n, layer.values[i]])), result.class_name);
      else drawScores(panel.querySelector(".bars"), names, layer.values);
    } else if (layer.shape.length === 3) drawMapGrid(panel.querySelector("canvas"), layer);
    else drawStrip(panel.querySelector("canvas"), layer.values);
    panel.dataset.rendered = "1";
  }
  drawFilterPanels();
  fitPanels();
  markTarget();
}

async function drawFilterPanels() {
  const panels = document.querySelectorAll(".panel[data-filters]");
  if (!panels.length) return;
  const model = state.model;
  const epoch = state.epoch;
  try {
    const kernels = await getFilters(model, epoch);
    if (model !== state.model || epoch !== state.epoch) return;
    for (const panel of panels) {
      const found = kernels[panel.dataset.filters];
      if (!found) continue;
      drawFilterGrid(panel.querySelector("canvas"), found);
      panel.dataset.rendered = "1";
      panel.dataset.epoch = String(epoch ?? "");
    }
    fitPanels();
  } catch {
    for (const panel of panels) panel.querySelector("figcaption").title = "could not load the filters";
  }
}

// Size every panel's canvas so that, on a wide screen, all rows fit the window below the layers' top:
// each canvas as wide as its column, or less where the rows would not fit, keeping its proportions.
export function fitPanels() {
  const root = $("layers");
  const canvases = [...root.querySelectorAll(".panel canvas")];
  if (!canvases.length) return;
  const rows = [...root.querySelectorAll(".layer-row")];
  const columns = Number(getComputedStyle(root).getPropertyValue("--columns")) || 3;
  const gap = 10;
  const rowWidth = root.clientWidth;
  const perRow = PHONE.matches ? Math.min(2, columns) : columns;
  const columnWidth = (rowWidth - gap * (perRow - 1)) / perRow;
  const natural = (canvas) => [canvas.width || 1, canvas.height || 1];
  let cap = PHONE.matches ? 220 : 400;
  if (WIDE.matches) {
    const top = root.getBoundingClientRect().top + window.scrollY;
    const available = window.innerHeight - top - 12;
    const fixed = rows.map((row) => {
      const captions = Math.max(...[...row.querySelectorAll("figcaption")].map((c) => c.offsetHeight), 0);
      const bars = Math.max(...[...row.querySelectorAll(".bars")].map((b) => b.offsetHeight), 0);
      return { captions, bars, row };
    });
    const total = (limit) =>
      fixed.reduce((sum, { captions, bars, row }) => {
        const heights = [...row.querySelectorAll("canvas")].map((c) => {
          const [w, h] = natural(c);
          return Math.min(limit, (columnWidth * h) / w);
        });
        return sum + captions + Math.max(bars, ...heights, 0) + gap;
      }, 0);
    let lo = 24;
    let hi = cap;
    if (total(hi) > available) {
      for (let i = 0; i < 20; i++) {
        const mid = (lo + hi) / 2;
        if (total(mid) > available) hi = mid;
        else lo = mid;
      }
      cap = lo;
    }
  }
  for (const canvas of canvases) {
    const [w, h] = natural(canvas);
    const width = Math.min(columnWidth, (cap * w) / h);
    canvas.style.width = `${Math.floor(width)}px`;
    canvas.style.height = `${Math.floor((width * h) / w)}px`;
  }
  markTarget();
}

// Outline the value being explained on its panel.
export function markTarget() {
  for (const marker of document.querySelectorAll("#layers .marker")) marker.hidden = true;
  const target = state.target;
  if (!target || $("explain").hidden) return;
  const panel = document.querySelector(`.panel[data-layer="${target.layer}"]`);
  const canvas = panel?.querySelector("canvas");
  if (!canvas) return;
  const box = cellBox(canvas, target.channel, target.y, target.x);
  const marker = panel.querySelector(".marker");
  Object.assign(marker.style, {
    left: `${box.left - 2}px`,
    top: `${box.top - 2}px`,
    width: `${Math.max(box.width, 2) + 4}px`,
    height: `${Math.max(box.height, 2) + 4}px`,
  });
  marker.hidden = false;
}

window.addEventListener("resize", () => fitPanels());
