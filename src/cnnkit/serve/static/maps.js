// Drawing feature maps, vectors, the prepared input and filters on canvases, one pixel per value.

import { bytes, mapValues, maxAbs } from "./arrays.js";
import { colour } from "./colours.js";

const GAP = 1;

export function gridColumns(count) {
  return count <= 8 ? count : count <= 32 ? 8 : 16;
}

// Draw maps (C, H, W) as a grid on `canvas`, one pixel per value, gaps between maps left transparent.
export function drawMapGrid(canvas, layer) {
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
export function mapAt(canvas, event, count) {
  const box = canvas.getBoundingClientRect();
  const [cw, ch] = JSON.parse(canvas.dataset.cell || "[1,1]");
  const x = ((event.clientX - box.left) / box.width) * canvas.width;
  const y = ((event.clientY - box.top) / box.height) * canvas.height;
  const index = Math.floor(y / ch) * Number(canvas.dataset.cols) + Math.floor(x / cw);
  return index >= 0 && index < count ? index : -1;
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
}

// Filter `index`: its C kernels (k x k) side by side; a single kernel with its weights written in.
export function drawKernels(kernels, index) {
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
