// The live view's ECharts plots: loss and metric curves (train versus validation, alerts marked) and a
// tensor's log2-magnitude histogram over time with a play control. (The heatmap is heatmap.js: a canvas.)
// Both keep their data from the start and draw once `attach(echarts)` gave them a chart: the page loads the
// charting library after its first render (app.js).

import { esc, fmt, num, PALETTE } from './util.js';

const AXIS = { axisLine: { lineStyle: { color: '#5c6370' } }, splitLine: { lineStyle: { color: '#2c313a' } } };
const MAX_CURVE_POINTS = 20000;

function zoom(xIndex = 0, extra = {}) {
  return [{ type: 'inside', xAxisIndex: xIndex, ...extra }, { type: 'slider', xAxisIndex: xIndex, height: 16, bottom: 6, ...extra }];
}

export class Curves {
  constructor(el) {
    this.el = el;
    this.chart = null;
    this.reset();
  }

  attach(echarts) {
    this.chart = echarts.init(this.el, 'dark');
    new ResizeObserver(() => this.chart.resize()).observe(this.el);
    this.dirty = true;
    this.render();
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

  lastStep() {
    let last = null;
    for (const r of this.rows.values()) if (last === null || r.step > last) last = r.step;
    return last;
  }

  // The steps /steps marked out of their valid range, as points on the curve of the metric that left it:
  // [[step, value, metric], ...] on the loss axis (loss, eval_loss, grad_norm and per-layer norms drawn at
  // the step's loss) and on the metric axis (user scalars).
  outOfRange() {
    const loss = [];
    const metric = [];
    for (const r of this.rows.values()) {
      for (const m of r.out_of_range || []) {
        const scalar = num(r.scalars?.[m]);
        if (scalar !== undefined && scalar !== null) metric.push([r.step, Number.isFinite(scalar) ? scalar : null, m, r.phase]);
        else {
          const v = num(r.loss);
          loss.push([r.step, Number.isFinite(v) ? v : null, m, r.phase]);
        }
      }
    }
    const order = (a, b) => a[0] - b[0];
    return { loss: loss.sort(order), metric: metric.sort(order) };
  }

  // The out-of-range steps as spans [[first, last], ...] of neighbouring steps (no in-range step between),
  // shaded on the curves: also where the value is NaN and no point can be drawn.
  outOfRangeSpans() {
    const steps = [...new Set([...this.rows.values()].map((r) => r.step))].sort((a, b) => a - b);
    const bad = new Set([...this.rows.values()].filter((r) => r.out_of_range?.length).map((r) => r.step));
    const spans = [];
    for (const s of steps) {
      if (!bad.has(s)) { spans.open = false; continue; }
      if (spans.open) spans[spans.length - 1][1] = s;
      else { spans.push([s, s]); spans.open = true; }
    }
    return spans.map(([a, b]) => [a, b]);
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
    if (!this.dirty || !this.chart) return;
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
    const outside = this.outOfRange();
    const marks = [['out of range', outside.loss, 0], ['out of range (metric)', outside.metric, 1]];
    for (const [name, data, axis] of marks) {
      if (!data.length) continue;
      series.push({
        name, id: name, type: 'scatter', data, yAxisIndex: axis, symbolSize: 7, z: 5, color: '#ff1744',
        tooltip: { trigger: 'item', formatter: (p) => `step ${p.data[0]} (${p.data[3]}): ${esc(p.data[2])} out of range` },
      });
    }
    const spans = this.outOfRangeSpans();
    if (spans.length) {
      series.push({
        name: 'out-of-range steps', id: 'out-of-range steps', type: 'line', data: [], silent: true,
        markArea: { silent: true, itemStyle: { color: 'rgba(255, 23, 68, 0.12)' },
                    data: spans.map(([a, b]) => [{ xAxis: a === b ? a - 0.5 : a }, { xAxis: a === b ? b + 0.5 : b }]) },
      });
    }
    const selected = Object.fromEntries([...named.keys()].map((n) => [n, n.endsWith(' loss') || /acc/i.test(n)]));
    for (const [name, data] of marks) if (data.length) selected[name] = true;
    if (spans.length) selected['out-of-range steps'] = true;
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

const BUCKET_BIAS = 40;  // bucket i holds floor(log2|x|) = i - 40

export class HistogramPlayer {
  constructor(el, { slider, play, label }) {
    this.el = el;
    this.chart = null;
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
  }

  attach(echarts) {
    this.chart = echarts.init(this.el, 'dark');
    new ResizeObserver(() => this.chart.resize()).observe(this.el);
    if (this.index >= 0) this.show(this.index);
  }

  reset(title = '') {
    this.pause();
    this.frames = [];
    this.index = -1;
    this.title = title;
    this.follow = true;
    this.chart?.clear();
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
    if (!this.chart) return;
    this.chart.setOption({
      backgroundColor: 'transparent',
      animation: this.timer !== null,  // eased between frames while playing, drawn at once otherwise
      animationDurationUpdate: 120,
      title: { text: this.title, subtext: f.nonfinite && !total ? 'every value NaN/Inf' : '', left: 'center', top: 0,
               textStyle: { fontSize: 12, color: '#c8ccd4' }, subtextStyle: { color: '#ff5252' } },
      tooltip: { trigger: 'axis', formatter: (p) => `|x| in [${p[0].name}, 2×${p[0].name})<br>${p[0].value === '-' ? 0 : p[0].value} of ${total} values` },
      grid: { left: 56, right: 16, top: 40, bottom: 40 },
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
