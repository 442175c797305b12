// The layer x step heatmap of gradient norms (log10; red NaN/Inf, grey exactly 0) on one canvas that draws only
// the rows and columns in view, under a scroller that only sizes the scroll range. Its rows come from heatrows.js,
// fetched as they scroll into view; a live update fetches the new steps of the rows in view. A 2,000-layer model
// costs what is on screen.

import { FONT } from './layout.js';
import { HeatRows, PAGE } from './heatrows.js';
import { esc, fmt, num, PALETTE } from './util.js';

const ROW_H = 14;  // at least; a few layers get taller rows, up to MAX_ROW_H
const MAX_ROW_H = 32;
const AXIS_H = 20;
const LEGEND_W = 74;
const MIN_COL = 2, MAX_COL = 24;
const BAD = '#ff1744', ZERO = '#4a5160', EMPTY = '#1f232a';

function lut(n = 64) {
  const rgb = PALETTE.map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
  return Array.from({ length: n }, (_, k) => {
    const t = (k / (n - 1)) * (rgb.length - 1);
    const i = Math.min(rgb.length - 2, Math.floor(t));
    const c = rgb[i].map((a, j) => Math.round(a + (rgb[i + 1][j] - a) * (t - i)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  });
}
const COLORS = lut();

export class HeatmapView {
  constructor(el, { onSelect } = {}) {
    this.el = el;
    el.classList.add('heatmap');
    el.innerHTML = '<canvas class="hm-canvas"></canvas><div class="hm-scroll" tabindex="0" aria-label="gradient norm '
      + 'per layer and step; arrow keys scroll"><div class="hm-spacer"></div></div><div class="tt hm-tip" hidden></div>';
    this.canvas = el.querySelector('canvas');
    this.ctx = this.canvas.getContext('2d');
    this.scroller = el.querySelector('.hm-scroll');
    this.spacer = el.querySelector('.hm-spacer');
    this.tip = el.querySelector('.hm-tip');
    this.onSelect = onSelect;
    this.selected = null;
    this.drawnAt = null;     // performance.now() of the first draw with data
    this.rows = new HeatRows();
    this.frame = 0;
    this.scroller.addEventListener('scroll', () => this.schedule(true));
    this.scroller.addEventListener('mousemove', (e) => this.hover(e));
    this.scroller.addEventListener('mouseleave', () => { this.tip.hidden = true; });
    this.scroller.addEventListener('click', (e) => {
      const at = this.cellAt(e);
      if (at?.layer && this.onSelect) this.onSelect(at.layer);
    });
    new ResizeObserver(() => this.schedule(true)).observe(el);
    this.reset();
  }

  reset(run = null) {
    this.rows.run = run;
    this.rows.q = '';
    this.clear();
  }

  clear() {
    this.rows.clear();
    this.range = null;
    this.follow = true;      // keep the newest step in view
    this.scroller.scrollTop = 0;
    this.draw();
  }

  set pending(request) { this.rows.pending = request; }

  get total() { return this.rows.total; }

  get steps() { return this.rows.steps; }

  get lastStep() { return this.rows.lastStep; }

  get layers() { return this.rows.layers; }

  counts() { return this.rows.counts(); }

  setFilter(q) {
    if (q === this.rows.q) return Promise.resolve();
    this.rows.q = q;
    this.clear();
    return this.load();
  }

  // New steps arrived: the rows in view fetch theirs now, the rest when they come into view.
  refresh() {
    this.rows.behind();
    return this.load();
  }

  // Fetches the windows in view that are missing or behind; resolves once they are drawn.
  async load() {
    if (!this.rows.run) return;
    const gen = this.rows.generation;
    const [p0, p1] = this.inView();
    if (!(await this.rows.load(p0, p1)) || gen !== this.rows.generation) return;
    // Then the windows in view now, where they are missing: the first answer told how many rows, or the view
    // scrolled while this waited (never the windows between where it was and where it is).
    const [q0, q1] = this.inView();
    if (q0 !== p0 || q1 !== p1) await this.rows.load(q0, q1);
    this.draw();
  }

  // Row height: ROW_H, or taller while every row fits the panel (a small model fills it).
  rowH() {
    const fit = Math.floor((this.el.clientHeight - AXIS_H) / Math.max(1, this.total ?? 1));
    return Math.max(ROW_H, Math.min(MAX_ROW_H, fit));
  }

  // [first, last] window index on screen (the first only, until the first answer tells how many rows).
  inView() {
    const h = this.scroller.clientHeight - AXIS_H;
    const r0 = Math.floor(this.scroller.scrollTop / this.rowH());
    const r1 = Math.ceil((this.scroller.scrollTop + Math.max(h, this.rowH())) / this.rowH());
    const last = this.total === null ? 0 : Math.max(0, Math.floor((Math.min(this.total, r1) - 1) / PAGE));
    return [Math.min(Math.floor(r0 / PAGE), last), last];
  }

  schedule(load = false) {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
      if (load) this.load().catch(() => {});
    });
  }

  geometry() {
    const W = this.el.clientWidth, H = this.el.clientHeight;
    const names = this.visibleNames();
    const ctx = this.ctx;
    ctx.font = FONT;
    const gutter = Math.min(200, Math.max(40, ...names.map((n) => ctx.measureText(n).width + 10)));
    const n = Math.max(1, this.steps.length);
    const cw = Math.max(MIN_COL, Math.min(MAX_COL, (W - gutter - LEGEND_W) / n));
    return { W, H, gutter, cw, gridW: Math.max(0, W - gutter - LEGEND_W), gridH: Math.max(0, H - AXIS_H) };
  }

  visibleNames() {
    const out = [];
    const r0 = Math.floor(this.scroller.scrollTop / this.rowH());
    const r1 = Math.min(this.total ?? 0, r0 + Math.ceil(this.scroller.clientHeight / this.rowH()) + 1);
    for (let r = r0; r < r1; r++) {
      const name = this.rows.name(r);
      if (name) out.push(name);
    }
    return out;
  }

  draw() {
    const { W, H, gutter, cw, gridW, gridH } = this.geometry();
    const rh = this.rowH();
    const dpr = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(W * dpr) || this.canvas.height !== Math.round(H * dpr)) {
      this.canvas.width = Math.round(W * dpr);
      this.canvas.height = Math.round(H * dpr);
    }
    const ctx = this.ctx;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    const rows = this.total ?? 0;
    const contentW = gutter + this.steps.length * cw + LEGEND_W;
    this.spacer.style.width = `${Math.max(W, contentW)}px`;
    this.spacer.style.height = `${rows * rh + AXIS_H}px`;
    if (this.follow) this.scroller.scrollLeft = this.scroller.scrollWidth;
    const maxLeft = Math.max(0, contentW - W);
    this.follow = this.scroller.scrollLeft >= maxLeft - 2;
    ctx.font = FONT;
    if (!rows) {
      ctx.fillStyle = '#8a93a3';
      const { q } = this.rows;
      ctx.fillText(this.total === 0 ? (q ? `no layer matches “${q}”` : 'no gradients yet') : 'loading…', 12, 20);
      return;
    }
    if (this.rows.dirty || !this.range) this.range = this.rows.colourRange();
    const [lo, hi] = this.range;
    const top = this.scroller.scrollTop, left = this.scroller.scrollLeft;
    const r0 = Math.floor(top / rh), r1 = Math.min(rows, Math.ceil((top + gridH) / rh));
    const c0 = Math.max(0, Math.floor(left / cw)), c1 = Math.min(this.steps.length, Math.ceil((left + gridW) / cw));
    const gap = cw > 4 ? 1 : 0;
    ctx.save();
    ctx.beginPath();
    ctx.rect(gutter, 0, gridW, gridH);
    ctx.clip();
    for (let r = r0; r < r1; r++) {
      const page = this.rows.pages.get(Math.floor(r / PAGE));
      const i = r % PAGE;
      const y = r * rh - top;
      for (let c = c0; c < c1; c++) {
        const raw = page?.values.get(this.steps[c])?.[i];
        const v = num(raw);
        const x = gutter + c * cw - left;
        if (v === null || v === undefined) ctx.fillStyle = EMPTY;
        else if (!Number.isFinite(v)) ctx.fillStyle = BAD;
        else if (v <= 0) ctx.fillStyle = ZERO;
        else ctx.fillStyle = COLORS[Math.round(Math.min(1, Math.max(0, (Math.log10(v) - lo) / (hi - lo))) * (COLORS.length - 1))];
        ctx.fillRect(x, y, cw - gap, rh - 1);
      }
    }
    ctx.restore();
    // Row labels (the layer names), the selected one outlined across the grid.
    ctx.save();
    ctx.beginPath();
    ctx.rect(0, 0, W, gridH);
    ctx.clip();
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'right';
    for (let r = r0; r < r1; r++) {
      const name = this.rows.name(r);
      const y = r * rh - top;
      if (!name) continue;
      ctx.fillStyle = name === this.selected ? '#ffffff' : '#c8ccd4';
      ctx.fillText(this.clip(name, gutter - 10), gutter - 5, y + rh / 2);
      if (name === this.selected) {
        ctx.strokeStyle = '#ffffff';
        ctx.strokeRect(gutter + 0.5, y + 0.5, Math.min(gridW, this.steps.length * cw) - 1, rh - 2);
      }
    }
    ctx.restore();
    this.axis(ctx, { gutter, cw, gridW, gridH, left, c0, c1 });
    this.legend(ctx, W, gridH, lo, hi);
    if (this.drawnAt === null && this.steps.length) {
      this.drawnAt = performance.now();
      performance.mark('gradwatch:heatmap-drawn');
    }
    this.drawn = (this.drawn || 0) + 1;
  }

  clip(name, max) {
    if (this.ctx.measureText(name).width <= max) return name;
    let k = 1;
    while (k < name.length && this.ctx.measureText(`…${name.slice(k)}`).width > max) k++;
    return `…${name.slice(k)}`;
  }

  axis(ctx, { gutter, cw, gridW, gridH, left, c0, c1 }) {
    ctx.fillStyle = '#8a93a3';
    ctx.textBaseline = 'top';
    ctx.textAlign = 'center';
    const every = Math.max(1, Math.ceil(60 / cw));
    for (let c = c0; c < c1; c++) {
      if (c % every) continue;
      const x = gutter + c * cw - left + cw / 2;
      if (x < gutter + 10 || x > gutter + gridW - 10) continue;
      ctx.fillText(String(this.steps[c]), x, gridH + 4);
    }
    ctx.textAlign = 'left';
    ctx.fillText('step', gutter + gridW + 6, gridH + 4);
  }

  legend(ctx, W, gridH, lo, hi) {
    const x = W - LEGEND_W + 12, h = Math.min(140, gridH - 40), y = Math.max(22, (gridH - h) / 2);
    if (h < 20) return;
    COLORS.forEach((c, k) => {
      ctx.fillStyle = c;
      ctx.fillRect(x, y + h - ((k + 1) * h) / COLORS.length, 10, h / COLORS.length + 0.5);
    });
    ctx.fillStyle = '#c8ccd4';
    ctx.textAlign = 'left';
    ctx.textBaseline = 'middle';
    ctx.fillText(fmt(10 ** hi), x + 13, y);
    ctx.fillText(fmt(10 ** lo), x + 13, y + h);
    ctx.fillText('log₁₀', x - 2, y - 14);
  }

  cellAt(e) {
    const box = this.scroller.getBoundingClientRect();
    const { gutter, cw, gridW, gridH } = this.geometry();
    const x = e.clientX - box.left, y = e.clientY - box.top;
    if (y > gridH || x > gutter + gridW) return null;
    const r = Math.floor((y + this.scroller.scrollTop) / this.rowH());
    const layer = this.rows.name(r);
    if (x < gutter) return layer ? { layer } : null;
    const c = Math.floor((x - gutter + this.scroller.scrollLeft) / cw);
    const step = this.steps[c];
    if (!layer || step === undefined) return { layer };
    return { layer, step, raw: this.rows.value(r, step) };
  }

  hover(e) {
    const at = this.cellAt(e);
    if (!at?.layer) {
      this.tip.hidden = true;
      return;
    }
    const v = num(at.raw);
    const value = at.step === undefined ? '' : `<br>step ${at.step}: gradient norm ${
      v === null || v === undefined ? '–' : Number.isFinite(v) ? fmt(v) : esc(String(at.raw))}`;
    this.tip.innerHTML = `<b>${esc(at.layer)}</b>${value}`;
    this.tip.hidden = false;
    const box = this.el.getBoundingClientRect();
    const x = e.clientX - box.left + 12, y = e.clientY - box.top + 12;
    this.tip.style.left = `${Math.min(x, box.width - this.tip.offsetWidth - 4)}px`;
    this.tip.style.top = `${Math.min(y, box.height - this.tip.offsetHeight - 4)}px`;
  }

  // Outlines a layer's row, and scrolls it into view when its window is loaded.
  select(layer) {
    this.selected = layer;
    const r = this.rows.indexOf(layer);
    if (r >= 0) {
      const y = r * this.rowH(), h = this.scroller.clientHeight - AXIS_H;
      if (y < this.scroller.scrollTop || y + this.rowH() > this.scroller.scrollTop + h) this.scroller.scrollTop = Math.max(0, y - h / 2);
    }
    this.schedule(true);
  }

  // Counts of what is drawn now (tests): rows and columns in view, cells by colour class.
  drawnCells() {
    const { gridW, gridH, cw } = this.geometry();
    const rows = Math.min(this.total ?? 0, Math.ceil(gridH / this.rowH()) + 1);
    const cols = Math.min(this.steps.length, Math.ceil(gridW / cw) + 1);
    return { rows, cols, total: this.total, steps: this.steps.length };
  }
}
