// Line charts of the learning curves, on a canvas.

// Round tick values between lo and hi, about `count` of them; `ticks.digits` decimals show them exactly.
export function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const step = 10 ** Math.floor(Math.log10(span / count));
  const best = [1, 2, 5, 10].map((m) => m * step).find((s) => span / s <= count) || step * 10;
  const ticks = [];
  for (let k = Math.ceil(lo / best - 1e-9); k * best <= hi + 1e-9; k++) ticks.push(k * best);
  ticks.digits = Math.max(0, -Math.floor(Math.log10(best) + 1e-9));
  return ticks;
}

// `compact`: a small chart (the epoch slider's): small type, no axis title, the legend on one line.
// `marks`: epochs to tick on the axis (the checkpoints kept); `marker`: the epoch shown, a dashed line.
export function lineChart(canvas, series, { xMax, marker, percent: asPercent, compact = false, marks = [] }) {
  const context = canvas.getContext("2d");
  const W = canvas.width;
  const H = canvas.height;
  const pad = compact ? { left: 34, right: 8, top: 14, bottom: 14 } : { left: 56, right: 16, top: 28, bottom: 36 };
  const font = compact ? "10px sans-serif" : "12px sans-serif";
  context.clearRect(0, 0, W, H);
  const ys = series.flatMap((s) => s.points.map((p) => p[1]));
  if (!ys.length) {
    context.fillStyle = "#888";
    context.font = "14px sans-serif";
    context.fillText("no epoch finished yet", pad.left, H / 2);
    return;
  }
  let lo = Math.min(...ys);
  let hi = Math.max(...ys);
  if (asPercent) hi = Math.min(1, hi + 0.02);
  if (!asPercent) lo = Math.min(0, lo);
  if (hi - lo < 1e-9) hi = lo + 1;
  const x = (v) => pad.left + ((v - 0) / Math.max(xMax, 1)) * (W - pad.left - pad.right);
  // The lowest tick at or below the lowest value, so that the axis's bottom is labelled.
  const ticks = niceTicks(lo, hi, compact ? 2 : 5);
  if (ticks.length > 1 && ticks[0] > lo + 1e-12) {
    lo = ticks[0] - (ticks[1] - ticks[0]);
    ticks.unshift(lo);
  }
  canvas.dataset.lowestTick = String(ticks[0]); // for tests: the bottom of the axis is labelled
  canvas.dataset.lowestValue = String(Math.min(...ys));
  const y = (v) => H - pad.bottom - ((v - lo) / (hi - lo)) * (H - pad.top - pad.bottom);
  context.font = font;
  context.strokeStyle = "#ddd";
  context.fillStyle = "#555";
  context.textAlign = "right";
  context.textBaseline = "middle";
  for (const t of ticks) {
    context.beginPath();
    context.moveTo(pad.left, y(t));
    context.lineTo(W - pad.right, y(t));
    context.stroke();
    const label = asPercent ? `${(100 * t).toFixed(Math.max(0, ticks.digits - 2))}%` : t.toFixed(ticks.digits);
    context.fillText(label, pad.left - 6, y(t));
  }
  context.textAlign = "center";
  context.textBaseline = "top";
  if (compact) {
    context.fillStyle = "#98a2b3";
    for (const m of marks) context.fillRect(x(m) - 1, H - pad.bottom + 2, 3, 5);
    context.fillStyle = "#555";
    context.textAlign = "right";
    context.fillText(`epoch ${xMax}`, W - pad.right, H - pad.bottom + 2);
  } else {
    for (const t of niceTicks(0, xMax, 10).filter((v) => Number.isInteger(v))) context.fillText(String(t), x(t), H - pad.bottom + 6);
    context.fillText("epoch", (pad.left + W - pad.right) / 2, H - 16);
  }
  if (marker) {
    context.strokeStyle = compact ? "#d9480f" : "#999";
    context.setLineDash([4, 4]);
    context.beginPath();
    context.moveTo(x(marker), pad.top);
    context.lineTo(x(marker), H - pad.bottom);
    context.stroke();
    context.setLineDash([]);
  }
  let legendX = pad.left;
  for (const s of series) {
    context.strokeStyle = s.colour;
    context.fillStyle = s.colour;
    context.lineWidth = 2;
    context.beginPath();
    s.points.forEach(([px, py], i) => (i ? context.lineTo(x(px), y(py)) : context.moveTo(x(px), y(py))));
    context.stroke();
    for (const [px, py] of s.points) {
      context.beginPath();
      context.arc(x(px), y(py), compact ? 1.5 : 3, 0, 2 * Math.PI);
      context.fill();
    }
    context.lineWidth = 1;
    context.textAlign = "left";
    context.textBaseline = "middle";
    const legendY = compact ? 6 : 12;
    context.fillRect(legendX, legendY - 2, 14, 3);
    context.fillStyle = "#333";
    context.fillText(s.name, legendX + 20, legendY);
    legendX += context.measureText(s.name).width + (compact ? 30 : 44);
  }
}
