// The drawing pad (pointer events: mouse, pen, touch), uploads and drag-and-drop: the file itself is
// sent, as `cnnkit predict` would read it.

import { changed, clearResult } from "./answer.js";
import { bytes } from "./arrays.js";
import { $, state } from "./state.js";

const pad = $("pad");
const ink = pad.getContext("2d");
let drawing = false;
let last = null;

export function blankPad() {
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
  if (state.source?.kind === "dataset") {
    blankPad(); // a dataset image is shown on the pad, but a drawing starts afresh
    state.generation += 1;
    history.replaceState(null, "", location.pathname + (state.model ? `?model=${encodeURIComponent(state.model.id)}` : ""));
  }
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

// A dataset image (its uint8 C x H x W `input`) shown on the pad, light on dark as the network sees it.
export function showOnPad(input) {
  const [c, h, w] = input.shape;
  const q = bytes(input.data);
  const picture = new ImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    for (let k = 0; k < 3; k++) picture.data[i * 4 + k] = q[(c === 3 ? k : 0) * h * w + i];
    picture.data[i * 4 + 3] = 255;
  }
  const small = document.createElement("canvas");
  small.width = w;
  small.height = h;
  small.getContext("2d").putImageData(picture, 0, 0);
  ink.imageSmoothingEnabled = false;
  ink.drawImage(small, 0, 0, pad.width, pad.height);
  ink.imageSmoothingEnabled = true;
  $("pad-hint").hidden = true;
}

export function padBlob() {
  return new Promise((done) => pad.toBlob(done, "image/png"));
}
