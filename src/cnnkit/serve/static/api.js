// The JSON API, as the page uses it.

import { bytes } from "./arrays.js";
import { state } from "./state.js";

export async function postImage(modelId, blob, name) {
  const form = new FormData();
  form.append("file", blob, name);
  return fetch(`/api/activations?model=${encodeURIComponent(modelId)}`, { method: "POST", body: form });
}

export async function listModels() {
  const response = await fetch("/api/models");
  return response.json();
}

export function historyOf(modelId) {
  return fetch(`/api/models/${encodeURIComponent(modelId)}/history`);
}

export function getFilters(model) {
  if (!state.filters.has(model.id)) {
    const promise = fetch(`/api/models/${encodeURIComponent(model.id)}/filters`)
      .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`status ${response.status}`))))
      .then((body) => {
        const out = {};
        for (const [name, entry] of Object.entries(body)) {
          out[name] = { shape: entry.shape, values: new Float32Array(bytes(entry.data).buffer) };
        }
        return out;
      });
    promise.catch(() => state.filters.delete(model.id));
    state.filters.set(model.id, promise);
  }
  return state.filters.get(model.id);
}
