// Layer search. Typing in the box filters by substring (any case): the topology rings the matching layers and
// dims the rest, the heatmap keeps only their rows, and a table under the box lists them with their statistics
// (the first MAX_ROWS). Keyboard: '/' focuses the box from anywhere, ↓/↑ move through the table, Enter selects
// the highlighted layer (else the one named exactly, else the first match), Escape clears, then leaves the box.

import { esc, fmt, num } from './util.js';

const MAX_ROWS = 50;
const DEBOUNCE_MS = 120;

export class LayerSearch {
  // layers(): [{layer, grad_norm, update_ratio, nonfinite}] in forward order; onFilter(q, Set | null);
  // onSelect(layer).
  constructor(input, table, { layers, onFilter, onSelect }) {
    this.input = input;
    this.table = table;
    this.layers = layers;
    this.onFilter = onFilter;
    this.onSelect = onSelect;
    this.q = '';
    this.matches = [];
    this.active = -1;
    this.timer = null;
    input.setAttribute('role', 'combobox');
    input.setAttribute('aria-controls', table.id);
    input.setAttribute('aria-autocomplete', 'list');
    input.setAttribute('aria-expanded', 'false');
    input.addEventListener('input', () => {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.apply(), DEBOUNCE_MS);
    });
    input.addEventListener('keydown', (e) => this.key(e));
    input.addEventListener('focus', () => this.q && this.show(true));
    input.addEventListener('blur', () => setTimeout(() => this.show(false), 150));
    table.addEventListener('mousedown', (e) => e.preventDefault());  // the box keeps the focus
    table.addEventListener('click', (e) => {
      const row = e.target.closest('[data-layer]');
      if (row) this.choose(row.dataset.layer);
    });
    document.addEventListener('keydown', (e) => {
      const typing = /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement?.tagName || '');
      if (e.key === '/' && !typing && !e.ctrlKey && !e.metaKey && !e.altKey) {
        e.preventDefault();
        input.focus();
        input.select();
      }
    });
  }

  reset() {
    clearTimeout(this.timer);
    this.input.value = '';
    this.q = '';
    this.matches = [];
    this.show(false);
  }

  // Filters now (the debounce skipped).
  apply() {
    clearTimeout(this.timer);
    const q = this.input.value.trim();
    const changed = q !== this.q;
    this.q = q;
    const needle = q.toLowerCase();
    this.matches = q ? this.layers().filter((l) => l.layer.toLowerCase().includes(needle)) : [];
    this.active = -1;
    if (changed) this.onFilter(q, q ? new Set(this.matches.map((l) => l.layer)) : null);
    this.render();
    this.show(!!q && document.activeElement === this.input);
  }

  show(open) {
    this.table.hidden = !open;
    this.input.setAttribute('aria-expanded', String(open));
  }

  render() {
    const rows = this.matches.slice(0, MAX_ROWS).map((l, i) => `<tr id="find-row-${i}" role="option" data-layer="${esc(l.layer)}"`
      + ` aria-selected="${i === this.active}" class="${i === this.active ? 'active' : ''}${num(l.nonfinite) > 0 ? ' bad' : ''}">`
      + `<td class="name">${esc(l.layer)}</td><td>${fmt(num(l.grad_norm))}</td><td>${fmt(num(l.update_ratio))}</td>`
      + `<td>${fmt(num(l.nonfinite))}</td></tr>`);
    const more = this.matches.length > MAX_ROWS
      ? `<tr class="more"><td colspan="4">${this.matches.length - MAX_ROWS} more: type more of the name</td></tr>` : '';
    const none = this.q && !this.matches.length ? `<tr class="more"><td colspan="4">no layer matches “${esc(this.q)}”</td></tr>` : '';
    this.table.innerHTML = `<table><thead><tr><th>${this.matches.length} layer${this.matches.length === 1 ? '' : 's'}</th>`
      + `<th>grad norm</th><th>update ratio</th><th>NaN/Inf</th></tr></thead><tbody>${rows.join('')}${more}${none}</tbody></table>`;
    if (this.active >= 0) this.input.setAttribute('aria-activedescendant', `find-row-${this.active}`);
    else this.input.removeAttribute('aria-activedescendant');
    this.table.querySelector('tr.active')?.scrollIntoView({ block: 'nearest' });
  }

  // New statistics arrived: the rows shown follow.
  refresh() {
    if (!this.q) return;
    const byName = new Map(this.layers().map((l) => [l.layer, l]));
    this.matches = this.matches.map((l) => byName.get(l.layer) || l);
    if (!this.table.hidden) this.render();
  }

  key(e) {
    const n = Math.min(this.matches.length, MAX_ROWS);
    if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
      e.preventDefault();
      if (this.input.value.trim() !== this.q) this.apply();
      if (!n) return;
      this.active = e.key === 'ArrowDown' ? (this.active + 1) % n : (this.active <= 0 ? n - 1 : this.active - 1);
      this.show(true);
      this.render();
    } else if (e.key === 'Enter') {
      e.preventDefault();
      if (this.input.value.trim() !== this.q) this.apply();
      const typed = this.input.value.trim();
      const exact = this.layers().find((l) => l.layer === typed);
      const pick = this.active >= 0 ? this.matches[this.active] : exact || this.matches[0];
      if (pick) this.choose(pick.layer);
    } else if (e.key === 'Escape') {
      e.preventDefault();
      if (this.input.value) {
        this.input.value = '';
        this.apply();
      } else {
        this.input.blur();
      }
    }
  }

  choose(layer) {
    this.show(false);
    this.onSelect(layer);
  }
}
