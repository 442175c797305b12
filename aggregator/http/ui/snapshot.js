// On-demand snapshots of the selected layer: POST the request, poll the run's snapshot listing until the
// agent's answer arrives (captured at its next logged step), then draw it: a heatmap of |W|, a grid of
// feature maps, per-channel importance as bars, a 2-D PCA projection as a scatter. Polling the listing,
// not /snapshots/{id}, keeps the console free of a 404 per poll.

import { API_TOKEN_KEY, ApiError, api, esc, fmt, num, PALETTE, READ_TOKEN_KEY } from './util.js';

const AXIS = { axisLine: { lineStyle: { color: '#5c6370' } }, splitLine: { lineStyle: { color: '#2c313a' } } };
const POLL_MS = 1000;
const TIMEOUT_MS = 60_000;

// POST with the API token kept in sessionStorage (else the read token: a loopback-only aggregator without an
// API token takes what its reads take); on a 401, or the read token refused for a write (403 read_only), ask
// for the API token and retry. Any other refusal (no API token configured beyond loopback) is shown as it is.
async function post(path, body) {
  for (;;) {
    const apiToken = sessionStorage.getItem(API_TOKEN_KEY);
    const token = apiToken || sessionStorage.getItem(READ_TOKEN_KEY);
    const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    const resp = await fetch(path, { method: 'POST', headers, body: JSON.stringify(body) });
    const readOnly = resp.status === 403 && (await resp.clone().json().catch(() => ({}))).errorType === 'read_only';
    if (resp.status !== 401 && !readOnly) return api(path, Promise.resolve(resp));
    sessionStorage.removeItem(API_TOKEN_KEY);
    const given = window.prompt(`${apiToken ? 'The API token was refused. ' : ''}This aggregator needs its API token `
      + '(GRADWATCH_AGGREGATOR_API_TOKEN) to take snapshots:');
    if (!given?.trim()) throw new ApiError('snapshot not requested: the aggregator needs its API token');
    sessionStorage.setItem(API_TOKEN_KEY, given.trim());
  }
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

export class SnapshotView {
  constructor(panel, echarts) {
    this.panel = panel;
    this.status = panel.querySelector('.status');
    this.chart = echarts.init(panel.querySelector('.chart'), 'dark');
    this.shown = null;     // the snapshot drawn
    this.pending = null;   // {run, kind, tensor, id} while waiting
    new ResizeObserver(() => this.chart.resize()).observe(panel.querySelector('.chart'));
    panel.querySelector('.close').addEventListener('click', () => {
      this.panel.hidden = true;
      this.pending = null;  // stops the polling
    });
  }

  setStatus(text, bad = false) {
    this.status.textContent = text;
    this.status.classList.toggle('bad', bad);
  }

  open() {
    this.panel.hidden = false;
    this.chart.resize();
  }

  // Request a snapshot of `tensor` and wait for it; resolves once it is drawn, failed or timed out. A newer
  // request supersedes a pending one.
  async take(run, kind, tensor) {
    const base = `/api/v1/runs/${encodeURIComponent(run)}/snapshots`;
    const me = { run, kind, tensor, id: null };
    this.pending = me;
    this.shown = null;
    this.open();
    this.chart.clear();
    this.panel.querySelector('.meta').textContent = `${kind.replaceAll('_', ' ')} · ${tensor}`;
    this.setStatus(`requesting ${kind} of ${tensor}…`);
    try {
      me.id = (await post(base, { kind, tensor })).id;
    } catch (e) {
      if (this.pending === me) {
        this.pending = null;
        this.setStatus(e.message, true);
      }
      return;
    }
    const started = performance.now();
    while (this.pending === me) {
      const waited = performance.now() - started;
      if (waited > TIMEOUT_MS) {
        this.setStatus(`no snapshot after ${TIMEOUT_MS / 1000} s: the agent takes it at its next logged step; is the run still training?`, true);
        break;
      }
      this.setStatus(`pending: ${kind} of ${tensor}, waiting for the next logged step (${Math.round(waited / 1000)} s)`);
      try {
        const { snapshots } = await api(base);
        if (this.pending === me && snapshots.some((s) => s.id === me.id)) {
          const snap = await api(`${base}/${encodeURIComponent(me.id)}`);
          if (this.pending === me) this.show(snap);
          break;
        }
      } catch (e) {
        if (this.pending === me) this.setStatus(e.message, true);  // a passing outage: keep polling
      }
      await sleep(POLL_MS);
    }
    if (this.pending === me) this.pending = null;
  }

  show(snap) {
    this.shown = snap;
    this.open();
    const title = `${snap.kind.replaceAll('_', ' ')} · ${snap.tensor} · step ${snap.step}` +
      `${snap.rank ? ` · rank ${snap.rank}` : ''} · shape [${snap.shape.join(' × ')}]`;
    this.panel.querySelector('.meta').textContent = title;
    this.chart.clear();
    if (snap.error) {
      this.setStatus(snap.error, true);
      return;
    }
    const option = { weight_heatmap: heatmaps, feature_maps: heatmaps, channel_importance: bars, projection: scatter }[snap.kind];
    if (!option) {
      this.setStatus(`cannot draw a ${snap.kind} snapshot`, true);
      return;
    }
    this.setStatus('');
    const values = snap.values.map(num);
    this.chart.setOption({ backgroundColor: 'transparent', animation: false, ...option(snap, values) });
  }
}

function heatmaps(snap, values) {
  const { maps, rows, cols } = snap;
  const finite = values.filter(Number.isFinite);
  const across = Math.ceil(Math.sqrt(maps));
  const down = Math.ceil(maps / across);
  const grid = [], xAxis = [], yAxis = [], series = [];
  for (let m = 0; m < maps; m++) {
    const left = 4 + (m % across) * (80 / across);
    const top = 4 + Math.floor(m / across) * (92 / down);
    grid.push({ left: `${left}%`, top: `${top}%`, width: `${80 / across - 2}%`, height: `${92 / down - 3}%` });
    const axis = (n, i) => ({ type: 'category', gridIndex: i, data: [...Array(n).keys()], show: maps === 1, ...AXIS,
                              splitLine: { show: false } });
    xAxis.push(axis(cols, m));
    yAxis.push({ ...axis(rows, m), inverse: true });
    const data = [];
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const v = values[(m * rows + r) * cols + c];
        if (Number.isFinite(v)) data.push([c, r, v]);
      }
    }
    series.push({ type: 'heatmap', name: maps > 1 ? `channel ${m}` : snap.tensor, xAxisIndex: m, yAxisIndex: m,
                  data, progressive: 0 });
  }
  return {
    tooltip: { formatter: (p) => `${esc(p.seriesName)}<br>row ${p.data[1]}, col ${p.data[0]}: ${fmt(p.data[2])}` },
    grid, xAxis, yAxis, series,
    visualMap: { type: 'continuous', min: Math.min(...finite, 0), max: Math.max(...finite, 1e-12), calculable: true,
                 right: 0, top: 'center', itemHeight: 120, formatter: (v) => fmt(v), textStyle: { color: '#c8ccd4' }, inRange: { color: PALETTE },
                 seriesIndex: series.map((_, i) => i) },
  };
}

function bars(snap, values) {
  return {
    tooltip: { trigger: 'axis', valueFormatter: (v) => fmt(v) },
    grid: { left: 56, right: 16, top: 16, bottom: 46 },
    xAxis: { type: 'category', name: 'channel', data: values.map((_, i) => i), ...AXIS },
    yAxis: { type: 'value', name: '|grad × act|', ...AXIS },
    dataZoom: [{ type: 'inside' }, { type: 'slider', height: 14, bottom: 6 }],
    series: [{ type: 'bar', name: 'importance', data: values.map((v) => (Number.isFinite(v) ? v : null)), color: PALETTE[5] }],
  };
}

function scatter(snap, values) {
  const data = [];
  for (let i = 0; i < snap.rows; i++) {
    const [x, y] = [values[2 * i], values[2 * i + 1]];
    if (Number.isFinite(x) && Number.isFinite(y)) data.push({ value: [x, y], name: snap.labels[i] || `row ${i}` });
  }
  return {
    tooltip: { formatter: (p) => `<b>${esc(p.name)}</b><br>${fmt(p.value[0])}, ${fmt(p.value[1])}` },
    grid: { left: 56, right: 16, top: 16, bottom: 30 },
    xAxis: { type: 'value', name: 'PC1', scale: true, ...AXIS },
    yAxis: { type: 'value', name: 'PC2', scale: true, ...AXIS },
    series: [{ type: 'scatter', data, symbolSize: 5, color: PALETTE[7] }],
  };
}
