// The topology's module groups: the model's layers (module paths such as blocks.3.attn.q_proj) as a tree of
// path prefixes (blocks > blocks.3 > blocks.3.attn > q_proj). A prefix with one child is skipped; one with more
// than MAX_CHILDREN children is split into ranges of consecutive children (blocks.0–15, blocks.16–31, ...), so
// that no opened group shows more than MAX_CHILDREN units however deep or wide the model is. Groups open level
// by level while the shown units fit a budget; what is shown (leaves and closed groups, `visible()`) and the
// data-flow edges between them (`visibleEdges()`) follow the open groups. Plain data, no DOM: tests run it in Node.

export const MAX_CHILDREN = 16;
export const BUDGET = 40;  // units shown at first

// "3–7" for the names 3 and 7; "0–15.fc" for 0.fc and 15.fc (a shared tail said once).
function span(from, to) {
  if (from === to) return from;
  const a = from.indexOf('.'), b = to.indexOf('.');
  if (a > 0 && b > 0 && from.slice(a) === to.slice(b)) return `${from.slice(0, a)}–${to.slice(0, b)}${from.slice(a)}`;
  return `${from}–${to}`;
}

class Unit {
  constructor(id, kind, path, parent) {
    this.id = id;          // a layer's module path; a group's path prefix; a range's path[a–b]
    this.kind = kind;      // 'leaf' | 'group' | 'range'
    this.path = path;      // the module path (null for a range: not a module)
    this.parent = parent;
    this.children = [];
    this.names = new Map();  // path part -> child, while building
    this.layer = null;     // leaves: the layer id
    this.order = Infinity; // the first forward position among its layers
    this.open = false;
    this.first = 0;        // its layers are leaves[first..last] (depth-first order)
    this.last = -1;
    this.edges = [];       // [i, j]: data flows from children[i] to children[j]
  }

  get size() { return this.last - this.first + 1; }
}

export class ModuleTree {
  // nodes: [{id}] in forward order; edges: [{source, target}] between node ids.
  constructor(nodes, edges) {
    this.root = new Unit('', 'group', '', null);
    this.root.open = true;
    nodes.forEach((n, i) => this.add(String(n.id), i));
    this.finish(this.root);
    this.leaves = [];
    this.units = new Map();
    this.index(this.root, 0);
    this.byLayer = new Map(this.leaves.map((u, i) => [u.layer, i]));
    this.edgePairs = [];
    for (const e of edges) {
      const s = this.byLayer.get(String(e.source)), t = this.byLayer.get(String(e.target));
      if (s === undefined || t === undefined || s === t) continue;
      this.edgePairs.push([s, t]);
      this.attach(this.leaves[s], this.leaves[t]);
    }
    for (const u of this.units.values()) if (u.kind !== 'leaf') u.edges = [...new Set(u.edges.map(String))].map((k) => k.split(',').map(Number));
  }

  add(id, order) {
    const parts = id === '' ? [''] : id.split('.');
    let cur = this.root;
    for (let k = 0; k < parts.length; k++) {
      const path = parts.slice(0, k + 1).join('.');
      let next = cur.names.get(parts[k]);
      const last = k === parts.length - 1;
      if (last) {
        const leaf = new Unit(id, 'leaf', id, cur);
        leaf.layer = id;
        leaf.order = order;
        if (next) {  // a module that is a layer of its own and holds layers: its own part comes first
          leaf.parent = next;
          leaf.own = true;
          next.children.unshift(leaf);
          next.names.set('', leaf);
        } else {
          cur.children.push(leaf);
          cur.names.set(parts[k], leaf);
        }
        return;
      }
      if (next && next.kind === 'leaf') {  // that layer turns out to hold layers: it becomes a group
        const group = new Unit(path, 'group', path, cur);
        cur.children[cur.children.indexOf(next)] = group;
        cur.names.set(parts[k], group);
        next.parent = group;
        next.own = true;
        group.children.push(next);
        group.names.set('', next);
        next = group;
      } else if (!next) {
        next = new Unit(path, 'group', path, cur);
        cur.children.push(next);
        cur.names.set(parts[k], next);
      }
      cur = next;
    }
  }

  // Orders children by forward position, skips groups of one child, splits wide groups into ranges.
  finish(u) {
    for (const c of u.children) if (c.kind !== 'leaf') this.finish(c);
    u.children = u.children.map((c) => {
      while (c.kind === 'group' && c.children.length === 1) {
        c.children[0].parent = c.parent;
        c = c.children[0];
      }
      return c;
    });
    for (const c of u.children) u.order = Math.min(u.order, c.order);
    u.children.sort((a, b) => a.order - b.order);
    delete u.names;
    while (u.children.length > MAX_CHILDREN) {
      const n = u.children.length;
      const chunks = Math.ceil(n / MAX_CHILDREN);
      const size = Math.ceil(n / chunks);
      const ranges = [];
      for (let i = 0; i < n; i += size) {
        const members = u.children.slice(i, i + size);
        const from = this.rel(members[0], u).split('–')[0];
        const to = this.rel(members.at(-1), u).split('–').at(-1);
        const r = new Unit(`${u.path}[${from}–${to}]`, 'range', null, u);
        Object.assign(r, { children: members, order: members[0].order, from, to });
        for (const m of members) m.parent = r;
        ranges.push(r);
      }
      u.children = ranges;
    }
  }

  index(u, depth) {
    u.depth = depth;
    this.units.set(u.id, u);
    u.first = this.leaves.length;
    if (u.kind === 'leaf') this.leaves.push(u);
    for (const c of u.children) this.index(c, depth + 1);
    u.last = this.leaves.length - 1;
  }

  // The edge s -> t at the group where their paths part: between its two children that hold them.
  attach(s, t) {
    const a = this.chain(s), b = this.chain(t);
    let i = 0;
    while (i + 1 < a.length && i + 1 < b.length && a[i + 1] === b[i + 1]) i++;
    const g = a[i];
    if (a[i + 1] && b[i + 1]) g.edges.push([g.children.indexOf(a[i + 1]), g.children.indexOf(b[i + 1])]);
  }

  chain(u) {
    const out = [];
    for (let x = u; x; x = x.parent) out.push(x);
    return out.reverse();
  }

  // The nearest enclosing module path (ranges are not modules): what a unit's label is relative to.
  base(u) {
    let p = u.parent;
    while (p && p.kind === 'range') p = p.parent;
    return p ? p.path : '';
  }

  rel(u, within) {
    if (u.kind === 'range') return span(u.from, u.to);
    const base = within ? within.path : this.base(u);
    return base && u.path.startsWith(`${base}.`) ? u.path.slice(base.length + 1) : u.path;
  }

  // What a unit shows: its path below the enclosing module (an open range's children too).
  label(u) {
    if (u.own) return `${u.path.split('.').at(-1) || '(model)'} (own)`;
    if (u.kind === 'range') return span(u.from, u.to);
    return this.rel(u) || '(model)';
  }

  // An open group's caption: its whole path.
  title(u) {
    if (u.kind !== 'range') return u.path || 'model';
    const base = this.base(u);
    return `${base ? `${base}.` : ''}${span(u.from, u.to)}`;
  }

  // Opens groups level by level while the units shown stay within `budget`.
  openLevels(budget = BUDGET) {
    let level = [this.root];
    let shown = this.root.children.length;
    while (level.length) {
      const next = level.flatMap((g) => g.children.filter((c) => c.kind !== 'leaf'));
      const grow = next.reduce((n, g) => n + g.children.length - 1, 0);
      if (!next.length || shown + grow > budget) break;
      for (const g of next) g.open = true;
      shown += grow;
      level = next;
    }
  }

  // Opens every group on the way to a layer; true when anything opened.
  reveal(layer) {
    const i = this.byLayer.get(layer);
    if (i === undefined) return false;
    let changed = false;
    for (let g = this.leaves[i].parent; g; g = g.parent) {
      if (!g.open) changed = g.open = true;
    }
    return changed;
  }

  // Leaves and closed groups, depth first (forward order).
  visible(u = this.root, out = []) {
    for (const c of u.children) {
      if (c.kind !== 'leaf' && c.open) this.visible(c, out);
      else out.push(c);
    }
    return out;
  }

  // leaf index -> the visible unit holding it.
  shownAs(visible = this.visible()) {
    const out = new Array(this.leaves.length);
    for (const u of visible) for (let i = u.first; i <= u.last; i++) out[i] = u;
    return out;
  }

  // [source unit, target unit] pairs between visible units, each once.
  visibleEdges(shown = this.shownAs()) {
    const seen = new Set();
    const out = [];
    for (const [s, t] of this.edgePairs) {
      const a = shown[s], b = shown[t];
      if (!a || !b || a === b) continue;
      const key = `${a.id}\n${b.id}`;
      if (seen.has(key)) continue;
      seen.add(key);
      out.push([a, b]);
    }
    return out;
  }

  // A unit's worst layer, from values[i] = [value, bad] per leaf: NaN/Inf first (how many layers hold any, and
  // the first of them), else the largest value.
  worst(u, values) {
    let value = null, layer = null, bad = 0, badLayer = null;
    for (let i = u.first; i <= u.last; i++) {
      const [v, b] = values[i];
      if (b && !bad++) badLayer = this.leaves[i].layer;
      if (v !== null && (value === null || v > value)) [value, layer] = [v, this.leaves[i].layer];
    }
    return { value, layer, bad, badLayer };
  }

  // The unit holding `layer` as shown now (the layer itself, or the closed group it is in).
  holder(layer, shown = this.shownAs()) {
    const i = this.byLayer.get(layer);
    return i === undefined ? null : shown[i];
  }
}
