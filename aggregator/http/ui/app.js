// The live view: picks a run, loads its topology, layer statistics, steps, alerts and histograms from
// the query API, then follows it through server-sent events (/api/v1/events, read by util.EventStream so that
// they carry the read token like every other request). `window.gradwatch` exposes the state and the views to
// tests and to the curious, with the page's timings: `timings.firstRender` (navigation start to the topology
// and the heatmap drawn, `performance.mark('gradwatch:first-render')`) and `updates` (per live update: from
// the event's arrival to the page updated, and to the heatmap's new column drawn).

import { mergeFiring, renderAlerts, renderOrigin } from './alerts.js';
import { Curves, HistogramPlayer } from './charts.js';
import { STATS, TopologyView } from './graph.js';
import { HeatmapView } from './heatmap.js';
import { LayerSearch } from './search.js';
import { SnapshotView } from './snapshot.js';
import { StatisticsView } from './stats.js';
import { api, esc, EventStream, fmt, num, PALETTE, serialized } from './util.js';

const $ = (id) => document.getElementById(id);
const STEP_ROWS = 2000;
const MAX_PAGES = 20;  // pages of one list followed (`next`) before the page gives up on the rest
const KEPT_UPDATES = 200;

const view = {
  run: null,
  runs: [],
  alerts: [],        // the run's alert transitions, oldest first
  layer: null,       // the selected layer
  tensor: null,      // [name, kind] shown in the histogram panel
  events: null,
  lastStep: null,
  errors: [],
};

const graph = new TopologyView($('graph'), { onSelect: (layer) => selectLayer(layer, false) });
const curves = new Curves($('curves'));
const heatmap = new HeatmapView($('heatmap'), { onSelect: (layer) => selectLayer(layer, true) });
const histogram = new HistogramPlayer($('histogram'), { slider: $('frame'), play: $('play'), label: $('frame-label') });
let snapshot = null;  // with the charting library
const stats = new StatisticsView($('stats-section'), {
  onRanges: () => reloadSteps(),  // the steps' out_of_range changed with the ranges
  onError: (text) => message(text),
});
const search = new LayerSearch($('find'), $('find-results'), {
  layers: () => (view.topology?.nodes || []).map((n) => graph.stats.get(n.id) || { layer: n.id }),
  onFilter: (q, matches) => {
    graph.setMatches(matches);
    heatmap.setFilter(q).catch((e) => message(e.message));
  },
  onSelect: (layer) => selectLayer(layer, true),
});

window.gradwatch = {
  view,
  charts: {},         // the ECharts instances, once the library is loaded
  topology: graph,
  heatmap,
  histogram,
  curves,
  snapshot: null,
  search,
  stats,
  ready: false,       // the current run's first full load is done
  // ms since navigation start: the topology and the heatmap first drawn (`drawn`) and on screen (`firstRender`)
  timings: { topologyDrawn: null, heatmapDrawn: null, drawn: null, firstRender: null },
  updates: [],        // the latest live updates: {step, layers, dom_ms, heatmap_ms, painted_ms}
  firstPaint: () => window.gradwatch.timings.firstRender,
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

// A list the API pages (`next`): every page's `key` items, in order.
async function all(path, key, pending = null) {
  let doc = await api(path, pending);
  const out = { ...doc, [key]: [...doc[key]] };
  for (let n = 1; doc.next && n < MAX_PAGES; n++) {
    doc = await api(doc.next);
    out[key].push(...doc[key]);
    if (key === 'nodes') out.edges.push(...doc.edges);
  }
  return out;
}

// The charting library (the curves, histograms and snapshots; about 1 MB of script to compile) is fetched
// early (index.html preloads it) and run once the topology and the heatmap are on screen, or at once without a run.
let chartsLoaded = null;
function loadCharts() {
  chartsLoaded ||= new Promise((resolve, reject) => {
    const script = Object.assign(document.createElement('script'), { src: 'vendor/echarts.min.js' });
    script.onload = () => {
      const { echarts } = window;
      curves.attach(echarts);
      histogram.attach(echarts);
      stats.attach(echarts);
      snapshot = new SnapshotView($('snapshot-panel'), echarts);
      Object.assign(window.gradwatch, { snapshot, charts: { curves: curves.chart, histogram: histogram.chart, snapshot: snapshot.chart, distribution: stats.distChart, update: stats.updateChart } });
      resolve();
    };
    script.onerror = () => reject(new Error('cannot load the charting library'));
    document.head.append(script);
  });
  return chartsLoaded;
}

// The first render: both the topology and the heatmap drawn, then on screen (two frames later).
function firstRender() {
  const t = window.gradwatch.timings;
  if (t.drawn !== null || graph.drawnAt === null || heatmap.drawnAt === null) return;
  t.topologyDrawn = graph.drawnAt;
  t.heatmapDrawn = heatmap.drawnAt;
  t.drawn = performance.now();
  performance.mark('gradwatch:first-drawn');
  requestAnimationFrame(() => requestAnimationFrame(() => {
    t.firstRender = performance.now();
    performance.mark('gradwatch:first-render');
    loadCharts();
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
  heatmap.reset(run);
  histogram.reset();
  stats.reset(run);
  search.reset();
  graph.reset();
  try {
    const pre = window.gradwatchPrefetch?.run === run ? window.gradwatchPrefetch : {};
    window.gradwatchPrefetch = null;
    const base = `/api/v1/runs/${encodeURIComponent(run)}`;
    heatmap.pending = pre.heatmap || null;
    const heat = heatmap.load().then(firstRender);  // the first rows, beside the topology
    const [topology, layers, alerts] = await Promise.all([
      all(`${base}/topology?limit=10000`, 'nodes', pre.topology),
      all(`${base}/layers?histograms=0&limit=5000`, 'layers', pre.layers),
      api(`${base}/alerts`, pre.alerts),
    ]);
    if (run !== view.run) return;
    graph.stats.clear();
    graph.setStats(layers.layers);
    view.topology = topology;
    $('graph-info').textContent = `${topology.nodes.length} layers${topology.inferred ? ' · chained in forward order' : ''}`;
    setAlerts(alerts.alerts, false);  // the origin's groups open before the first layout
    graph.setTopology(topology);
    renderLegend();
    firstRender();
    await heat;
    if (run !== view.run) return;
    const steps = await api(`${base}/steps?limit=${STEP_ROWS}&layers=0`);
    if (run !== view.run) return;
    curves.append(steps.steps);
    curves.render();
    const start = graph.origin?.layer || graph.explosion?.layer || topology.nodes[0]?.id;
    if (start) selectLayer(start, false);
    await loadCharts();
    if (run !== view.run) return;
    window.gradwatch.ready = true;
    message('');
  } catch (e) {
    message(`cannot load run ${run}: ${e.message}`);
  }
}

// The curves' steps again, after the valid ranges changed: /steps marks the out-of-range ones.
async function reloadSteps() {
  const run = view.run;
  if (!run) return;
  const steps = await api(`/api/v1/runs/${encodeURIComponent(run)}/steps?limit=${STEP_ROWS}&layers=0`);
  if (run !== view.run) return;
  curves.append(steps.steps);
  curves.render();
}

// New steps of a live update, from /steps where the run has ranges (the event's rows carry no out_of_range).
const markNewSteps = serialized(async () => {
  const run = view.run;
  const from = curves.lastStep();
  if (!run || !stats.ranges.length || from === null) return;
  const steps = await api(`/api/v1/runs/${encodeURIComponent(run)}/steps?from=${Math.max(0, from - 50)}&limit=${STEP_ROWS}&layers=0`);
  if (run !== view.run) return;
  curves.append(steps.steps);
  curves.render();
});

const refreshStats = serialized(async () => { await stats.refresh(); });
let statsRefreshedAt = 0;
let statsTimer = null;

// At most every 2 s, and never skipping the last: an update inside the 2 s schedules one for when they are up, so
// the panels end on the run's final step even when no event follows it.
function scheduleStats() {
  if (statsTimer !== null) return;
  const wait = Math.max(0, 2000 - (performance.now() - statsRefreshedAt));
  statsTimer = setTimeout(() => {
    statsTimer = null;
    statsRefreshedAt = performance.now();
    refreshStats().catch((err) => message(err.message));
  }, wait);
}

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
  else graph.select(layer);
  heatmap.select(layer);
  stats.select(layer, node?.tensors || []).catch((e) => message(e.message));
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

function setAlerts(alerts, render = true) {
  view.alerts = alerts;
  graph.setRoles(alerts);
  if (render) graph.render();
  curves.setAlerts(alerts);
  renderAlerts($('alerts'), alerts, (layer) => selectLayer(layer, true));
  renderOrigin($('origin'), graph.origin, graph.explosion, (layer) => selectLayer(layer, true));
}

// -- live updates ----------------------------------------------------------------------------------

function connect(run) {
  if (view.events) view.events.close();
  const es = new EventStream(run ? `/api/v1/events?run=${encodeURIComponent(run)}` : '/api/v1/events');
  view.events = es;
  const conn = $('connection');
  es.addEventListener('open', () => { conn.textContent = 'live'; conn.className = 'connection live'; });
  es.addEventListener('error', () => { conn.textContent = 'reconnecting…'; conn.className = 'connection down'; });
  es.addEventListener('unauthorized', () => {
    conn.textContent = 'no read token';
    conn.className = 'connection down';
    message('live updates stopped: this aggregator needs its read token (reload the page to give it)');
  });
  es.addEventListener('runs', (e) => {
    view.runs = JSON.parse(e.data).runs;
    if (!view.run && view.runs.length) loadRun(latestRun().run);
    else renderRuns();
  });
  es.addEventListener('resync', () => loadRun(view.run));
  es.addEventListener('update', (e) => {
    const received = performance.now();
    onUpdate(JSON.parse(e.data), received);
  });
}

// A live update applied in place: the statistics restyle the units shown (no new layout), the heatmap fetches
// the new steps of the rows in view only. How long each part took is kept in window.gradwatch.updates.
function onUpdate(u, received = performance.now()) {
  if (u.run !== view.run) return;
  const record = { step: u.step, layers: 0, steps: u.steps.length, dom_ms: null, heatmap_ms: null, painted_ms: null };
  if (u.steps.length) {  // first: the request for the new steps is in flight while the rest is drawn
    heatmap.refresh().then(() => {
      record.heatmap_ms = performance.now() - received;
      record.heatmap_last = heatmap.lastStep;
    }).catch((err) => message(err.message));
  }
  view.lastStep = u.step;
  renderStatus(u);
  const changed = Object.keys(u.layers).length;
  record.layers = changed;
  if (changed) {
    graph.mergeStats(u.layers);
    graph.render();
    renderLegend();
    search.refresh();
  }
  if (u.alerts) setAlerts(mergeFiring(view.alerts, u.alerts));
  if (u.steps.length) {
    curves.append(u.steps);
    curves.render();
    if (window.gradwatch.ready) refreshHistogram().catch((err) => message(err.message));
    if (window.gradwatch.ready) markNewSteps().catch((err) => message(err.message));
    if (window.gradwatch.ready) scheduleStats();
  }
  record.dom_ms = performance.now() - received;
  requestAnimationFrame(() => { record.painted_ms = performance.now() - received; });
  const kept = window.gradwatch.updates;
  kept.push(record);
  if (kept.length > KEPT_UPDATES) kept.splice(0, kept.length - KEPT_UPDATES);
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
$('snapshot').addEventListener('click', () => {
  if (view.run && view.layer && snapshot) snapshot.take(view.run, $('snapshot-kind').value, view.layer);
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
    loadCharts();
    connect(null);
    return;
  }
  await loadRun(run);
}

main();
