// Colours: cnnkit's one palette, mirrored from src/cnnkit/viz/style.py (the report and cnnkit.plots draw
// with the same values; tests/test_plots.py checks that this file and style.py agree).
//
// A layer's values on one scale per layer: black is 0; values >= 0 (after ReLU, after pooling) run along
// magma to pale yellow at the scale (sequential); negative values (convolutions before ReLU, filters) along
// a blue ramp of the same lightness (so signed maps read as a diverging map whose positive half is magma).

export const POSITIVE_STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
export const NEGATIVE_STOPS = [[0, 0, 4], [18, 44, 118], [30, 104, 200], [95, 172, 240], [200, 230, 255]];

// Lines: the same quantity in the same colour on the page and in the report.
export const TRAINING = "#e07b00";
export const VALIDATION = "#2b6cb0";
export const ACCURACY = "#2f855a";
export const LEARNING_RATE = "#6b46c1";

// Right and wrong answers.
export const RIGHT = "#146e28";
export const WRONG = "#b41e1e";

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
export const WARM = ramp(POSITIVE_STOPS);
export const COLD = ramp(NEGATIVE_STOPS);

export function colour(value, scale, out, at) {
  const t = scale > 0 ? Math.min(Math.abs(value) / scale, 1) : 0;
  const lut = value < 0 ? COLD : WARM;
  const i = Math.round(t * 255) * 3;
  out[at] = lut[i];
  out[at + 1] = lut[i + 1];
  out[at + 2] = lut[i + 2];
  out[at + 3] = 255;
}
