// The model topology as SVG: module groups (tree.js) laid out so that no two labels overlap (layout.js), a
// closed group coloured by its worst layer (NaN/Inf first), opened with a click (or Enter) and closed from its
// frame's caption; each layer coloured by a live statistic, the NaN/Inf origin and an explosion marked, search
// matches ringed. Zoom with the wheel, pan by dragging (panzoom.js); a live update restyles the shown units and
// never lays them out again.

import { GEOM, layoutTree, textMeasure } from './layout.js';
import { PanZoom } from './panzoom.js';
import { ModuleTree } from './tree.js';
import { colorScale, esc, fmt, num } from './util.js';

export const STATS = {
  grad_norm: { label: 'gradient norm', log: true },
  update_ratio: { label: 'update / weight ratio', log: true },
  nonfinite: { label: 'non-finite values', log: false },
  param_norm: { label: 'weight norm', log: true },
};
export const ROLE_STYLE = {
  nonfinite: { color: '#ff1744', text: 'NaN/Inf origin' },
  exploding: { color: '#ff9100', text: 'explosion' },
};
const BAD = '#ff1744';
const NO_DATA = '#5c6370';
const MATCH = '#ffd54f';

export class TopologyView {
  constructor(el, { onSelect } = {}) {
    this.el = el;
    el.classList.add('topology');
    el.innerHTML = '<svg class="topology-svg" aria-label="model topology"><defs><marker id="gw-arrow" viewBox="0 0 8 8" '
      + 'refX="7" refY="4" markerWidth="6" markerHeight="6" orient="auto-start-reverse"><path d="M0,0L8,4L0,8z" fill="#8a93a3"/>'
      + '</marker></defs><g class="viewport"></g></svg><div class="tt topology-tip" hidden></div>';
    this.svg = el.querySelector('svg');
    this.viewport = el.querySelector('.viewport');
    this.tip = el.querySelector('.topology-tip');
    this.measure = textMeasure();
    this.onSelect = onSelect;
    this.stat = 'grad_norm';
    this.stats = new Map();   // layer -> {grad_norm, update_ratio, nonfinite, param_norm}
    this.roles = new Map();   // layer -> 'nonfinite' | 'exploding'
    this.selected = null;
    this.matches = null;      // a Set of layers while a search is on
    this.tree = null;
    this.painted = null;      // performance.now() when the first layout with nodes was on screen
    this.drawnAt = null;
    this.view = new PanZoom(this.svg, this.viewport, {
      onClick: (target) => this.activate(target), onHover: (e) => this.hover(e), onLeave: () => { this.tip.hidden = true; },
    });
    let width = 0;
    new ResizeObserver(() => {
      const w = el.clientWidth;
      if (this.tree && Math.abs(w - width) > 40) this.draw(true);
      width = w;
    }).observe(el);
  }

  reset() {
    this.tree = null;
    this.layout = null;
    this.elements = null;
    this.matches = null;
    this.selected = null;
    this.roles = new Map();
    this.stats.clear();
    this.fitted = false;
    this.viewport.replaceChildren();
  }

  setTopology(graph) {
    this.graph = graph;
    this.nodes = new Map(graph.nodes.map((n) => [n.id, n]));
    this.tree = new ModuleTree(graph.nodes, graph.edges);
    this.tree.openLevels();
    for (const layer of this.roles.keys()) this.tree.reveal(layer);
    if (this.selected) this.tree.reveal(this.selected);
    this.draw(true);
  }

  // /layers entries (`nonfinite` by kind) or live updates' (`nonfinite` summed): kept with the sum.
  setStats(layers) {
    for (const l of layers) {
      const bad = l.nonfinite;
      this.stats.set(l.layer, bad && typeof bad === 'object' ? { ...l, nonfinite: Object.values(bad).reduce((a, b) => a + b, 0) } : l);
    }
  }

  mergeStats(changed) {
    for (const [name, s] of Object.entries(changed)) this.stats.set(name, { layer: name, ...(this.stats.get(name) || {}), ...s });
  }

  setRoles(alerts) {
    // The first alert of each kind (oldest first) names where the trouble started.
    const origin = alerts.find((a) => a.rule === 'NonFinite' && a.status === 'firing' && a.layer);
    const explosion = alerts.find((a) => a.rule === 'ExplodingGradient' && a.status === 'firing' && a.layer);
    const roles = new Map();
    if (explosion) roles.set(explosion.layer, 'exploding');
    if (origin) roles.set(origin.layer, 'nonfinite');
    this.origin = origin || null;
    this.explosion = explosion || null;
    const same = roles.size === this.roles.size && [...roles].every(([k, v]) => this.roles.get(k) === v);
    this.roles = roles;
    if (!this.tree || same) return;
    for (const layer of roles.keys()) this.tree.reveal(layer);
    this.draw();  // role labels change sizes
  }

  setMatches(layers) {
    this.matches = layers;
    this.restyle();
  }

  // -- drawing --------------------------------------------------------------------------------------

  labelOf(u) {
    const text = this.tree.label(u);
    const role = u.kind === 'leaf' && this.roles.get(u.layer);
    return role ? `${ROLE_STYLE[role].text}: ${text}` : text;
  }

  draw(fit = false) {
    if (!this.tree) return;
    this.layout = this.bestLayout();
    const { cells, frames } = this.layout;
    const at = new Map(cells.map((c) => [c.unit, c]));
    this.shown = this.tree.shownAs(cells.map((c) => c.unit));
    const edges = this.tree.visibleEdges(this.shown);
    const arrows = edges.length <= 300;
    const parts = [];
    for (const f of frames) {
      parts.push(`<g class="frame" data-frame="${esc(f.unit.id)}" tabindex="0" role="button"><rect class="frame-box" x="${f.x}" y="${f.y}" width="${f.w}" `
        + `height="${f.h}" rx="6"/><rect class="frame-head" x="${f.x}" y="${f.y}" width="${f.w}" height="${GEOM.HEADER}" rx="6"/>`
        + `<text class="gw-label gw-title" x="${f.tx}" y="${f.ty}" dy="0.8em">${esc(f.text)}</text>`
        + `<title>${esc(this.tree.title(f.unit))}: click to close</title></g>`);
    }
    parts.push('<g class="edges">');
    for (const [a, b] of edges) {
      const s = at.get(a), t = at.get(b);
      if (!s || !t) continue;
      const r = GEOM.SYM / 2 + 1;
      const d = Math.abs(s.cy - t.cy) < 1 && t.cx > s.cx
        ? `M${s.cx + r},${s.cy}L${t.cx - r - 2},${t.cy}`
        : `M${s.cx},${s.cy + r}C${s.cx},${(s.cy + t.cy) / 2 + 20} ${t.cx},${(s.cy + t.cy) / 2 - 20} ${t.cx},${t.cy - r - 2}`;
      parts.push(`<path d="${d}"${arrows ? ' marker-end="url(#gw-arrow)"' : ''}/>`);
    }
    parts.push('</g><g class="units">');
    for (const c of cells) {
      const u = c.unit;
      const s = c.sym / 2;
      const sym = u.kind !== 'leaf'
        ? `<rect class="sym" x="${c.cx - s}" y="${c.cy - GEOM.SYM / 2}" width="${c.sym}" height="${GEOM.SYM}" rx="3"/>`
          + `<path class="plus" d="M${c.cx - 4},${c.cy}h8M${c.cx},${c.cy - 4}v8"/>`
        : this.roles.get(u.layer) === 'nonfinite'
          ? `<path class="sym" d="M${c.cx},${c.cy - s - 2}l${s + 2},${s + 2}l${-s - 2},${s + 2}l${-s - 2},${-s - 2}z"/>`
          : `<circle class="sym" cx="${c.cx}" cy="${c.cy}" r="${s}"/>`;
      parts.push(`<g class="unit ${u.kind}" data-uid="${esc(u.id)}" tabindex="0" role="button" `
        + `aria-label="${esc(u.kind === 'leaf' ? u.layer : `${this.tree.title(u)}, ${u.size} layers`)}">${sym}`
        + `<text class="gw-label" x="${c.lx}" y="${c.ly}" dy="0.8em" text-anchor="middle">${esc(c.text)}</text></g>`);
    }
    parts.push('</g>');
    this.viewport.innerHTML = parts.join('');
    this.elements = new Map();
    for (const g of this.viewport.querySelectorAll('.unit')) this.elements.set(g.dataset.uid, g);
    this.restyle();
    if (fit || !this.fitted) this.resetView();
    if (this.drawnAt === null && cells.length) {
      this.drawnAt = performance.now();
      requestAnimationFrame(() => requestAnimationFrame(() => {
        this.painted = performance.now();
        performance.mark('gradwatch:topology-painted');
      }));
    }
  }

  // Rows as wide as the panel, or wider where that shows the whole model larger (a tall model in a wide panel):
  // the widest of a few that gives the largest scale to fit, never below 1 while 1 fits.
  bestLayout() {
    const W = Math.max(200, this.el.clientWidth - 12), H = Math.max(120, this.el.clientHeight - 12);
    let best = null;
    for (const f of [1, 1.3, 1.7, 2.2, 3]) {
      const layout = layoutTree(this.tree, W * f, this.measure, (u) => this.labelOf(u));
      const k = Math.min(1, W / Math.max(1, layout.width), H / Math.max(1, layout.height));
      if (!best || k > best.k + 0.02) best = { k, layout };
      if (k >= 1) break;
    }
    return best.layout;
  }

  // Per layer of the tree: [value shown (log10 for log statistics), bad (NaN/Inf)].
  leafValues() {
    const { log } = STATS[this.stat];
    return this.tree.leaves.map((leaf) => {
      const s = this.stats.get(leaf.layer);
      const v = num(s?.[this.stat]);
      const bad = (num(s?.nonfinite) || 0) > 0 || (typeof v === 'number' && !Number.isFinite(v));
      if (v === null || v === undefined || !Number.isFinite(v)) return [null, bad];
      return [log ? (v > 0 ? Math.log10(v) : null) : v, bad];
    });
  }

  roleOf(u) {
    if (u.kind === 'leaf') return this.roles.get(u.layer) || null;
    let found = null;
    for (const [layer, role] of this.roles) {
      const i = this.tree.byLayer.get(layer);
      if (i !== undefined && i >= u.first && i <= u.last && (role === 'nonfinite' || !found)) found = role;
    }
    return found;
  }

  restyle() {
    if (!this.tree || !this.elements) return;
    const values = this.leafValues();
    const finite = values.map(([v]) => v).filter((v) => v !== null);
    this.range = finite.length ? [Math.min(...finite), Math.max(...finite)] : null;
    const scale = colorScale(...(this.range || [0, 1]));
    const match = this.matches && this.tree.leaves.map((l) => this.matches.has(l.layer));
    for (const [id, g] of this.elements) {
      const u = this.tree.units.get(id);
      const w = this.tree.worst(u, values);
      const color = w.bad ? BAD : w.value === null ? NO_DATA : this.stat === 'nonfinite' ? '#2e7d32' : scale(w.value);
      const sym = g.firstElementChild;
      sym.setAttribute('fill', color);
      const role = this.roleOf(u);
      const selected = this.selected !== null && (u.kind === 'leaf' ? u.layer === this.selected
        : this.tree.byLayer.get(this.selected) >= u.first && this.tree.byLayer.get(this.selected) <= u.last);
      let hit = false;
      if (match) for (let i = u.first; i <= u.last && !hit; i++) hit = match[i];
      sym.setAttribute('stroke', role ? ROLE_STYLE[role].color : hit ? MATCH : selected ? '#ffffff' : 'rgba(0,0,0,0.45)');
      sym.setAttribute('stroke-width', role || hit || selected ? 2.5 : 1);
      g.classList.toggle('role', !!role);
      g.classList.toggle('selected', selected);
      g.classList.toggle('match', hit);
      g.classList.toggle('dim', !!match && !hit);
      g.dataset.role = role || '';
      g.dataset.color = role ? ROLE_STYLE[role].color : '';
      const label = g.lastElementChild;
      label.style.fill = role ? ROLE_STYLE[role].color : '';
    }
  }

  render() { this.restyle(); }

  // [unit id, role, colour] of the marked units, as drawn.
  highlighted() {
    return [...this.elements?.values() || []].filter((g) => g.dataset.role).map((g) => [g.dataset.uid, g.dataset.role, g.dataset.color]);
  }

  // The units shown: [id, kind ('leaf' | 'group' | 'range'), label].
  visible() {
    return (this.layout?.cells || []).map((c) => [c.unit.id, c.unit.kind, c.text]);
  }

  // -- interaction ----------------------------------------------------------------------------------

  // A click or Enter: a closed group opens, an open group's caption closes it, a layer is selected.
  activate(target) {
    const frame = target?.closest?.('[data-frame]');
    const unit = target?.closest?.('[data-uid]');
    if (unit) {
      const u = this.tree.units.get(unit.dataset.uid);
      if (u.kind === 'leaf') this.onSelect?.(u.layer);
      else this.toggle(u.id, true);
    } else if (frame) {
      this.toggle(frame.dataset.frame, false);
    }
  }

  toggle(id, open) {
    const u = this.tree.units.get(id);
    if (!u || u.kind === 'leaf' || u.open === open) return;
    u.open = open;
    this.tip.hidden = true;
    this.draw();
    this.svg.querySelector(`[data-uid="${CSS.escape(open ? u.children[0].id : id)}"], [data-frame="${CSS.escape(id)}"]`)?.focus({ preventScroll: true });
  }

  hover(e) {
    const g = e.target.closest?.('[data-uid]');
    if (!g) {
      this.tip.hidden = true;
      return;
    }
    this.tip.innerHTML = this.tooltip(this.tree.units.get(g.dataset.uid));
    this.tip.hidden = false;
    const box = this.el.getBoundingClientRect();
    const x = e.clientX - box.left + 14, y = e.clientY - box.top + 14;
    this.tip.style.left = `${Math.min(x, box.width - this.tip.offsetWidth - 4)}px`;
    this.tip.style.top = `${y + this.tip.offsetHeight > box.height ? y - this.tip.offsetHeight - 20 : y}px`;
  }

  tooltip(u) {
    const role = this.roleOf(u);
    const mark = role ? `<div class="tt-role" style="color:${ROLE_STYLE[role].color}">${ROLE_STYLE[role].text}`
      + `${u.kind === 'leaf' ? '' : ' inside'}</div>` : '';
    if (u.kind !== 'leaf') {
      const values = this.leafValues();
      const w = this.tree.worst(u, values);
      const { log, label } = STATS[this.stat];
      const worst = w.layer ? `<tr><td>largest ${label}</td><td>${fmt(log ? 10 ** w.value : w.value)}</td></tr>`
        + `<tr><td colspan="2" class="tt-type">${esc(w.layer)}</td></tr>` : '';
      const bad = w.bad ? `<tr><td>layers with NaN/Inf</td><td>${w.bad}</td></tr><tr><td colspan="2" class="tt-type">first: ${esc(w.badLayer)}</td></tr>` : '';
      return `<div class="tt"><b>${esc(this.tree.title(u))}</b> <span class="tt-type">${u.size} layers · click to open</span>${mark}
        <table>${bad}${worst}</table></div>`;
    }
    const node = this.nodes.get(u.layer);
    const s = this.stats.get(u.layer) || {};
    const rows = Object.entries(STATS).map(([k, d]) => `<tr><td>${d.label}</td><td>${fmt(num(s[k]))}</td></tr>`);
    const tensors = (node?.tensors || []).slice(0, 8)
      .map((t) => `<div class="tt-tensor">${esc(t.name)} <span>${t.kind}${t.shape?.length ? ` [${t.shape.join('×')}]` : ''}</span></div>`);
    const more = (node?.tensors?.length || 0) > 8 ? `<div class="tt-tensor">… ${node.tensors.length - 8} more</div>` : '';
    return `<div class="tt"><b>${esc(u.layer)}</b> <span class="tt-type">${esc(node?.type || '')}</span>${mark}
      <table>${rows.join('')}</table>${tensors.join('')}${more}</div>`;
  }

  // Opens the groups around a layer, selects it and centres it.
  focus(layer, zoom = 1.25) {
    if (!this.tree || this.tree.byLayer.get(layer) === undefined) return;
    this.selected = layer;
    if (this.tree.reveal(layer)) this.draw();
    else this.restyle();
    const c = this.layout.cells.find((cell) => cell.unit.layer === layer);
    if (c) this.view.centre(c.cx, c.cy, zoom);
  }

  select(layer) {
    this.selected = layer;
    this.restyle();
  }

  // The whole layout in view (not smaller than 35 %: then it pans), centred across, from the top.
  resetView() {
    if (!this.layout) return;
    this.view.fit(this.layout.width, this.layout.height);
    this.fitted = true;
  }

  // Every label's box on screen (tests: no two overlap).
  labelBoxes() {
    return [...this.viewport.querySelectorAll('.gw-label')].map((t) => {
      const r = t.getBoundingClientRect();
      return [t.textContent, r.left, r.top, r.right, r.bottom];
    });
  }
}

