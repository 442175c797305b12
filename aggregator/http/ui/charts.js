// The live view's plots, all ECharts: loss and metric curves (train versus validation, alerts marked),
// the layer x step heatmap of gradient norms, and a tensor's log2-magnitude histogram over time with a
// play control.

import { esc, fmt, num, PALETTE } from './util.js';

const AXIS = { axisLine: { lineStyle: { color: '#5c6370' } }, splitLine: { lineStyle: { color: '#2c313a' } } };
const MAX_CURVE_POINTS = 20000;

function zoom(xIndex = 0, extra = {}) {
  return [{ type: 'inside', xAxisIndex: xIndex, ...extra }, { type: 'slider', xAxisIndex: xIndex, height: 16, bottom: 6, ...extra }];
}

export class Curves {
  constructor(el, echarts) {
    this.chart = echarts.init(el, 'dark');
    this.reset();
    new ResizeObserver(() => this.chart.resize()).observe(el);
  }

  reset() {
    this.rows = new Map();  // `${phase}:${step}` -> row
    this.alerts = [];
    this.dirty = true;
  }

  append(rows) {
    for (const r of rows) this.rows.set(`${r.phase}:${r.step}`, r);
    if (this.rows.size > MAX_CURVE_POINTS) {
      const keys = [...this.rows.keys()].slice(0, this.rows.size - MAX_CURVE_POINTS);
      for (const k of keys) this.rows.delete(k);
    }
    this.dirty = true;
  }

  setAlerts(alerts) {
    this.alerts = alerts.filter((a) => a.status === 'firing');
    this.dirty = true;
  }

  // Named series, each [[step, value], ...] in step order.
  series() {
    const out = new Map();
    const add = (name, step, v) => {
      if (v === null || v === undefined) return;
      if (!out.has(name)) out.set(name, []);
      out.get(name).push([step, Number.isFinite(v) ? v : null]);
    };
    const rows = [...this.rows.values()].sort((a, b) => a.step - b.step);
    for (const r of rows) {
      const phase = r.phase === 'eval' ? 'validation' : 'train';
      add(`${phase} loss`, r.step, num(r.loss));
      for (const [k, v] of Object.entries(r.scalars || {})) add(`${phase} ${k}`, r.step, num(v));
    }
    return out;
  }

  render() {
    if (!this.dirty) return;
    this.dirty = false;
    const named = this.series();
    const losses = [...named].filter(([n]) => n.endsWith(' loss')).flatMap(([, d]) => d.map((p) => p[1]));
    const positive = losses.length > 0 && losses.every((v) => v === null || v > 0);
    const spread = positive ? Math.max(...losses.filter((v) => v !== null)) / Math.min(...losses.filter((v) => v !== null)) : 1;
    const series = [...named].map(([name, data], i) => {
      const loss = name.endsWith(' loss');
      const validation = name.startsWith('validation');
      return {
        name, type: 'line', data, yAxisIndex: loss ? 0 : 1, showSymbol: validation, symbolSize: 5,
        connectNulls: false, sampling: 'lttb', lineStyle: { width: validation ? 2 : 1.5, type: loss ? 'solid' : 'dashed' },
        color: PALETTE[(loss ? (validation ? 8 : 4) : (validation ? 6 : 2) + (i % 2))],
        markLine: i === 0 && this.alerts.length ? {
          symbol: 'none', silent: false,
          lineStyle: { color: '#ff1744', type: 'dotted', width: 1.5 },
          label: { formatter: (p) => p.data.gw, color: '#ff8a80', fontSize: 10, position: 'insideEndTop' },
          data: this.alerts.map((a) => ({ xAxis: a.step, gw: `${a.rule} · ${a.layer}` })),
        } : undefined,
      };
    });
    const selected = Object.fromEntries([...named.keys()].map((n) => [n, n.endsWith(' loss') || /acc/i.test(n)]));
    this.chart.setOption({
      backgroundColor: 'transparent',
      animation: false,
      legend: { top: 0, left: 0, right: 0, type: 'scroll', selected, textStyle: { color: '#c8ccd4' } },
      tooltip: { trigger: 'axis', valueFormatter: (v) => fmt(v) },
      grid: { left: 56, right: 48, top: 52, bottom: 46 },
      xAxis: { type: 'value', name: 'step', nameLocation: 'end', min: 'dataMin', max: 'dataMax', ...AXIS },
      yAxis: [{ type: positive && spread > 100 ? 'log' : 'value', name: 'loss', scale: true, ...AXIS },
              { type: 'value', name: 'metric', scale: true, ...AXIS, splitLine: { show: false } }],
      dataZoom: zoom(0, { filterMode: 'none' }),
      series,
    }, { replaceMerge: ['series'] });
  }
}

export class Heatmap {
  constructor(el, echarts, { onSelect } = {}) {
    this.chart = echarts.init(el, 'dark');
    this.onSelect = onSelect;
    this.chart.on('click', (p) => {
      if (p.componentType === 'series' && this.onSelect) this.onSelect(this.layers[p.data[1]]);
    });
    this.reset();
    new ResizeObserver(() => this.chart.resize()).observe(el);
  }

  reset() {
    this.layers = [];
    this.steps = [];
    this.values = [];
    this.maxSteps = 0;
  }

  // data: {layers, steps, values} from /heatmap; appended when the layers are the same.
  add(data) {
    if (!data.layers.length) return;
    if (data.layers.join('\n') !== this.layers.join('\n')) this.reset();
    this.layers = data.layers;
    this.maxSteps = Math.max(20, Math.floor(60000 / data.layers.length));
    const last = this.steps.length ? this.steps[this.steps.length - 1] : -Infinity;
    data.steps.forEach((s, i) => {
      if (s > last) {
        this.steps.push(s);
        this.values.push(data.values[i]);
      }
    });
    const extra = this.steps.length - this.maxSteps;
    if (extra > 0) {
      this.steps.splice(0, extra);
      this.values.splice(0, extra);
    }
    this.render();
  }

  get lastStep() {
    return this.steps.length ? this.steps[this.steps.length - 1] : null;
  }

  render() {
    const finite = [];
    const bad = [];
    const zero = [];  // a gradient of exactly zero (a NaN/Inf one reads NaN or +Inf: red, in `bad`)
    let lo = Infinity, hi = -Infinity;
    this.values.forEach((row, x) => row.forEach((raw, y) => {
      const v = num(raw);
      if (v === null || v === undefined) return;
      if (!Number.isFinite(v)) {
        bad.push([x, y, 1, String(raw)]);
      } else if (v > 0) {
        const l = Math.log10(v);
        lo = Math.min(lo, l);
        hi = Math.max(hi, l);
        finite.push([x, y, l, l]);  // colour value, true value
      } else {
        zero.push([x, y, 1]);
      }
    }));
    if (!finite.length) { lo = 0; hi = 1; }
    // Colours span the 1st to 99th percentile: one exploding step must not flatten every other cell.
    if (finite.length > 100) {
      const sorted = finite.map((c) => c[2]).sort((a, b) => a - b);
      lo = sorted[Math.floor(0.01 * (sorted.length - 1))];
      hi = sorted[Math.ceil(0.99 * (sorted.length - 1))];
      if (hi <= lo) hi = lo + 1;
      for (const c of finite) c[2] = Math.min(hi, Math.max(lo, c[3]));
    }
    const many = this.layers.length > 60;
    this.chart.setOption({
      backgroundColor: 'transparent',
      animation: false,
      tooltip: {
        formatter: (p) => {
          const v = p.seriesId === 'nonfinite' ? p.data[3] : p.seriesId === 'zero' ? '0' : fmt(10 ** p.data[3]);
          return `<b>${esc(this.layers[p.data[1]])}</b><br>step ${this.steps[p.data[0]]}: gradient norm ${v}`;
        },
      },
      grid: { left: many ? 40 : 110, right: 70, top: 10, bottom: 46 },
      xAxis: { type: 'category', data: this.steps, name: 'step', ...AXIS, splitLine: { show: false } },
      yAxis: { type: 'category', data: this.layers, inverse: true, ...AXIS, splitLine: { show: false },
               axisLabel: { show: !many, color: '#c8ccd4', fontSize: 10 } },
      visualMap: [
        { type: 'continuous', seriesIndex: 0, dimension: 2, min: lo, max: hi, calculable: true, right: 0, top: 'center',
          itemHeight: 120, text: ['log₁₀', ''], textStyle: { color: '#c8ccd4' }, inRange: { color: PALETTE } },
        // NaN/Inf cells: a heatmap takes its colours from a visual map only.
        { type: 'piecewise', seriesIndex: 1, dimension: 2, show: false, pieces: [{ min: 0, max: 2, color: '#ff1744' }] },
        { type: 'piecewise', seriesIndex: 2, dimension: 2, show: false, pieces: [{ min: 0, max: 2, color: '#4a5160' }] },
      ],
      dataZoom: [{ type: 'inside', xAxisIndex: 0 }, { type: 'inside', yAxisIndex: 0 },
                 { type: 'slider', xAxisIndex: 0, height: 14, bottom: 6 }],
      series: [
        // Drawn in one pass (the cells are capped at 60,000): no half-drawn heatmap between updates.
        { id: 'finite', type: 'heatmap', data: finite, progressive: 0, emphasis: { itemStyle: { borderColor: '#fff', borderWidth: 1 } } },
        { id: 'nonfinite', type: 'heatmap', data: bad, progressive: 0 },
        { id: 'zero', type: 'heatmap', data: zero, progressive: 0 },
      ],
    });
  }
}

const BUCKET_BIAS = 40;  // bucket i holds floor(log2|x|) = i - 40

export class HistogramPlayer {
  constructor(el, echarts, { slider, play, label }) {
    this.chart = echarts.init(el, 'dark');
    this.slider = slider;
    this.playButton = play;
    this.label = label;
    this.frames = [];
    this.index = -1;
    this.timer = null;
    this.follow = true;  // show each new frame as it arrives, unless the user moved the slider
    slider.addEventListener('input', () => {
      this.follow = Number(slider.value) === this.frames.length - 1;
      this.show(Number(slider.value));
    });
    play.addEventListener('click', () => (this.timer ? this.pause() : this.play()));
    new ResizeObserver(() => this.chart.resize()).observe(el);
  }

  reset(title = '') {
    this.pause();
    this.frames = [];
    this.index = -1;
    this.title = title;
    this.follow = true;
    this.chart.clear();
    this.slider.max = 0;
    this.slider.value = 0;
    this.label.textContent = 'no frames yet';
  }

  add(frames) {
    const last = this.frames.length ? this.frames[this.frames.length - 1].step : -Infinity;
    for (const f of frames) if (f.step > last) this.frames.push(f);
    const spans = this.frames.filter((f) => f.counts.length);
    this.lo = spans.length ? Math.min(...spans.map((f) => f.offset)) : 40;
    this.hi = spans.length ? Math.max(...spans.map((f) => f.offset + f.counts.length - 1)) : 40;
    this.slider.max = Math.max(0, this.frames.length - 1);
    if (this.frames.length && (this.follow || this.index < 0) && !this.timer) this.show(this.frames.length - 1);
  }

  show(i) {
    const f = this.frames[i];
    if (!f) return;
    this.index = i;
    this.slider.value = i;
    const labels = [];
    const data = [];
    for (let b = this.lo; b <= this.hi; b++) {
      labels.push(`2^${b - BUCKET_BIAS}`);
      const c = f.counts[b - f.offset] || 0;
      data.push(c > 0 ? c : '-');
    }
    const total = f.counts.reduce((a, b) => a + b, 0);
    this.label.textContent = `step ${f.step} · frame ${i + 1}/${this.frames.length}` + (f.nonfinite ? ` · ${f.nonfinite} NaN/Inf` : '');
    this.chart.setOption({
      backgroundColor: 'transparent',
      animation: this.timer !== null,  // eased between frames while playing, drawn at once otherwise
      animationDurationUpdate: 120,
      title: { text: this.title, subtext: f.nonfinite && !total ? 'every value NaN/Inf' : '', left: 'center', top: 0,
               textStyle: { fontSize: 12, color: '#c8ccd4' }, subtextStyle: { color: '#ff5252' } },
      tooltip: { trigger: 'axis', formatter: (p) => `|x| in [${p[0].name}, 2×${p[0].name})<br>${p[0].value === '-' ? 0 : p[0].value} of ${total} values` },
      grid: { left: 56, right: 16, top: 28, bottom: 40 },
      xAxis: { type: 'category', data: labels, name: '|x|', ...AXIS, axisLabel: { color: '#c8ccd4', fontSize: 10 } },
      yAxis: { type: 'log', name: 'count', min: 1, ...AXIS },
      series: [{ id: 'hist', type: 'bar', data, barCategoryGap: '8%', itemStyle: { color: f.nonfinite ? '#ff5252' : '#26828e' } }],
    });
  }

  play() {
    if (this.frames.length < 2) return;
    if (this.index >= this.frames.length - 1) this.index = -1;
    this.playButton.textContent = '⏸';
    this.timer = setInterval(() => {
      if (this.index >= this.frames.length - 1) {
        this.pause();
        return;
      }
      this.show(this.index + 1);
    }, 150);
  }

  pause() {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.playButton.textContent = '▶';
    this.follow = this.index === this.frames.length - 1;
  }
}
