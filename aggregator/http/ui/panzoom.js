// Zoom and pan of an SVG drawing: the wheel zooms about the pointer, a drag pans, and a press that did not
// move is a click (`onClick(element under the pointer)`), so a drag never opens what it started on; Enter or
// Space on a focused element is a click too. The view is one transform of `viewport`: translate, then scale.

const MIN_K = 0.15, MAX_K = 4;

export class PanZoom {
  constructor(svg, viewport, { onClick, onHover, onLeave } = {}) {
    this.svg = svg;
    this.viewport = viewport;
    this.k = 1;
    this.x = 0;
    this.y = 0;
    let down = null;
    svg.addEventListener('pointerdown', (e) => {
      down = { x: e.clientX, y: e.clientY, vx: this.x, vy: this.y, moved: false };
      svg.setPointerCapture(e.pointerId);
    });
    svg.addEventListener('pointermove', (e) => {
      if (down && (down.moved || Math.hypot(e.clientX - down.x, e.clientY - down.y) > 4)) {
        down.moved = true;
        this.set(this.k, down.vx + e.clientX - down.x, down.vy + e.clientY - down.y);
        onLeave?.();
        return;
      }
      onHover?.(e);
    });
    svg.addEventListener('pointerup', (e) => {
      const was = down;
      down = null;
      if (was && !was.moved) onClick?.(document.elementFromPoint(e.clientX, e.clientY));
    });
    svg.addEventListener('pointerleave', () => onLeave?.());
    svg.addEventListener('wheel', (e) => {
      e.preventDefault();
      const box = svg.getBoundingClientRect();
      const k = Math.min(MAX_K, Math.max(MIN_K, this.k * Math.exp(-e.deltaY * 0.0015)));
      const px = e.clientX - box.left, py = e.clientY - box.top;
      this.set(k, px - ((px - this.x) * k) / this.k, py - ((py - this.y) * k) / this.k);
    }, { passive: false });
    svg.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' || e.key === ' ') {
        e.preventDefault();
        onClick?.(e.target);
      }
    });
  }

  set(k, x, y) {
    Object.assign(this, { k, x, y });
    this.viewport.setAttribute('transform', `translate(${x},${y}) scale(${k})`);
  }

  // A drawing of width x height in view (scaled within [minK, 1]), centred across, from the top.
  fit(width, height, minK = 0.35) {
    const W = this.svg.clientWidth, H = this.svg.clientHeight;
    const k = Math.max(minK, Math.min(1, (W - 8) / Math.max(1, width), (H - 8) / Math.max(1, height)));
    this.set(k, (W - width * k) / 2, Math.max(4, (H - height * k) / 2));
  }

  // The drawing's point (cx, cy) in the middle, at least `zoom`.
  centre(cx, cy, zoom = 1) {
    const k = Math.max(this.k, zoom);
    this.set(k, this.svg.clientWidth / 2 - cx * k, this.svg.clientHeight / 2 - cy * k);
  }
}
