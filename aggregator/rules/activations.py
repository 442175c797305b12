"""Rules on module outputs (TENSOR_KIND_ACTIVATION summaries, sent when activations are selected):
dead ReLU-like layers (from per-unit activity counts where the agent sends them) and saturated tanh-like
layers. Pure: views in, alert transitions out."""

from __future__ import annotations

import math

from gradwatch.aggregator.report import UNITS, ReportView, TensorMeta
from gradwatch.aggregator.rules.base import WARNING, TensorRule, pct
from gradwatch.stats import HIST_MIN_EXPONENT, summary_moments
from gradwatch.v1 import run_pb2

ACTIVATION = run_pb2.TENSOR_KIND_ACTIVATION
# Histogram bucket i counts floor(log2|x|) == i + HIST_MIN_EXPONENT (gradwatch.stats): these are [0.5, 1)
# and [1, 2), where an output of exactly +-1 (a saturated float32 tanh) falls.
_HALF_BUCKET, _ONE_BUCKET = -1 - HIST_MIN_EXPONENT, -HIST_MIN_EXPONENT


class DeadReLU(TensorRule):
    """A rectifier layer that has stopped passing signal, in `window` consecutive reports of a rank.

    Per unit, where the agent counts unit activity (watched ReLU/ReLU6 modules: `<layer>:units`, see
    agent/capture/units.py): a unit is dead when it was exactly zero on every input of every training forward
    pass since the previous report (every image position of a channel, every token of a feature), and
    the rule fires when a fraction >= min_dead_fraction of the layer's units are dead. That is
    SageMaker Debugger's test (a unit dead when inactive on all inputs; half of a layer's units dead),
    with "inactive" meaning never positive rather than positive on < 1 % of the inputs: exact and
    mergeable. A healthy sparse layer stays quiet at any zero fraction as long as each unit fires on
    some inputs, and a layer whose units die one by one shows before its outputs are all zero. Half, not
    more: a unit dead for a whole window rarely comes back (its gradient is zero too), so half the
    width gone is already a layer to look at; below it, a few dead units are common and harmless.

    Fallback, for layers without unit counts (other agents, `units_max` 0, modules that are not
    nn.ReLU/ReLU6): an activation whose min is >= 0 (GELU and SiLU go negative and are never read)
    with a fraction of exact zeros >= min_zero_fraction; at 0.99 almost every unit is zero on almost
    every input. At initialisation a ReLU layer has about half its outputs zero; deliberately sparse
    ReLU models (ReLU LLM MLPs) reach 90-97 %, below the default. Defaults: min_dead_fraction 0.5,
    min_zero_fraction 0.99, window 10."""

    name = "DeadReLU"
    DEFAULTS = {"min_dead_fraction": 0.5, "min_zero_fraction": 0.99, "window": 10}

    def hits(self, view: ReportView) -> list[tuple[TensorMeta, float]] | None:
        units, acts = view.of_kind(UNITS), view.of_kind(ACTIVATION)
        if not units and not acts:
            return None
        dead, frac, layers, out = self.p["min_dead_fraction"], self.p["min_zero_fraction"], self.layers, []
        counted = set()
        for meta, s in units:
            counted.add(meta.layer)
            if s.count and s.zero_count >= dead * s.count and layers(meta.layer):
                out.append((meta, s.zero_count / s.count))
        for meta, s in acts:
            n = s.count
            if n and s.zero_count >= frac * n and s.min >= 0 and meta.layer not in counted and layers(meta.layer):
                out.append((meta, s.zero_count / n))
        return out

    def value(self, s) -> float:
        return s.zero_count / s.count if s.count else math.nan

    def describe(self, meta, value, reports, view):
        if meta.kind == UNITS:
            return (f"Layer {meta.layer} has dead units: {pct(value)} of its units never fired in the forward passes "
                    f"before each of {reports} consecutive reports up to step {view.step}",
                    self.p["min_dead_fraction"], WARNING)
        return (f"Layer {meta.layer} looks dead: {pct(value)} of its ReLU-like outputs {meta.name} are zero in "
                f"{reports} consecutive reports up to step {view.step}", self.p["min_zero_fraction"], WARNING)

    @classmethod
    def check(cls, p):
        for key in ("min_dead_fraction", "min_zero_fraction"):
            if not 0 < p[key] <= 1:
                raise ValueError(f"{key}: expected a fraction in (0, 1]")


def saturated_fraction(s) -> float:
    """Fraction of the finite elements with |x| >= 0.5 of a summary bounded by [-1, 1]. Exact from the
    histogram when there is one; otherwise the lower bound that the mean square gives: with |x| <= 1,
    E[x^2] <= f + (1 - f) / 4, so f >= (E[x^2] - 1/4) / (3/4)."""
    n = summary_moments(s)[0]
    if n <= 0:
        return 0.0
    hist = s.histogram
    if len(hist):
        off = s.histogram_offset
        top = sum(hist[i - off] for i in (_HALF_BUCKET, _ONE_BUCKET) if 0 <= i - off < len(hist))
        return top / n
    return max((s.sum_squares / n - 0.25) / 0.75, 0.0)


class SaturatedActivation(TensorRule):
    """A tanh-like layer driven into saturation: an activation bounded by [-1, 1] (min >= -1 and
    max <= 1: tanh, hardtanh, softsign; sigmoid is read too but only its saturation towards 1 can
    show) with a fraction >= min_fraction of its outputs in the top histogram bucket, |y| in
    [0.5, 1], in `window` consecutive reports of a rank. The log2 histogram cannot resolve |y| > 0.99,
    so the rule measures |y| >= 0.5 (tanh input |x| >= 0.55) and asks for most of the mass there:
    with tanh inputs ~ N(0, s^2) the fraction is 0.58 at s = 1, 0.86 at s = 3 and reaches 0.95 near
    s = 9, where most inputs are beyond SageMaker Debugger's saturation threshold |x| > 9.5 on half
    the layer. Without a histogram the mean-square lower bound of `saturated_fraction` is used.
    Defaults: min_fraction 0.95, window 10."""

    name = "SaturatedActivation"
    DEFAULTS = {"min_fraction": 0.95, "window": 10}

    def hits(self, view: ReportView) -> list[tuple[TensorMeta, float]] | None:
        acts = view.of_kind(ACTIVATION)
        if not acts:
            return None
        frac, layers, out = self.p["min_fraction"], self.layers, []
        for meta, s in acts:
            if s.min < -1.0 or s.max > 1.0 or not s.count or s.zero_count == s.count:
                continue
            f = saturated_fraction(s)
            if f >= frac and layers(meta.layer):
                out.append((meta, f))
        return out

    def value(self, s) -> float:
        return saturated_fraction(s)

    def describe(self, meta, value, reports, view):
        return (f"Layer {meta.layer} is saturated: {pct(value)} of its outputs {meta.name} have |y| >= 0.5 (bounded "
                f"by [-1, 1]) in {reports} consecutive reports up to step {view.step}; gradients through it vanish",
                self.p["min_fraction"], WARNING)

    @classmethod
    def check(cls, p):
        if not 0 < p["min_fraction"] <= 1:
            raise ValueError("min_fraction: expected a fraction in (0, 1]")

