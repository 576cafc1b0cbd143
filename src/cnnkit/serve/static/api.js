// The JSON API, as the page uses it.

import { bytes } from "./arrays.js";
import { state } from "./state.js";

const query = (params) =>
  Object.entries(params)
    .filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${k}=${encodeURIComponent(v)}`)
    .join("&");

// An uploaded or drawn image, prepared on the server as `cnnkit predict` does; `epoch`: that checkpoint.
export async function postImage(modelId, blob, name, epoch) {
  const form = new FormData();
  form.append("file", blob, name);
  return fetch(`/api/activations?${query({ model: modelId, checkpoint: epoch })}`, { method: "POST", body: form });
}

function postJson(path, body) {
  return fetch(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
}

// Every layer for an image given as `pixels` (an earlier answer's) or `dataset` ({split, index}).
export function postLayers(body) {
  return postJson("/api/layers", body);
}

// The arithmetic behind one value: {layer, channel, y, x} and the image as for postLayers.
export function postExplain(body) {
  return postJson("/api/explain", body);
}

export async function listModels() {
  const response = await fetch("/api/models");
  return response.json();
}

export function historyOf(modelId) {
  return fetch(`/api/models/${encodeURIComponent(modelId)}/history`);
}

export async function checkpointsOf(modelId) {
  const response = await fetch(`/api/models/${encodeURIComponent(modelId)}/checkpoints`);
  if (!response.ok) throw new Error((await response.json()).error || `status ${response.status}`);
  return response.json();
}

export function getFilters(model, epoch) {
  const key = `${model.id}@${epoch ?? ""}`;
  if (!state.filters.has(key)) {
    const promise = fetch(`/api/models/${encodeURIComponent(model.id)}/filters?${query({ checkpoint: epoch })}`)
      .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`status ${response.status}`))))
      .then((body) => {
        const out = {};
        for (const [name, entry] of Object.entries(body)) {
          out[name] = { shape: entry.shape, values: new Float32Array(bytes(entry.data).buffer) };
        }
        return out;
      });
    promise.catch(() => state.filters.delete(key));
    state.filters.set(key, promise);
  }
  return state.filters.get(key);
}
