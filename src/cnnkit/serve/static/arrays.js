// Decoding the API's compact arrays.

export function bytes(b64) {
  const text = atob(b64);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

// A layer of maps (C, H, W) as Float32Array values: min + byte / 255 * (max - min), per map.
export function mapValues(layer) {
  if (layer._values) return layer._values;
  const q = bytes(layer.data);
  const size = layer.shape[1] * layer.shape[2];
  const values = new Float32Array(q.length);
  for (let m = 0; m < layer.shape[0]; m++) {
    const lo = layer.min[m] ?? 0;
    const step = ((layer.max[m] ?? 0) - lo) / 255;
    for (let i = m * size; i < (m + 1) * size; i++) values[i] = lo + q[i] * step;
  }
  layer._values = values;
  return values;
}

export function maxAbs(values) {
  let m = 0;
  for (const v of values) m = Math.max(m, Math.abs(v));
  return m;
}
