// The heatmap's data: its rows (the layers with gradients, in forward order, narrowed by a search: the API's
// `q`) fetched from /heatmap in windows of PAGE layers only when a window comes into view, each window's values
// kept by step (the newest MAX_STEPS steps in all). A live update marks every window behind; the windows in view
// then fetch only the steps after the last one they hold, the others when they come into view.

import { api, num } from './util.js';

export const PAGE = 64;        // layers per request
export const MAX_STEPS = 500;  // columns kept, the newest

export class HeatRows {
  constructor() {
    this.run = null;
    this.q = '';
    this.pending = null;  // a request for the first window already sent (prefetch.js)
    this.generation = 0;
    this.clear();
  }

  clear() {
    this.generation++;   // answers to requests of before are dropped
    this.pages = new Map();  // window index -> {names, values: Map(step -> [norm per name]), last, stale, loading}
    this.total = null;   // rows, known from the first answer
    this.steps = [];     // every step any window holds, ascending
    this.dirty = true;   // values changed since the colour range was taken
  }

  get lastStep() {
    return this.steps.length ? this.steps[this.steps.length - 1] : null;
  }

  get layers() {  // the rows loaded, in order
    return [...this.pages.keys()].sort((a, b) => a - b).flatMap((p) => this.pages.get(p).names);
  }

  name(r) {
    return this.pages.get(Math.floor(r / PAGE))?.names[r % PAGE];
  }

  value(r, step) {
    return this.pages.get(Math.floor(r / PAGE))?.values.get(step)?.[r % PAGE];
  }

  // The row of a layer, where its window is loaded; -1 otherwise.
  indexOf(layer) {
    for (const [p, page] of this.pages) {
      const i = page.names.indexOf(layer);
      if (i >= 0) return p * PAGE + i;
    }
    return -1;
  }

  behind() {
    for (const page of this.pages.values()) page.stale = true;
  }

  // Fetches the windows p0..p1 that are missing or behind; resolves when they are in.
  async load(p0, p1) {
    const jobs = [];
    for (let p = p0; p <= p1; p++) {
      const page = this.pages.get(p);
      if (!page || page.stale || page.loading) jobs.push(this.fetch(p));
    }
    await Promise.all(jobs);
    return jobs.length;
  }

  fetch(p) {
    let page = this.pages.get(p);
    if (!page) this.pages.set(p, page = { names: [], values: new Map(), last: null, stale: false, loading: null });
    if (page.loading) {  // marked behind meanwhile: once more when this answer is in
      page.again = page.again || page.stale;
      return page.loading;
    }
    const gen = this.generation;
    page.loading = (async () => {
      do {
        page.again = false;
        page.stale = false;
        const q = this.q ? `&q=${encodeURIComponent(this.q)}` : '';
        const from = page.last === null ? '' : `&from=${page.last + 1}`;
        const path = `/api/v1/runs/${encodeURIComponent(this.run)}/heatmap?layer_offset=${p * PAGE}&layer_limit=${PAGE}`
          + `&limit=${MAX_STEPS}${from}${q}`;
        const pending = p === 0 && !q && !from ? this.pending : null;
        this.pending = null;
        const data = await api(path, pending);
        if (gen !== this.generation) return;
        this.absorb(p, page, data);
      } while (page.again);
    })().finally(() => { page.loading = null; });
    return page.loading;
  }

  absorb(p, page, data) {
    if (this.total !== null && data.total !== this.total) {  // layers came or went: every other window again
      for (const [q, other] of this.pages) if (q !== p) Object.assign(other, { last: null, values: new Map(), stale: true });
    }
    this.total = data.total;
    page.names = data.layers;
    let unordered = false;
    data.steps.forEach((step, k) => {
      page.values.set(step, data.values[k]);
      if (page.last === null || step > page.last) page.last = step;
      if (!this.steps.length || step > this.steps[this.steps.length - 1]) this.steps.push(step);
      else if (!this.steps.includes(step)) unordered = true;
    });
    if (unordered) this.steps = [...new Set([...this.pages.values()].flatMap((pg) => [...pg.values.keys()]))].sort((a, b) => a - b);
    if (this.steps.length > MAX_STEPS) {
      const gone = this.steps.splice(0, this.steps.length - MAX_STEPS);
      for (const pg of this.pages.values()) for (const s of gone) pg.values.delete(s);
    }
    this.dirty = true;
  }

  // log10 range of the colours: the 1st to 99th percentile of what is loaded (one exploding step must not
  // flatten every other cell), from a sample of at most 20,000 cells.
  colourRange() {
    const all = [];
    for (const page of this.pages.values()) for (const row of page.values.values()) all.push(row);
    const cells = all.reduce((n, r) => n + r.length, 0);
    const stride = Math.max(1, Math.floor(cells / 20000));
    const logs = [];
    let k = 0;
    for (const row of all) {
      for (const raw of row) {
        if (k++ % stride) continue;
        const v = num(raw);
        if (typeof v === 'number' && Number.isFinite(v) && v > 0) logs.push(Math.log10(v));
      }
    }
    this.dirty = false;
    if (!logs.length) return [0, 1];
    logs.sort((a, b) => a - b);
    const lo = logs[Math.floor(0.01 * (logs.length - 1))], hi = logs[Math.ceil(0.99 * (logs.length - 1))];
    return hi > lo ? [lo, hi] : [lo, lo + 1];
  }

  // Loaded cells by what they show (tests): finite norms, NaN/Inf (red), exactly zero (grey).
  counts() {
    const out = { finite: 0, nonfinite: 0, zero: 0 };
    for (const page of this.pages.values()) {
      for (const row of page.values.values()) {
        for (const raw of row) {
          const v = num(raw);
          if (v === null || v === undefined) continue;
          if (!Number.isFinite(v)) out.nonfinite++;
          else if (v > 0) out.finite++;
          else out.zero++;
        }
      }
    }
    return out;
  }
}
