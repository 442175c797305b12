// The alert timeline and the banner naming where the trouble started: drawn from the run's alert transitions
// (oldest first, /alerts), with the firing alerts a live update pushes merged in.

import { esc } from './util.js';

// The log with the firing alerts of a live update: new ones join it, vanished ones show as resolved.
export function mergeFiring(alerts, firing) {
  const key = (a) => `${a.rule}\n${a.layer}\n${a.starts_at}`;
  const now = new Set(firing.map(key));
  const known = new Set(alerts.filter((a) => a.status === 'firing').map(key));
  const merged = alerts.map((a) => (a.status === 'firing' && !now.has(key(a)) ? { ...a, status: 'resolved' } : a));
  for (const a of firing) if (!known.has(key(a))) merged.push(a);
  return merged;
}

// Newest first, each linking to its layer (onLayer).
export function renderAlerts(ol, alerts, onLayer) {
  const items = [...alerts].reverse().map((a) => {
    const li = document.createElement('li');
    li.className = `${a.severity} ${a.status}`;
    li.innerHTML = `<span class="rule">${esc(a.rule)}</span> <span class="muted">${esc(a.status)} · step ${a.step}`
      + `${a.rank ? ` · rank ${a.rank}` : ''}</span> · <button type="button" class="layer" data-layer="${esc(a.layer)}">`
      + `${esc(a.layer)}</button><div class="summary">${esc(a.summary)}</div>`;
    li.querySelector('button').addEventListener('click', () => onLayer(a.layer));
    return li;
  });
  ol.replaceChildren(...(items.length ? items : [Object.assign(document.createElement('li'), { className: 'muted', textContent: 'no alerts' })]));
}

// "NaN/Inf started in layer ..." (else an explosion's layer), with a button that shows it (onLayer).
export function renderOrigin(el, origin, explosion, onLayer) {
  const first = origin || explosion;
  el.hidden = !first;
  if (!first) return;
  el.className = origin ? 'origin' : 'origin exploding';
  el.innerHTML = origin
    ? `NaN/Inf started in layer <b>${esc(first.layer)}</b> at step ${first.step} (${esc(first.tensor)})`
    : `Gradient explosion in layer <b>${esc(first.layer)}</b> at step ${first.step}`;
  const b = Object.assign(document.createElement('button'), { type: 'button', textContent: 'show' });
  b.addEventListener('click', () => onLayer(first.layer));
  el.append(b);
}
