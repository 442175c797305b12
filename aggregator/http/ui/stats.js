// The selected layer's statistics, under the main grid: the distribution of a tensor's log2 magnitudes over
// steps as one heatmap (TensorBoard's histogram mode, /histograms?matrix=1, merged over ranks), its tensors'
// figures (/tensors?layer=: NaN shown as NaN, never 0), the optimizer's view of its parameters (/optimizer?layer=:
// moment norms, the update's RMS and ratio, the |Δw| histogram), and the run's valid ranges (/ranges), whose
// out-of-range steps the curves mark (charts.js, from /steps' `out_of_range`).

import { API_TOKEN_KEY, ApiError, api, esc, fmt, num, PALETTE, READ_TOKEN_KEY } from './util.js';

const AXIS = { axisLine: { lineStyle: { color: '#5c6370' } }, splitLine: { lineStyle: { color: '#2c313a' } } };
const BUCKET_BIAS = 40;  // bucket i holds floor(log2|x|) = i - 40
const KINDS = ['parameter', 'gradient', 'update', 'activation', 'activation_gradient'];
const COLUMNS = 200;
const SHORT_KIND = { activation_gradient: 'act. grad', optimizer_state: 'opt. state', activation_units: 'act. units' };

// A write (POST/DELETE) with the API token kept in sessionStorage (else the read token: a loopback-only
// aggregator without an API token takes what its reads take); asks for the API token on 401 or 403 read_only.
async function write(method, path, body) {
  for (;;) {
    const apiToken = sessionStorage.getItem(API_TOKEN_KEY);
    const token = apiToken || sessionStorage.getItem(READ_TOKEN_KEY);
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (token) headers.Authorization = `Bearer ${token}`;
    const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const readOnly = resp.status === 403 && (await resp.clone().json().catch(() => ({}))).errorType === 'read_only';
    if (resp.status !== 401 && !readOnly) return api(path, Promise.resolve(resp));
    sessionStorage.removeItem(API_TOKEN_KEY);
    const given = window.prompt(`${apiToken ? 'The API token was refused. ' : ''}This aggregator needs its API token `
      + '(GRADWATCH_AGGREGATOR_API_TOKEN) to change valid ranges:');
    if (!given?.trim()) throw new ApiError('not changed: the aggregator needs its API token');
    sessionStorage.setItem(API_TOKEN_KEY, given.trim());
  }
}

// A figure of the API as table cell HTML: NaN/Inf in red, spelled out.
function cell(v) {
  const x = num(v);
  if (typeof x === 'number' && !Number.isFinite(x)) {
    const text = Number.isNaN(x) ? 'NaN' : (x > 0 ? '+Inf' : '-Inf');
    return `<td class="nonfinite">${text}</td>`;
  }
  return `<td>${esc(fmt(x))}</td>`;
}

function countCell(n) {
  return n ? `<td class="nonfinite">${esc(n)}</td>` : '<td>0</td>';
}

const enc = encodeURIComponent;

export class StatisticsView {
  constructor(root, { onRanges, onError }) {
    this.root = root;
    this.onRanges = onRanges;
    this.onError = onError;
    this.run = null;
    this.layer = null;
    this.tensors = [];     // the layer's tensors from the topology: {name, kind}
    this.ranges = [];
    this.matrix = null;    // the last /histograms?matrix=1 answer drawn
    this.optimizer = null;
    this.distChart = null;
    this.updateChart = null;
    this.updateParam = null;
    this.$ = (sel) => root.querySelector(sel);
    this.$('#dist-kind').addEventListener('change', () => this.fillTensors(true));
    this.$('#dist-tensor').addEventListener('change', () => this.loadMatrix().catch((e) => this.onError(e.message)));
    this.$('#range-form').addEventListener('submit', (e) => {
      e.preventDefault();
      this.setRange().catch((err) => this.status(err.message, true));
    });
  }

  attach(echarts) {
    this.distChart = echarts.init(this.$('#distribution'), 'dark');
    this.updateChart = echarts.init(this.$('#update-histogram'), 'dark');
    new ResizeObserver(() => { this.distChart.resize(); this.updateChart.resize(); }).observe(this.root);
    if (this.matrix) this.drawMatrix();
    if (this.optimizer) this.drawUpdate();
  }

  base() {
    return `/api/v1/runs/${enc(this.run)}`;
  }

  reset(run) {
    this.run = run;
    this.layer = null;
    this.matrix = null;
    this.optimizer = null;
    this.ranges = [];
    this.distChart?.clear();
    this.updateChart?.clear();
    this.$('#tensor-stats tbody').replaceChildren();
    this.$('#optimizer-table tbody').replaceChildren();
    this.$('#optimizer-note').textContent = '';
    this.renderRanges();
    if (run) this.loadRanges().catch((e) => this.onError(e.message));
  }

  // -- the selected layer --------------------------------------------------------------------------

  select(layer, tensors) {
    this.layer = layer;
    this.tensors = tensors.filter((t) => KINDS.includes(t.kind));
    this.$('#stats-layer').textContent = layer;
    const kinds = KINDS.filter((k) => this.tensors.some((t) => t.kind === k));
    const kindSelect = this.$('#dist-kind');
    const was = kindSelect.value;
    kindSelect.replaceChildren(...kinds.map((k) => Object.assign(document.createElement('option'), { value: k, textContent: k.replace('_', ' ') })));
    kindSelect.value = kinds.includes(was) ? was : (kinds.includes('gradient') ? 'gradient' : kinds[0] || '');
    this.fillTensors(false);  // refresh() loads its matrix
    return this.refresh();
  }

  fillTensors(load) {
    const kind = this.$('#dist-kind').value;
    const select = this.$('#dist-tensor');
    const names = this.tensors.filter((t) => t.kind === kind).map((t) => t.name);
    select.replaceChildren(...names.map((n) => Object.assign(document.createElement('option'), { value: n, textContent: n })));
    select.value = names.find((n) => /\.weight(\.grad)?$/.test(n)) || names[0] || '';
    if (load) this.loadMatrix().catch((e) => this.onError(e.message));
  }

  // Everything of the selected layer, again (a live update brought new steps).
  async refresh() {
    if (!this.run || !this.layer) return;
    await Promise.all([this.loadMatrix(), this.loadTensors(), this.loadOptimizer()]);
  }

  // -- distribution over steps ---------------------------------------------------------------------

  async loadMatrix() {
    const run = this.run;
    const tensor = this.$('#dist-tensor').value;
    const kind = this.$('#dist-kind').value;
    if (!tensor || !kind) {
      this.matrix = null;
      this.distChart?.clear();
      this.$('#dist-info').textContent = 'no histogrammed tensor';
      return;
    }
    const data = await api(`${this.base()}/histograms?tensor=${enc(tensor)}&kind=${enc(kind)}&matrix=1&columns=${COLUMNS}`);
    if (run !== this.run || tensor !== this.$('#dist-tensor').value || kind !== this.$('#dist-kind').value) return;
    this.matrix = { ...data, tensor, kind };
    this.drawMatrix();
  }

  // [column, bucket row, fraction] cells of the matrix, the non-empty ones; rows relative to the lowest bucket.
  cells() {
    const m = this.matrix;
    const out = [];
    (m?.values || []).forEach((col, x) => col.forEach((v, y) => { if (v > 0) out.push([x, y, v]); }));
    return out;
  }

  drawMatrix() {
    const m = this.matrix;
    const cols = m?.values?.length || 0;
    const info = this.$('#dist-info');
    if (!cols) {
      info.textContent = m ? `${m.tensor}: no histograms yet` : '';
      this.distChart?.clear();
      return;
    }
    const buckets = Math.max(0, ...m.values.map((c) => c.length));
    const nonfinite = (m.nonfinite_fraction || []).some((f) => f > 0);
    info.textContent = `${cols} columns · steps ${m.steps[0]}–${m.last_steps?.at(-1) ?? m.steps.at(-1)}${nonfinite ? ' · NaN/Inf present' : ''}`;
    if (!this.distChart) return;
    const data = this.cells();
    const hi = Math.max(...data.map((d) => d[2]), 1e-9);
    // Below the buckets a row of exact zeros (grey), above them one of NaN/Inf (red): fractions of all elements.
    const labels = ['0', ...Array.from({ length: buckets }, (_, j) => `2^${m.offset + j - BUCKET_BIAS}`), 'NaN/Inf'];
    for (const d of data) d[1] += 1;
    const extra = [];
    m.steps.forEach((_, x) => {
      if (m.zero_fraction?.[x] > 0) extra.push({ value: [x, 0, m.zero_fraction[x]], itemStyle: { color: '#8a93a3' } });
      if (m.nonfinite_fraction?.[x] > 0) extra.push({ value: [x, buckets + 1, m.nonfinite_fraction[x]], itemStyle: { color: '#ff1744' } });
    });
    const steps = m.steps.map((s, i) => (m.last_steps && m.last_steps[i] !== s ? `${s}–${m.last_steps[i]}` : String(s)));
    this.distChart.setOption({
      backgroundColor: 'transparent',
      animation: false,
      title: { text: `${m.tensor} · ${m.kind}`, left: 'center', top: 0, textStyle: { fontSize: 12, color: '#c8ccd4' } },
      tooltip: {
        formatter: (p) => {
          const [x, y, v] = p.value || p.data;
          const what = y === 0 ? 'exactly 0' : (y === buckets + 1 ? 'NaN/Inf' : `|x| in [${labels[y]}, 2×${labels[y]})`);
          const of = y === 0 || y === buckets + 1 ? 'of all values' : `of the ${m.counts[x]} finite non-zero values`;
          return `step ${steps[x]}<br>${what}<br>${(100 * v).toFixed(1)}% ${of}`;
        },
      },
      grid: { left: 56, right: 56, top: 26, bottom: 30 },
      xAxis: { type: 'category', data: steps, name: 'step', ...AXIS, axisLabel: { color: '#c8ccd4', fontSize: 10 } },
      yAxis: { type: 'category', data: labels, name: '|x|', ...AXIS, axisLabel: { color: '#c8ccd4', fontSize: 10 } },
      visualMap: { seriesIndex: 0, min: 0, max: hi, calculable: false, orient: 'vertical', right: 4, top: 30, bottom: 30, itemWidth: 8,
                   inRange: { color: PALETTE }, textStyle: { color: '#c8ccd4', fontSize: 10 }, formatter: (v) => `${(100 * v).toFixed(0)}%` },
      series: [{ id: 'distribution', type: 'heatmap', data, progressive: 0 },
               { id: 'special', type: 'heatmap', data: extra, progressive: 0 }],
    }, { notMerge: true });
  }

  // -- per-tensor figures --------------------------------------------------------------------------

  async loadTensors() {
    const run = this.run;
    const layer = this.layer;
    const data = await api(`${this.base()}/tensors?layer=${enc(layer)}&limit=500`);
    if (run !== this.run || layer !== this.layer) return;
    const rows = data.tensors.map((t) => {
      const tr = document.createElement('tr');
      tr.dataset.tensor = t.name;
      tr.dataset.kind = t.kind;
      tr.innerHTML = `<td class="name" title="${esc(t.name)}">${esc(t.name)}</td><td class="kind">${esc(SHORT_KIND[t.kind] || t.kind)}</td>`
        + ['mean', 'std', 'min', 'max', 'norm'].map((k) => cell(t[k])).join('')
        + countCell(t.nan) + countCell(t.inf);
      return tr;
    });
    this.$('#tensor-stats tbody').replaceChildren(...rows);
    this.$('#tensor-stats-info').textContent = data.step === null || data.step === undefined ? '' : `step ${data.step}`;
  }

  // -- optimizer -----------------------------------------------------------------------------------

  async loadOptimizer() {
    const run = this.run;
    const layer = this.layer;
    const data = await api(`${this.base()}/optimizer?layer=${enc(layer)}&limit=100`);
    if (run !== this.run || layer !== this.layer) return;
    this.optimizer = data;
    const params = data.parameters || [];
    const hasUpdate = params.some((p) => p.update);
    const notes = [];
    if (!params.length) notes.push('no optimizer state or updates for this layer: needs optimizer_state:on, and updates:on or full');
    else if (!hasUpdate) notes.push('no update |Δw|: needs updates:on or full');
    if (params.length && !params.some((p) => Object.keys(p.states || {}).length)) notes.push('no optimizer state: needs optimizer_state:on');
    this.$('#optimizer-note').textContent = notes.join(' · ');
    this.$('#optimizer-info').textContent = data.learning_rate === null || data.learning_rate === undefined ? '' : `lr ${fmt(num(data.learning_rate))}`;
    if (!params.some((p) => p.parameter === this.updateParam && p.update)) this.updateParam = params.find((p) => p.update)?.parameter || null;
    const state = (p, k) => p.states?.[k] || p.states?.[k === 'exp_avg' ? 'momentum_buffer' : '__none'];
    const rows = params.map((p) => {
      const tr = document.createElement('tr');
      tr.dataset.parameter = p.parameter;
      tr.className = p.parameter === this.updateParam ? 'current' : '';
      tr.innerHTML = `<td class="name" title="${esc(p.parameter)}">${esc(p.parameter)}</td>`
        + cell(state(p, 'exp_avg')?.norm ?? null) + cell(p.states?.exp_avg_sq?.norm ?? null)
        + cell(p.update?.rms ?? null) + cell(p.update?.ratio ?? null) + cell(p.adam_step_estimate ?? null);
      if (p.update) tr.addEventListener('click', () => { this.updateParam = p.parameter; this.loadOptimizer().catch((e) => this.onError(e.message)); });
      return tr;
    });
    this.$('#optimizer-table tbody').replaceChildren(...rows);
    this.drawUpdate();
  }

  drawUpdate() {
    const p = (this.optimizer?.parameters || []).find((q) => q.parameter === this.updateParam);
    const h = p?.update?.histogram;
    if (!this.updateChart) return;
    if (!h || !h.counts?.length) {
      this.updateChart.clear();
      return;
    }
    const labels = h.counts.map((_, j) => `2^${h.offset + j - BUCKET_BIAS}`);
    this.updateChart.setOption({
      backgroundColor: 'transparent',
      animation: false,
      title: { text: `|Δw| of ${p.parameter}`, left: 'center', top: 0, textStyle: { fontSize: 11, color: '#c8ccd4' } },
      tooltip: { trigger: 'axis' },
      grid: { left: 44, right: 8, top: 22, bottom: 24 },
      xAxis: { type: 'category', data: labels, ...AXIS, axisLabel: { color: '#c8ccd4', fontSize: 9 } },
      yAxis: { type: 'value', name: 'count', ...AXIS },
      series: [{ id: 'update', type: 'bar', data: h.counts, barCategoryGap: '8%', itemStyle: { color: '#35b779' } }],
    }, { notMerge: true });
  }

  // -- valid ranges --------------------------------------------------------------------------------

  async loadRanges() {
    const run = this.run;
    const data = await api(`${this.base()}/ranges`);
    if (run !== this.run) return;
    this.ranges = data.ranges || [];
    this.renderRanges();
  }

  renderRanges() {
    const ul = this.$('#ranges');
    ul.replaceChildren(...this.ranges.map((r) => {
      const li = document.createElement('li');
      li.dataset.metric = r.metric;
      li.innerHTML = `<span class="metric">${esc(r.metric)}</span> <span class="muted">[${esc(r.min === null ? '−∞' : fmt(num(r.min)))}, `
        + `${esc(r.max === null ? '+∞' : fmt(num(r.max)))}]</span> `;
      const del = Object.assign(document.createElement('button'), { type: 'button', textContent: '×', title: `remove the range of ${r.metric}` });
      del.className = 'delete';
      del.addEventListener('click', () => this.deleteRange(r.metric).catch((e) => this.status(e.message, true)));
      li.append(del);
      return li;
    }));
    if (!this.ranges.length) ul.innerHTML = '<li class="muted">no valid ranges</li>';
  }

  status(text, bad = false) {
    const el = this.$('#range-status');
    el.textContent = text;
    el.className = bad ? 'bad' : 'muted';
  }

  async setRange() {
    const metric = this.$('#range-metric').value.trim();
    const parse = (s) => (s.trim() === '' ? null : Number(s));
    const min = parse(this.$('#range-min').value);
    const max = parse(this.$('#range-max').value);
    if (!metric) throw new Error('name a metric');
    if (min === null && max === null) throw new Error('give a minimum, a maximum or both');
    if ((min !== null && !Number.isFinite(min)) || (max !== null && !Number.isFinite(max))) throw new Error('not a number');
    await write('POST', `${this.base()}/ranges`, { metric, min, max });
    this.status(`range of ${metric} set`);
    await this.loadRanges();
    await this.onRanges(this.ranges);
  }

  async deleteRange(metric) {
    await write('DELETE', `${this.base()}/ranges?metric=${enc(metric)}`);
    this.status(`range of ${metric} removed`);
    await this.loadRanges();
    await this.onRanges(this.ranges);
  }
}
