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

export async function api(path, pending = null) {
  const resp = await (pending || fetch(path, { headers: { Accept: 'application/json' } }));
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
