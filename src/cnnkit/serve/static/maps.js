// Drawing feature maps, vectors, the prepared input and filters on canvases, one pixel per value.

import { bytes, mapValues, maxAbs } from "./arrays.js";
import { colour } from "./colours.js";

const GAP = 1;

export function gridColumns(count) {
  return count <= 8 ? count : count <= 64 ? 8 : 16;
}

// Draw maps (C, H, W) as a grid on `canvas`, one pixel per value, gaps between maps left transparent.
export function drawMapGrid(canvas, layer) {
  const [count, h, w] = layer.shape;
  drawGrid(canvas, mapValues(layer), count, h, w);
}

// `count` maps (h, w) of `values` as a grid of gridColumns(count) columns, one scale for all.
export function drawGrid(canvas, values, count, h, w) {
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
  canvas.dataset.map = JSON.stringify([h, w]);
}

// Which value of a grid canvas a pointer event falls on: {index (the map), y, x}, or null (a gap).
export function mapAt(canvas, event, count) {
  const box = canvas.getBoundingClientRect();
  const [cw, ch] = JSON.parse(canvas.dataset.cell || "[1,1]");
  const [h, w] = JSON.parse(canvas.dataset.map || "[1,1]");
  const px = ((event.clientX - box.left) / box.width) * canvas.width;
  const py = ((event.clientY - box.top) / box.height) * canvas.height;
  const col = Math.floor(px / cw);
  const row = Math.floor(py / ch);
  const index = row * Number(canvas.dataset.cols || 1) + col;
  const x = Math.floor(px - col * cw);
  const y = Math.floor(py - row * ch);
  if (index < 0 || index >= count || x < 0 || y < 0 || x >= w || y >= h) return null;
  return { index, y, x };
}

// The box (in CSS pixels, relative to the canvas) of value (index, y, x) of a grid canvas; `size`
// values wide and high (the default 1: one value).
export function cellBox(canvas, index, y, x, size = [1, 1]) {
  const box = canvas.getBoundingClientRect();
  const [cw, ch] = JSON.parse(canvas.dataset.cell || "[1,1]");
  const cols = Number(canvas.dataset.cols || 1);
  const sx = box.width / canvas.width;
  const sy = box.height / canvas.height;
  const left = ((index % cols) * cw + x) * sx;
  const top = (Math.floor(index / cols) * ch + y) * sy;
  return { left, top, width: size[1] * sx, height: size[0] * sy };
}

// One map (H, W) of `values` starting at `offset`, on its own canvas; `scale` (default: its own largest
// |value|) is the value drawn brightest, so that maps drawn with one scale compare pixel by pixel.
export function drawOneMap(canvas, values, offset, h, w, scale = undefined) {
  canvas.width = w;
  canvas.height = h;
  const part = values.subarray(offset, offset + h * w);
  scale ??= maxAbs(part);
  const image = new ImageData(w, h);
  for (let i = 0; i < h * w; i++) colour(part[i], scale, image.data, i * 4);
  canvas.getContext("2d").putImageData(image, 0, 0);
}

// A vector as a strip of cells, 64 a row.
export function drawStrip(canvas, values) {
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
  canvas.dataset.cols = cols;
  canvas.dataset.cell = "[1,1]";
  canvas.dataset.map = "[1,1]";
}

// The prepared input (C, H, W) uint8: gray, or RGB for three channels.
export function drawInput(canvas, input) {
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
  canvas.dataset.cols = 1;
  canvas.dataset.cell = JSON.stringify([w + 1, h + 1]);
  canvas.dataset.map = JSON.stringify([h, w]);
}

// A first convolution's filters (F, C, kh, kw) as a grid: for one input channel each kernel in the
// colours of the maps; for three, each kernel as a colour patch (grey is 0, each channel's weight adds
// or takes away its colour).
export function drawFilterGrid(canvas, kernels) {
  const [count, c, kh, kw] = kernels.shape;
  if (c === 1) {
    drawGrid(canvas, kernels.values, count, kh, kw);
    return;
  }
  drawGrid(canvas, new Float32Array(count * kh * kw), count, kh, kw); // the layout, then the colours
  const context = canvas.getContext("2d");
  const image = context.getImageData(0, 0, canvas.width, canvas.height);
  const cols = Number(canvas.dataset.cols);
  const scale = maxAbs(kernels.values) || 1;
  for (let f = 0; f < count; f++) {
    const x0 = (f % cols) * (kw + GAP);
    const y0 = Math.floor(f / cols) * (kh + GAP);
    for (let y = 0; y < kh; y++) {
      for (let x = 0; x < kw; x++) {
        const at = ((y0 + y) * canvas.width + x0 + x) * 4;
        for (let k = 0; k < 3; k++) {
          const v = kernels.values[((f * c + Math.min(k, c - 1)) * kh + y) * kw + x];
          image.data[at + k] = 128 + 127 * (v / scale);
        }
        image.data[at + 3] = 255;
      }
    }
  }
  context.putImageData(image, 0, 0);
}
