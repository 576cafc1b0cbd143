// Colours: black is zero; warm colours positive, blue negative.

export function ramp(stops) {
  const lut = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = (i / 255) * (stops.length - 1);
    const k = Math.min(Math.floor(t), stops.length - 2);
    const f = t - k;
    for (let c = 0; c < 3; c++) lut[i * 3 + c] = stops[k][c] + (stops[k + 1][c] - stops[k][c]) * f;
  }
  return lut;
}
export const WARM = ramp([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]);
export const COLD = ramp([[0, 0, 4], [20, 50, 120], [45, 110, 200], [150, 200, 245]]);

export function colour(value, scale, out, at) {
  const t = scale > 0 ? Math.min(Math.abs(value) / scale, 1) : 0;
  const lut = value < 0 ? COLD : WARM;
  const i = Math.round(t * 255) * 3;
  out[at] = lut[i];
  out[at + 1] = lut[i + 1];
  out[at + 2] = lut[i + 2];
  out[at + 3] = 255;
}
