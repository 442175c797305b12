// The live view: picks a run, loads its topology, layer statistics, steps, alerts and histograms from
// the query API, then follows it through server-sent events (/api/v1/events). `window.gradwatch` exposes
// the state and the charts to tests and to the curious.

import { Curves, Heatmap, HistogramPlayer } from './charts.js';
import { STATS, TopologyView } from './graph.js';
import { SnapshotView } from './snapshot.js';
import { api, esc, fmt, num, PALETTE, serialized } from './util.js';

const $ = (id) => document.getElementById(id);
const echarts = window.echarts;
const STEP_ROWS = 2000;

const view = {
  run: null,
  runs: [],
  alerts: [],        // the run's alert transitions, oldest first
  layer: null,       // the selected layer
  tensor: null,      // [name, kind] shown in the histogram panel
  events: null,
  lastStep: null,
  errors: [],
  timings: { topologyLoaded: null, graphSet: null },  // ms since navigation start
};

const graph = new TopologyView($('graph'), echarts, { onSelect: (layer) => selectLayer(layer, false) });
const curves = new Curves($('curves'), echarts);
const heatmap = new Heatmap($('heatmap'), echarts, { onSelect: (layer) => selectLayer(layer, true) });
const histogram = new HistogramPlayer($('histogram'), echarts, { slider: $('frame'), play: $('play'), label: $('frame-label') });
const snapshot = new SnapshotView($('snapshot-panel'), echarts);

window.gradwatch = {
  view,
  charts: { graph: graph.chart, curves: curves.chart, heatmap: heatmap.chart, histogram: histogram.chart, snapshot: snapshot.chart },
  topology: graph,
  heatmap,
  histogram,
  curves,
  snapshot,
  ready: false,       // the current run's first full load is done
  // First paint of the graph, in ms since navigation start (null until it painted).
  firstPaint: () => graph.painted,
};

function message(text) {
  const el = $('message');
  el.hidden = !text;
  el.textContent = text || '';
  if (text) view.errors.push(text);
}

// -- runs ------------------------------------------------------------------------------------------

function renderRuns() {
  const ul = $('runs');
  ul.replaceChildren(...view.runs.map((r) => {
    const li = document.createElement('li');
    li.className = r.run === view.run ? 'current' : '';
    li.dataset.run = r.run;
    const badge = r.firing_alerts ? `<span class="badge" title="firing alerts">${r.firing_alerts}</span>` : '';
    li.innerHTML = `<div class="name">${esc(r.run)}${badge}</div>
      <div class="meta">step ${r.step ?? '–'} · loss ${fmt(num(r.loss))}</div>`;
    li.addEventListener('click', () => switchRun(r.run));
    return li;
  }));
}

function switchRun(run) {
  if (run === view.run) return;
  history.replaceState(null, '', `#run=${encodeURIComponent(run)}`);
  loadRun(run);
}

// -- one run ---------------------------------------------------------------------------------------

async function loadRun(run) {
  view.run = run;
  view.layer = null;
  view.tensor = null;
  view.lastStep = null;
  window.gradwatch.ready = false;
  renderRuns();
  connect(run);  // before the fetches: what changes meanwhile arrives as events
  curves.reset();
  heatmap.reset();
  histogram.reset();
  try {
    const pre = window.gradwatchPrefetch?.run === run ? window.gradwatchPrefetch : {};
    window.gradwatchPrefetch = null;
    const [topology, layers] = await Promise.all([
      api(`/api/v1/runs/${encodeURIComponent(run)}/topology`, pre.topology),
      api(`/api/v1/runs/${encodeURIComponent(run)}/layers?histograms=0`, pre.layers),
    ]);
    if (run !== view.run) return;
    view.timings.topologyLoaded = performance.now();
    performance.mark('gradwatch-topology-loaded');
    graph.stats.clear();
    graph.setStats(layers.layers);
    view.topology = topology;
    $('layer-names').replaceChildren(...topology.nodes.map((n) => Object.assign(document.createElement('option'), { value: n.id })));
    $('graph-info').textContent = `${topology.nodes.length} layers${topology.inferred ? ' · chained in forward order' : ''}`;
    graph.setTopology(topology);
    view.timings.graphSet = performance.now();
    renderLegend();
    // The rest after the graph's first paint has been scheduled.
    const [alerts, steps] = await Promise.all([
      api(`/api/v1/runs/${encodeURIComponent(run)}/alerts`),
      api(`/api/v1/runs/${encodeURIComponent(run)}/steps?limit=${STEP_ROWS}&layers=0`),
    ]);
    if (run !== view.run) return;
    setAlerts(alerts.alerts);
    curves.append(steps.steps);
    curves.render();
    await refreshHeatmap();
    const start = graph.origin?.layer || graph.explosion?.layer || topology.nodes[0]?.id;
    if (start) selectLayer(start, false);
    window.gradwatch.ready = true;
    message('');
  } catch (e) {
    message(`cannot load run ${run}: ${e.message}`);
  }
}

const refreshHeatmap = serialized(async () => {
  const run = view.run;
  const from = heatmap.lastStep === null ? '' : `&from=${heatmap.lastStep + 1}`;
  const data = await api(`/api/v1/runs/${encodeURIComponent(run)}/heatmap?limit=2000${from}`);
  if (run === view.run) heatmap.add(data);
});

const refreshHistogram = serialized(async () => {
  if (!view.tensor) return;
  const run = view.run;
  const [name, kind] = view.tensor;
  const last = histogram.frames.length ? histogram.frames[histogram.frames.length - 1].step + 1 : null;
  const q = `tensor=${encodeURIComponent(name)}&kind=${kind}${last === null ? '' : `&from=${last}`}`;
  const data = await api(`/api/v1/runs/${encodeURIComponent(run)}/histograms?${q}`);
  if (run === view.run && view.tensor && view.tensor[0] === name && view.tensor[1] === kind) histogram.add(data.frames);
});

function selectLayer(layer, focus) {
  if (!layer) return;
  view.layer = layer;
  const node = view.topology?.nodes.find((n) => n.id === layer);
  if (focus) graph.focus(layer);
  else {
    graph.selected = layer;
    graph.render();
  }
  const tensors = (node?.tensors || []).filter((t) => ['gradient', 'parameter', 'activation', 'update', 'activation_gradient'].includes(t.kind));
  const select = $('tensor');
  select.replaceChildren(...tensors.map((t) => Object.assign(document.createElement('option'), {
    value: `${t.kind}\n${t.name}`, textContent: `${t.name} (${t.kind})`,
  })));
  const preferred = tensors.find((t) => t.kind === 'gradient') || tensors[0];
  if (preferred) {
    select.value = `${preferred.kind}\n${preferred.name}`;
    selectTensor(preferred.name, preferred.kind);
  } else {
    view.tensor = null;
    histogram.reset(`${layer}: no histogrammed tensor`);
  }
}

function selectTensor(name, kind) {
  view.tensor = [name, kind];
  histogram.reset(`${name} · ${kind}`);
  refreshHistogram().catch((e) => message(e.message));
}

// -- alerts ----------------------------------------------------------------------------------------

function setAlerts(alerts) {
  view.alerts = alerts;
  graph.setRoles(alerts);
  graph.render();
  curves.setAlerts(alerts);
  const ol = $('alerts');
  const items = [...alerts].reverse().map((a) => {
    const li = document.createElement('li');
    li.className = `${a.severity} ${a.status}`;
    li.innerHTML = `<span class="rule">${esc(a.rule)}</span> <span class="muted">${esc(a.status)} · step ${a.step}` +
      `${a.rank ? ` · rank ${a.rank}` : ''}</span> · <button type="button" class="layer" data-layer="${esc(a.layer)}">${esc(a.layer)}</button>
      <div class="summary">${esc(a.summary)}</div>`;
    li.querySelector('button').addEventListener('click', () => selectLayer(a.layer, true));
    return li;
  });
  ol.replaceChildren(...(items.length ? items : [Object.assign(document.createElement('li'), { className: 'muted', textContent: 'no alerts' })]));
  const o = $('origin');
  const first = graph.origin || graph.explosion;
  o.hidden = !first;
  if (first) {
    o.className = graph.origin ? 'origin' : 'origin exploding';
    o.innerHTML = graph.origin
      ? `NaN/Inf started in layer <b>${esc(first.layer)}</b> at step ${first.step} (${esc(first.tensor)})`
      : `Gradient explosion in layer <b>${esc(first.layer)}</b> at step ${first.step}`;
    const b = Object.assign(document.createElement('button'), { type: 'button', textContent: 'show' });
    b.addEventListener('click', () => selectLayer(first.layer, true));
    o.append(b);
  }
}

// Firing alerts pushed by the stream: new ones join the log, vanished ones show as resolved.
function mergeFiring(firing) {
  const key = (a) => `${a.rule}\n${a.layer}\n${a.starts_at}`;
  const now = new Set(firing.map(key));
  const known = new Set(view.alerts.filter((a) => a.status === 'firing').map(key));
  const merged = view.alerts.map((a) => (a.status === 'firing' && !now.has(key(a)) ? { ...a, status: 'resolved' } : a));
  for (const a of firing) if (!known.has(key(a))) merged.push(a);
  setAlerts(merged);
}

// -- live updates ----------------------------------------------------------------------------------

function connect(run) {
  if (view.events) view.events.close();
  const es = new EventSource(run ? `/api/v1/events?run=${encodeURIComponent(run)}` : '/api/v1/events');
  view.events = es;
  const conn = $('connection');
  es.addEventListener('open', () => { conn.textContent = 'live'; conn.className = 'connection live'; });
  es.addEventListener('error', () => { conn.textContent = 'reconnecting…'; conn.className = 'connection down'; });
  es.addEventListener('runs', (e) => {
    view.runs = JSON.parse(e.data).runs;
    if (!view.run && view.runs.length) loadRun(latestRun().run);
    else renderRuns();
  });
  es.addEventListener('resync', () => loadRun(view.run));
  es.addEventListener('update', (e) => onUpdate(JSON.parse(e.data)));
}

function onUpdate(u) {
  if (u.run !== view.run) return;
  view.lastStep = u.step;
  renderStatus(u);
  if (Object.keys(u.layers).length) {
    graph.mergeStats(u.layers);
    graph.render();
    renderLegend();
  }
  if (u.alerts) mergeFiring(u.alerts);
  if (u.steps.length) {
    curves.append(u.steps);
    curves.render();
    if (window.gradwatch.ready) {
      refreshHeatmap().catch((err) => message(err.message));
      refreshHistogram().catch((err) => message(err.message));
    }
  }
}

function renderStatus(u) {
  const parts = [['step', u.step], ['loss', fmt(num(u.loss))], ['validation loss', fmt(num(u.eval_loss))],
    ['grad norm', fmt(num(u.grad_norm))], ['lr', fmt(num(u.learning_rate))], ['steps/s', fmt(num(u.steps_per_second))]];
  $('run-status').innerHTML = parts.filter(([, v]) => v !== '–' && v !== null && v !== undefined)
    .map(([k, v]) => `<span>${k} <b>${esc(v)}</b></span>`).join('');
}

function renderLegend() {
  const el = $('legend');
  if (graph.stat === 'nonfinite') {
    el.innerHTML = '<span class="swatch" style="background:#2e7d32"></span>finite <span class="swatch" style="background:#ff1744"></span>NaN/Inf';
    return;
  }
  if (!graph.range) {
    el.textContent = `no finite ${STATS[graph.stat].label}`;
    return;
  }
  const [lo, hi] = graph.range;
  el.innerHTML = `${fmt(10 ** lo)} <span class="bar" style="background:linear-gradient(90deg,${PALETTE.join(',')})"></span> ${fmt(10 ** hi)}`;
}

// -- controls --------------------------------------------------------------------------------------

$('stat').addEventListener('change', (e) => {
  graph.stat = e.target.value;
  graph.render();
  renderLegend();
  $('graph-info').title = STATS[graph.stat].label;
});
$('find').addEventListener('change', (e) => {
  if (view.topology?.nodes.some((n) => n.id === e.target.value)) selectLayer(e.target.value, true);
});
$('snapshot').addEventListener('click', () => {
  if (view.run && view.layer) snapshot.take(view.run, $('snapshot-kind').value, view.layer);
});
$('reset-view').addEventListener('click', () => graph.resetView());
$('tensor').addEventListener('change', (e) => {
  const [kind, name] = e.target.value.split('\n');
  selectTensor(name, kind);
});

function latestRun() {
  return [...view.runs].sort((a, b) => (b.last_report_time ?? 0) - (a.last_report_time ?? 0))[0];
}

async function main() {
  // A run named in the address loads at once, beside the run list: first paint matters.
  const wanted = new URLSearchParams(location.hash.slice(1)).get('run');
  const loading = wanted ? loadRun(wanted) : null;
  try {
    view.runs = (await api('/api/v1/runs')).runs;
  } catch (e) {
    message(`cannot list runs: ${e.message}`);
    return;
  }
  if (loading && view.runs.some((r) => r.run === wanted)) {
    renderRuns();
    return;
  }
  const run = latestRun()?.run;
  if (!run) {
    renderRuns();
    $('run-status').textContent = 'no runs yet: start training with gradwatch.watch(...)';
    connect(null);
    return;
  }
  await loadRun(run);
}

main();
