// The model topology: a layered layout computed here in one pass (no force simulation, so a 1,000-layer
// model paints at once), drawn by an ECharts graph series with zoom, pan and hover, coloured by a live
// per-layer statistic, with the origin of a NaN or an explosion marked.

import { colorScale, esc, fmt, num } from './util.js';

export const STATS = {
  grad_norm: { label: 'gradient norm', log: true },
  update_ratio: { label: 'update / weight ratio', log: true },
  nonfinite: { label: 'non-finite values', log: false },
  param_norm: { label: 'weight norm', log: true },
};
const ROLE_STYLE = {
  nonfinite: { color: '#ff1744', text: 'NaN/Inf origin' },
  exploding: { color: '#ff9100', text: 'explosion' },
};
const NO_DATA = '#5c6370';

// Longest-path layering of the DAG (nodes in forward order), wrapped into bands of `perBand` ranks
// that run left to right, then right to left (a serpentine keeps consecutive ranks adjacent).
// Nodes of one rank (parallel branches) stack vertically inside their band.
export function layeredLayout(nodes, edges, aspect = 1.8) {
  const index = new Map(nodes.map((n, i) => [n.id, i]));
  const preds = nodes.map(() => []);
  const succs = nodes.map(() => []);
  for (const e of edges) {
    const s = index.get(e.source), t = index.get(e.target);
    if (s === undefined || t === undefined || s === t) continue;
    succs[s].push(t);
    preds[t].push(s);
  }
  const indeg = preds.map((p) => p.length);
  const rank = new Array(nodes.length).fill(0);
  const queue = [];
  for (let i = 0; i < nodes.length; i++) if (indeg[i] === 0) queue.push(i);
  let seen = 0;
  for (let head = 0; head < queue.length; head++) {
    const i = queue[head];
    seen++;
    for (const t of succs[i]) {
      rank[t] = Math.max(rank[t], rank[i] + 1);
      if (--indeg[t] === 0) queue.push(t);
    }
  }
  if (seen < nodes.length) {  // a cycle: its nodes follow everything else in forward order
    let next = Math.max(0, ...rank) + 1;
    for (let i = 0; i < nodes.length; i++) if (indeg[i] > 0) rank[i] = next++;
  }
  const byRank = [];
  nodes.forEach((_, i) => (byRank[rank[i]] ||= []).push(i));
  const ranks = byRank.filter(Boolean);
  const widest = Math.max(1, ...ranks.map((r) => r.length));
  const bandHeight = widest + 1.5;
  // Small models fit one band; larger ones fill the panel's aspect ratio.
  const perBand = Math.min(ranks.length, Math.max(16, Math.ceil(Math.sqrt(bandHeight * ranks.length * aspect))));
  const pos = new Array(nodes.length);
  ranks.forEach((members, r) => {
    const band = Math.floor(r / perBand);
    const col = r % perBand;
    const x = band % 2 === 0 ? col : perBand - 1 - col;
    members.forEach((i, k) => {
      pos[i] = [x, band * bandHeight + k - (members.length - 1) / 2];
    });
  });
  return { pos, rank, perBand, bands: Math.ceil(ranks.length / perBand) };
}

export class TopologyView {
  constructor(el, echarts, { onSelect } = {}) {
    this.chart = echarts.init(el, 'dark', { renderer: 'canvas' });
    this.onSelect = onSelect;
    this.stat = 'grad_norm';
    this.nodes = [];
    this.stats = new Map();   // layer -> {grad_norm, update_ratio, nonfinite, param_norm}
    this.roles = new Map();   // layer -> 'nonfinite' | 'exploding'
    this.selected = null;
    this.painted = null;      // performance.now() of the first paint with nodes
    this.chart.on('click', (p) => {
      if (p.dataType === 'node' && this.onSelect) this.onSelect(p.data.name);
    });
    this.chart.on('finished', () => {
      if (this.painted === null && this.nodes.length) {
        this.painted = performance.now();
        performance.mark('gradwatch-graph-painted');
      }
    });
    new ResizeObserver(() => this.chart.resize()).observe(el);
  }

  setTopology(graph) {
    this.graph = graph;
    this.nodes = graph.nodes;
    const t0 = performance.now();
    const { width, height } = this.chart.getDom().getBoundingClientRect();
    this.layout = layeredLayout(graph.nodes, graph.edges, Math.max(0.5, width / Math.max(1, height)));
    this.byId = new Map(graph.nodes.map((n, i) => [n.id, i]));
    const t1 = performance.now();
    this.render(true);
    this.timings = { layout: t1 - t0, draw: performance.now() - t1, width, height, perBand: this.layout.perBand };
  }

  setStats(layers) {
    for (const l of layers) this.stats.set(l.layer, l);
  }

  mergeStats(changed) {
    for (const [name, s] of Object.entries(changed)) this.stats.set(name, { layer: name, ...(this.stats.get(name) || {}), ...s });
  }

  setRoles(alerts) {
    // The first alert of each kind (oldest first) names where the trouble started.
    this.roles = new Map();
    const origin = alerts.find((a) => a.rule === 'NonFinite' && a.status === 'firing' && a.layer);
    const explosion = alerts.find((a) => a.rule === 'ExplodingGradient' && a.status === 'firing' && a.layer);
    if (explosion) this.roles.set(explosion.layer, 'exploding');
    if (origin) this.roles.set(origin.layer, 'nonfinite');
    this.origin = origin || null;
    this.explosion = explosion || null;
  }

  // [layer, role] pairs of the marked nodes, as drawn.
  highlighted() {
    const data = this.chart.getOption()?.series?.[0]?.data || [];
    return data.filter((d) => d.gwRole).map((d) => [d.name, d.gwRole, d.itemStyle.borderColor]);
  }

  values() {
    const { log } = STATS[this.stat];
    return this.nodes.map((n) => {
      const v = num(this.stats.get(n.id)?.[this.stat]);
      if (v === null || v === undefined) return null;
      if (!Number.isFinite(v)) return v;
      return log ? (v > 0 ? Math.log10(v) : null) : v;
    });
  }

  render(fresh = false) {
    if (!this.layout) return;
    const values = this.values();
    const finite = values.filter((v) => v !== null && Number.isFinite(v));
    const lo = finite.length ? Math.min(...finite) : 0;
    const hi = finite.length ? Math.max(...finite) : 1;
    this.range = finite.length ? [lo, hi] : null;
    const scale = colorScale(lo, hi);
    const n = this.nodes.length;
    const { width } = this.chart.getDom().getBoundingClientRect();
    const size = Math.max(5, Math.min(26, (0.55 * width) / Math.max(1, this.layout.perBand)));
    const labels = n <= 80;
    const xs = this.layout.pos.map((p) => p[0]);
    const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    // Only what differs from the series' defaults goes into an item: ECharts resolves every item option
    // through a model of its own, which is most of the cost of drawing 1,000 nodes.
    const data = this.nodes.map((node, i) => {
      const v = values[i];
      const role = this.roles.get(node.id);
      const bad = (num(this.stats.get(node.id)?.nonfinite) || 0) > 0 || (v !== null && !Number.isFinite(v));
      const color = bad ? '#ff1744' : v === null ? NO_DATA : this.stat === 'nonfinite' ? '#2e7d32' : scale(v);
      const item = { name: node.id, x: this.layout.pos[i][0], y: this.layout.pos[i][1], itemStyle: { color } };
      if (role) {
        const accent = ROLE_STYLE[role].color;
        // Labels of nodes near the sides grow inwards, so they are not cut at the panel's edge.
        const at = (item.x - x0) / Math.max(1, x1 - x0);
        const align = at > 0.7 ? 'right' : at < 0.3 ? 'left' : 'center';
        Object.assign(item, {
          gwRole: role,
          symbol: role === 'nonfinite' ? 'diamond' : 'circle',
          symbolSize: size * 1.8,
          z: 10,
          itemStyle: { color, borderColor: accent, borderWidth: Math.max(3, size / 5), shadowBlur: 18, shadowColor: accent },
          label: { show: true, position: 'top', align, formatter: `${ROLE_STYLE[role].text}: {b}`, color: accent,
                   fontWeight: 'bold', fontSize: 13, backgroundColor: 'rgba(20,22,26,0.85)', padding: [2, 4] },
        });
      } else if (node.id === this.selected) {
        Object.assign(item, { symbolSize: size * 1.4, itemStyle: { color, borderColor: '#ffffff', borderWidth: 2 } });
      }
      return item;
    });
    const series = {
      id: 'topology',
      type: 'graph',
      layout: 'none',
      roam: true,
      scaleLimit: { min: 0.2, max: 40 },
      symbolSize: size,
      itemStyle: { borderColor: 'rgba(0,0,0,0.4)', borderWidth: 0.5 },
      data,
      edges: this.graph.edges.map((e) => {
        const s = this.byId.get(e.source), t = this.byId.get(e.target);
        const skip = s !== undefined && t !== undefined && Math.abs(this.layout.rank[t] - this.layout.rank[s]) > 1;
        return { source: e.source, target: e.target, lineStyle: skip ? { curveness: 0.25 } : undefined };
      }),
      edgeSymbol: n <= 300 ? ['none', 'arrow'] : ['none', 'none'],
      edgeSymbolSize: 5,
      // Width 1.5 at least: ECharts 6.1 draws thinner straight edges offset from their nodes.
      lineStyle: { color: '#8a93a3', opacity: n <= 300 ? 0.6 : 0.35, width: n <= 300 ? 2 : 1.5 },
      label: { show: labels, position: 'bottom', color: '#c8ccd4', fontSize: 11 },
      labelLayout: labels ? { hideOverlap: true } : undefined,
      emphasis: { focus: n <= 300 ? 'adjacency' : 'none', label: { show: true, color: '#fff' }, lineStyle: { width: 2, opacity: 0.9 } },
      animation: n <= 300,
    };
    if (fresh) {
      this.chart.setOption({
        backgroundColor: 'transparent',
        animation: n <= 300,
        tooltip: { trigger: 'item', confine: true, enterable: false, formatter: (p) => this.tooltip(p) },
        series: [series],
      }, { notMerge: true });
    } else {
      this.chart.setOption({ series: [{ id: 'topology', data, symbolSize: size }] }, { lazyUpdate: true });
    }
  }

  tooltip(p) {
    if (p.dataType === 'edge') return `${esc(p.data.source)} → ${esc(p.data.target)}`;
    const node = this.nodes[this.byId.get(p.data.name)];
    const s = this.stats.get(p.data.name) || {};
    const role = this.roles.get(p.data.name);
    const rows = Object.entries(STATS).map(([k, d]) => `<tr><td>${d.label}</td><td>${fmt(num(s[k]))}</td></tr>`);
    const tensors = (node?.tensors || []).slice(0, 8)
      .map((t) => `<div class="tt-tensor">${esc(t.name)} <span>${t.kind}${t.shape?.length ? ` [${t.shape.join('×')}]` : ''}</span></div>`);
    const more = (node?.tensors?.length || 0) > 8 ? `<div class="tt-tensor">… ${node.tensors.length - 8} more</div>` : '';
    const mark = role ? `<div class="tt-role" style="color:${ROLE_STYLE[role].color}">${ROLE_STYLE[role].text}</div>` : '';
    return `<div class="tt"><b>${esc(p.data.name)}</b> <span class="tt-type">${esc(node?.type || '')}</span>${mark}
      <table>${rows.join('')}</table>${tensors.join('')}${more}</div>`;
  }

  // Centres and zooms the view on one layer.
  focus(layer, zoom = 4) {
    const i = this.byId?.get(layer);
    if (i === undefined) return;
    this.selected = layer;
    this.render();
    this.chart.setOption({ series: [{ id: 'topology', center: this.layout.pos[i], zoom }] });
    this.chart.dispatchAction({ type: 'showTip', seriesIndex: 0, dataIndex: i });
  }

  // The whole model in view again: zoom 1 around the middle of the layout.
  resetView() {
    if (!this.layout?.pos.length) return;
    const xs = this.layout.pos.map((p) => p[0]);
    const ys = this.layout.pos.map((p) => p[1]);
    const mid = (v) => (Math.min(...v) + Math.max(...v)) / 2;
    this.chart.setOption({ series: [{ id: 'topology', center: [mid(xs), mid(ys)], zoom: 1 }] });
  }
}
