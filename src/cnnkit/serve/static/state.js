// The page's shared state, the element lookup and what tests and the benchmark read (window.cnnkit).

export const $ = (id) => document.getElementById(id);
export const DEBOUNCE_MS = 15; // after a stroke, wait this long before sending (one request in flight at most)
export const HISTORY_POLL_MS = 2000;

// Exposed for tests and the benchmark: stroke-to-render timings (ms) and the last answer.
window.cnnkit = { timings: [], renders: 0, last: null, errors: 0 };

export const state = {
  models: [],
  model: null,
  source: null, // {kind: "pad"} or {kind: "file", file}
  hasInk: false,
  pendingSince: null, // performance.now() of the first change not yet sent
  inFlight: false,
  timer: null,
  generation: 0, // bumped by Clear and model changes: answers to older requests are dropped
  result: null,
  layout: "", // the layer panels' structure (names and shapes), rebuilt when it changes
  filters: new Map(), // model id -> Promise of its decoded kernels
  historyTimer: null,
  historyText: "",
};

// True while a change waits to be sent or an answer is awaited.
window.cnnkit.busy = () => state.inFlight || state.pendingSince !== null || state.timer !== null;
