// Small helpers shared by the live view's modules.

// The query API spells non-finite numbers as Prometheus does: "NaN", "+Inf", "-Inf".
export function num(x) {
  if (typeof x !== 'string') return x;
  if (x === 'NaN') return NaN;
  if (x === '+Inf' || x === 'Inf') return Infinity;
  if (x === '-Inf') return -Infinity;
  const v = Number(x);
  return Number.isNaN(v) ? null : v;
}

export function fmt(x) {
  if (x === null || x === undefined) return '–';
  if (!Number.isFinite(x)) return String(x);
  if (x === 0) return '0';
  const a = Math.abs(x);
  return a >= 1e4 || a < 1e-3 ? x.toExponential(2) : x.toPrecision(3);
}

export function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

// Viridis, sampled: perceptually even and readable for colour-blind users.
export const PALETTE = ['#440154', '#482878', '#3e4989', '#31688e', '#26828e', '#1f9e89', '#35b779', '#6ece58', '#b5de2b', '#fde725'];

export function colorScale(lo, hi, palette = PALETTE) {
  const span = hi - lo || 1;
  const rgb = palette.map((h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)));
  return (v) => {
    const t = Math.min(1, Math.max(0, (v - lo) / span)) * (rgb.length - 1);
    const i = Math.min(rgb.length - 2, Math.floor(t));
    const f = t - i;
    const c = rgb[i].map((a, k) => Math.round(a + (rgb[i + 1][k] - a) * f));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  };
}

export class ApiError extends Error {}

// -- tokens ----------------------------------------------------------------------------------------
// An aggregator with a read token (GRADWATCH_AGGREGATOR_READ_TOKEN) answers reads only with
// "Authorization: Bearer <token>" (aggregator/http/access.py). The page takes it from its address once
// (/ui/#token=..., never sent to the server: prefetch.js keeps it and removes it from the address) or asks
// for it on the first refusal, and keeps it in sessionStorage for this tab. The API token, which requests
// snapshots, reads too.

export const READ_TOKEN_KEY = 'gradwatch.readToken';
export const API_TOKEN_KEY = 'gradwatch.apiToken';

export function readToken() {
  return sessionStorage.getItem(READ_TOKEN_KEY) || sessionStorage.getItem(API_TOKEN_KEY);
}

export function readHeaders(extra = {}) {
  const token = readToken();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

let asking = null;

// A read was refused (401) with the token `used`: true once a new token is kept (asked for once, however
// many reads were refused together), false when the user gave none.
export async function renewReadToken(used) {
  if (readToken() !== used) return true;  // another refusal already brought a new one
  asking ||= Promise.resolve().then(() => {
    const given = window.prompt(`${used ? 'The read token was refused. ' : ''}This aggregator needs its read token `
      + '(GRADWATCH_AGGREGATOR_READ_TOKEN) to show its runs:');
    if (!given?.trim()) return false;
    sessionStorage.setItem(READ_TOKEN_KEY, given.trim());
    return true;
  }).finally(() => { asking = null; });
  return asking;
}

function get(path) {
  return fetch(path, { headers: readHeaders({ Accept: 'application/json' }) });
}

// GET a query API path (or take over a request already sent), asking for the read token once on a 401.
export async function api(path, pending = null) {
  const used = readToken();  // prefetch.js sent the same: it kept the address's token before fetching
  let resp = await (pending || get(path));
  if (resp.status === 401 && await renewReadToken(used)) resp = await get(path);
  let doc = null;
  try {
    doc = await resp.json();
  } catch {
    throw new ApiError(`${path}: HTTP ${resp.status}`);
  }
  if (!resp.ok || doc.status !== 'success') throw new ApiError(`${path}: ${doc.error || resp.status}`);
  return doc.data;
}

// At most one call in flight; a call asked for meanwhile runs once after it.
export function serialized(fn) {
  let running = null;
  let again = false;
  const run = async () => {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      try {
        do {
          again = false;
          await fn();
        } while (again);
      } finally {
        running = null;
      }
    })();
    return running;
  };
  return run;
}

const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// Server-sent events read with fetch, not EventSource: EventSource cannot send the read token as a header,
// and a token in the URL would end up in proxies' logs. Like EventSource it reconnects after the server's
// `retry` delay and tells its listeners 'open', 'error' and each named event ({ data }); on a 401 it asks for
// the read token once and says 'unauthorized' (and stops) when none is given.
export class EventStream {
  constructor(url) {
    this.url = url;
    this.listeners = new Map();
    this.retryMs = 3000;
    this.closed = false;
    this.controller = null;
    this.loop();
  }

  addEventListener(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(fn);
  }

  emit(type, data = null) {
    for (const fn of this.listeners.get(type) || []) fn({ type, data });
  }

  close() {
    this.closed = true;
    this.controller?.abort();
  }

  async loop() {
    await Promise.resolve();  // the caller adds its listeners first
    while (!this.closed) {
      this.controller = new AbortController();
      const used = readToken();
      try {
        const resp = await fetch(this.url, {
          headers: readHeaders({ Accept: 'text/event-stream' }), signal: this.controller.signal, cache: 'no-store',
        });
        if (resp.status === 401) {
          if (!(await renewReadToken(used))) {
            this.closed = true;
            this.emit('unauthorized');
            return;
          }
          continue;
        }
        if (resp.ok && resp.body) {
          this.emit('open');
          await this.read(resp.body.getReader());
        }
      } catch {
        // the network failed or close() aborted: reconnect below unless closed
      }
      if (this.closed) return;
      this.emit('error');
      await sleep(this.retryMs);
    }
  }

  async read(reader) {
    const decoder = new TextDecoder();
    let buffer = '';
    let type = '';
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done || this.closed) return;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split('\n');
      buffer = lines.pop();
      for (const raw of lines) {
        const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
        if (line === '') {  // a blank line ends an event
          if (data.length) this.emit(type || 'message', data.join('\n'));
          type = '';
          data = [];
        } else if (!line.startsWith(':')) {  // ':' starts a comment (the server's keep-alive)
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'event') type = text;
          else if (field === 'data') data.push(text);
          else if (field === 'retry' && /^\d+$/.test(text)) this.retryMs = Number(text);
        }
      }
    }
  }
}
