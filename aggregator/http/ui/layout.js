// Where the topology's units go: each shown unit is a cell (its symbol over its measured label) and each open
// group a frame (its caption over its children), laid out inside their group in data-flow columns (the
// longest-path rank among siblings: parallel branches such as q/k/v stack in one column) that wrap into rows at
// the width available. Every cell and frame owns a rectangle no other one enters, and its text lies inside it,
// so no two labels overlap whatever the model; sizes come from the text as the browser measures it.

export const GEOM = {
  SYM: 14,        // a layer's symbol; a closed group's is SYM + 6 wide
  LABEL_H: 14,    // one line of label text
  GAP: 12,        // between neighbouring labels
  PAD: 6,         // above a symbol, below a label
  MARGIN: 3,      // around every cell and frame
  FRAME_PAD: 7,   // inside a frame
  HEADER: 20,     // a frame's caption strip
  MAX_LABEL: 220, // longer labels are cut at the front (the full name is in the tooltip)
};
export const FONT = '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';
export const TITLE_FONT = `600 ${FONT}`;

// Text width in px, as the page draws it (canvas measureText with the label's font), cached.
export function textMeasure(doc = globalThis.document) {
  const ctx = doc?.createElement('canvas').getContext('2d');
  const cache = new Map();
  return (text, bold = false) => {
    const key = `${bold ? 1 : 0}${text}`;
    let w = cache.get(key);
    if (w === undefined) {
      if (ctx) {
        ctx.font = bold ? TITLE_FONT : FONT;
        w = Math.ceil(ctx.measureText(text).width);
      } else {
        w = Math.ceil(text.length * (bold ? 6.6 : 6.2));  // Node: no canvas; a generous estimate
      }
      cache.set(key, w);
    }
    return w;
  };
}

// The longest text of `text` that fits `max` px, cut at the front: '…attn.q_proj'.
export function fit(text, max, measure, bold = false) {
  if (measure(text, bold) <= max) return text;
  let lo = 0, hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (measure(`…${text.slice(mid)}`, bold) <= max) hi = mid;
    else lo = mid + 1;
  }
  return `…${text.slice(lo)}`;
}

// Longest-path ranks of n nodes under edges [[i, j]]; nodes in a cycle follow in order; no edges: a chain.
export function ranks(n, edges) {
  if (!edges.length) return Array.from({ length: n }, (_, i) => i);
  const succ = Array.from({ length: n }, () => []);
  const indeg = new Array(n).fill(0);
  for (const [s, t] of edges) {
    if (s === t || s < 0 || t < 0) continue;
    succ[s].push(t);
    indeg[t]++;
  }
  const rank = new Array(n).fill(0);
  const queue = [];
  for (let i = 0; i < n; i++) if (indeg[i] === 0) queue.push(i);
  let seen = 0;
  for (let head = 0; head < queue.length; head++) {
    const i = queue[head];
    seen++;
    for (const t of succ[i]) {
      rank[t] = Math.max(rank[t], rank[i] + 1);
      if (--indeg[t] === 0) queue.push(t);
    }
  }
  if (seen < n) {
    let next = Math.max(0, ...rank) + 1;
    for (let i = 0; i < n; i++) if (indeg[i] > 0) rank[i] = next++;
  }
  return rank;
}

// tree: a ModuleTree; width: px available; labelOf(unit): a cell's text. Returns {cells, frames, width, height}:
// cells {unit, text, x, y, w, h, cx, cy, sym, lx, ly, lw}, frames {unit, text, x, y, w, h, tx, ty, tw}.
export function layoutTree(tree, width, measure, labelOf) {
  const { SYM, LABEL_H, GAP, PAD, MARGIN, FRAME_PAD, HEADER, MAX_LABEL } = GEOM;

  function cell(u) {
    const text = fit(labelOf(u), MAX_LABEL, measure);
    const lw = measure(text);
    const sym = u.kind === 'leaf' ? SYM : SYM + 6;
    const w = Math.max(sym, lw) + GAP;
    const h = PAD + sym + 3 + LABEL_H + PAD;
    return {
      w, h,
      emit(x, y, out) {
        out.cells.push({ unit: u, text, x, y, w, h, sym, cx: x + w / 2, cy: y + PAD + sym / 2, lx: x + w / 2,
                         ly: y + PAD + sym + 3, lw });
      },
    };
  }

  function frame(u, max) {
    const text = fit(`▾ ${tree.title(u)}`, MAX_LABEL + 80, measure, true);
    const tw = measure(text, true);
    const inner = flow(u, max - 2 * FRAME_PAD - 2 * MARGIN);
    const w = Math.max(inner.w, tw + 6) + 2 * FRAME_PAD;
    const h = HEADER + inner.h + FRAME_PAD;
    return {
      w, h,
      emit(x, y, out) {
        out.frames.push({ unit: u, text, x, y, w, h, tx: x + FRAME_PAD, ty: y + (HEADER - LABEL_H) / 2, tw });
        inner.emit(x + FRAME_PAD, y + HEADER, out);
      },
    };
  }

  function flow(g, max) {
    const boxes = g.children.map((c) => (c.kind !== 'leaf' && c.open ? frame(c, max) : cell(c)));
    const rank = ranks(g.children.length, g.edges);
    const byRank = [];
    boxes.forEach((_, i) => (byRank[rank[i]] ||= []).push(i));
    const cols = byRank.filter(Boolean).map((members) => ({
      members,
      w: Math.max(...members.map((i) => boxes[i].w)) + 2 * MARGIN,
      h: members.reduce((s, i) => s + boxes[i].h + 2 * MARGIN, 0),
    }));
    const rows = [];
    let row = null;
    for (const col of cols) {
      if (!row || (row.cols.length && row.w + col.w > max)) rows.push(row = { cols: [], w: 0, h: 0 });
      row.cols.push(col);
      row.w += col.w;
      row.h = Math.max(row.h, col.h);
    }
    return {
      w: Math.max(0, ...rows.map((r) => r.w)),
      h: rows.reduce((s, r) => s + r.h, 0),
      emit(x0, y0, out) {
        let y = y0;
        for (const r of rows) {
          let x = x0;
          for (const col of r.cols) {
            let cy = y + (r.h - col.h) / 2;
            for (const i of col.members) {
              boxes[i].emit(x + (col.w - boxes[i].w) / 2, cy + MARGIN, out);
              cy += boxes[i].h + 2 * MARGIN;
            }
            x += col.w;
          }
          y += r.h;
        }
      },
    };
  }

  const top = flow(tree.root, Math.max(120, width));
  const out = { cells: [], frames: [], width: top.w, height: top.h };
  top.emit(0, 0, out);
  return out;
}
