// The page's shared state, the element lookup and what tests and the benchmark read (window.cnnkit).

export const $ = (id) => document.getElementById(id);
export const DEBOUNCE_MS = 15; // after a stroke, wait this long before sending (one request in flight at most)
export const HISTORY_POLL_MS = 2000;

// Exposed for tests and the benchmark: stroke-to-render timings (ms), the last answer and explanation.
window.cnnkit = { timings: [], renders: 0, last: null, errors: 0, explained: 0, explanation: null };

export const state = {
  models: [],
  model: null,
  // {kind: "pad"}, {kind: "file", file} or {kind: "dataset", split, index} (a report's image, from the URL)
  source: null,
  hasInk: false,
  dirty: false, // the drawing or file changed since it was last sent (else an epoch change resends `pixels`)
  pendingSince: null, // performance.now() of the first change not yet sent
  inFlight: false,
  timer: null,
  generation: 0, // bumped by Clear and model changes: answers to older requests are dropped
  result: null,
  layout: "", // the layer panels' structure (names and shapes), rebuilt when it changes
  filters: new Map(), // "model@epoch" -> Promise of its decoded kernels
  historyTimer: null,
  historyText: "",
  history: null, // the model's /history answer, for the epoch chart
  epochs: [], // the epochs whose checkpoints the run keeps
  epoch: null, // the epoch shown (null: the checkpoint served)
  target: null, // the value being explained: {layer, channel, y, x}
};

// True while a change waits to be sent or an answer is awaited.
window.cnnkit.busy = () => state.inFlight || state.pendingSince !== null || state.timer !== null;
