// The answer as bars: probabilities, and signed scores around a middle line.

export function percent(p) {
  if (p === null || p === undefined) return "–";
  return p >= 0.999 ? ">99.9%" : p < 0.001 ? "<0.1%" : `${(100 * p).toFixed(1)}%`;
}

// Classes to list: all of them when few, else the 10 most probable.
export function shownClasses(probabilities) {
  const entries = Object.entries(probabilities);
  if (entries.length <= 12) return entries;
  return entries.sort((a, b) => (b[1] ?? 0) - (a[1] ?? 0)).slice(0, 10);
}

export function drawBars(container, probabilities, top) {
  container.replaceChildren(
    ...shownClasses(probabilities).map(([name, p]) => {
      const row = document.createElement("div");
      row.className = "bar" + (name === top ? " top" : "");
      row.dataset.class = name;
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = name;
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = `${Math.max(0, Math.min(1, p ?? 0)) * 100}%`;
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = percent(p);
      row.append(label, track, value);
      return row;
    }),
  );
}

// Scores (logits): signed bars around a middle line.
export function drawScores(container, names, values) {
  const scale = Math.max(...values.map((v) => Math.abs(v ?? 0)), 1e-9);
  const order = names.length <= 12 ? names.map((_, i) => i) : [...names.keys()].sort((a, b) => values[b] - values[a]).slice(0, 10);
  container.replaceChildren(
    ...order.map((i) => {
      const row = document.createElement("div");
      row.className = "bar signed";
      row.dataset.class = names[i];
      const label = document.createElement("span");
      label.className = "bar-label";
      label.textContent = names[i];
      const track = document.createElement("span");
      track.className = "bar-track";
      const fill = document.createElement("span");
      const v = values[i] ?? 0;
      fill.className = "bar-fill " + (v < 0 ? "neg" : "pos");
      fill.style.width = `${(Math.abs(v) / scale) * 50}%`;
      fill.style.left = v < 0 ? `${50 - (Math.abs(v) / scale) * 50}%` : "50%";
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = v.toFixed(2);
      row.append(label, track, value);
      return row;
    }),
  );
}
