"""Rules on the statistics of single tensors: all-zero, frozen, out-of-range spread, and a poor
initialisation judged on the first report of a run. Pure: views in, alert transitions out."""

from __future__ import annotations

import math

from gradwatch.aggregator.alerts.record import Alert, fmt
from gradwatch.aggregator.report import ReportView, TensorMeta
from gradwatch.aggregator.rules.base import WARNING, Rule, TensorRule, pct
from gradwatch.stats import summary_moments
from gradwatch.v1 import run_pb2

PARAMETER = run_pb2.TENSOR_KIND_PARAMETER
# Unchanged parameters are remembered per (run, rank): at most this many tensors per rank.
MAX_TRACKED = 50_000


class AllZero(TensorRule):
    """A tensor whose elements are (almost) all zero: zero_count >= min_zero_fraction x count in
    `window` consecutive reports of a rank. SageMaker Debugger's default threshold is 100 %. Reads
    parameters and gradients by default: a gradient that stays zero belongs to a parameter that no
    longer takes part in the loss; a parameter that stays zero never trained. Zero-initialised
    biases and heads, and the zero gradients they cause at the first step, change after the first
    update, hence `window`. All-zero activations are DeadReLU's. Defaults: min_zero_fraction 1.0,
    window 3, kinds ["parameter", "gradient"]."""

    name = "AllZero"
    DEFAULTS = {"min_zero_fraction": 1.0, "window": 3, "kinds": ["parameter", "gradient"]}
    KIND_KEYS = ("kinds",)

    def hits(self, view: ReportView) -> list[tuple[TensorMeta, float]] | None:
        kinds = self.kinds()
        if not self.has_kinds(view, kinds):
            return None
        frac, layers, out = self.p["min_zero_fraction"], self.layers, []
        for kind in kinds:
            for meta, s in view.of_kind(kind):
                n = s.count
                if n and s.zero_count >= frac * n and layers(meta.layer):
                    out.append((meta, s.zero_count / n))
        return out

    def value(self, s) -> float:
        return s.zero_count / s.count if s.count else math.nan

    def describe(self, meta, value, reports, view):
        what = "all zero" if value >= 1 else f"{pct(value)} zero"
        return (f"{meta.kind_name.capitalize()} {meta.name} of layer {meta.layer} is {what} in {reports} consecutive "
                f"reports up to step {view.step}", self.p["min_zero_fraction"], WARNING)

    @classmethod
    def check(cls, p):
        if not 0 < p["min_zero_fraction"] <= 1:
            raise ValueError("min_zero_fraction: expected a fraction in (0, 1]")


class TensorVariance(TensorRule):
    """The standard deviation of a tensor above max_std or below min_std in `window` consecutive
    reports of a rank (SageMaker Debugger's TensorVariance has no default limits). std is the
    population std of the finite elements, from sum and sum of squares (gradwatch.stats.moments: exactly 0
    for a constant tensor); tensors of fewer than two elements and all-zero tensors (AllZero, DeadReLU)
    are skipped. Reads activations by default: std < 1e-8 is a collapsed layer that passes the same
    value to every unit, std > 1e3 a blown-up one. Parameters are not read by default: LayerNorm
    weights (all ones) and biases start with std 0. Defaults: min_std 1e-8, max_std 1e3, window 3,
    kinds ["activation"]."""

    name = "TensorVariance"
    DEFAULTS = {"min_std": 1e-8, "max_std": 1e3, "window": 3, "kinds": ["activation"]}
    KIND_KEYS = ("kinds",)

    def hits(self, view: ReportView) -> list[tuple[TensorMeta, float]] | None:
        kinds = self.kinds()
        if not self.has_kinds(view, kinds):
            return None
        lo, hi, layers, out = self.p["min_std"], self.p["max_std"], self.layers, []
        lo2x2 = 2 * lo * lo
        for kind in kinds:
            for meta, s in view.of_kind(kind):
                # Cheap bounds first: range^2 / (2 n) <= variance <= range^2 / 4.
                spread, count = s.max - s.min, s.count
                if spread <= 2 * hi and spread * spread > lo2x2 * count:
                    continue
                n, _, var = summary_moments(s)
                if n < 2 or s.zero_count == count:
                    continue
                std = math.sqrt(var)
                if (std > hi or std < lo) and layers(meta.layer):
                    out.append((meta, std))
        return out

    def value(self, s) -> float:
        return math.sqrt(summary_moments(s)[2])

    def badness(self, std: float) -> float:
        """How far outside the limits, as a factor."""
        return std / self.p["max_std"] if std > self.p["max_std"] else self.p["min_std"] / max(std, 1e-300)

    def describe(self, meta, std, reports, view):
        hi, lo = self.p["max_std"], self.p["min_std"]
        above = std > hi
        return (f"Standard deviation of {meta.kind_name} {meta.name} of layer {meta.layer} is {fmt(std)}, "
                f"{'above' if above else 'below'} {fmt(hi if above else lo)} in {reports} consecutive reports up to "
                f"step {view.step}", hi if above else lo, WARNING)

    @classmethod
    def check(cls, p):
        if not 0 <= p["min_std"] < p["max_std"]:
            raise ValueError("min_std, max_std: expected 0 <= min_std < max_std")


class UnchangedTensor(Rule):
    """A parameter that does not train: its sum, sum of squares, min and max identical in `window`
    consecutive comparisons of a rank's reports (SageMaker Debugger compares the values themselves
    with rtol 1e-5 over 3 steps; the summary only allows an exact comparison of the statistics, and
    the float64 sum changes with any single element). A comparison counts only between training
    reports of increasing steps where the earlier report had a learning rate above zero and no
    NaN/Inf (an AMP loss scaler skips that optimizer step), so warm-up from lr 0 and the skipped
    steps at the start of mixed-precision training stay quiet. Frozen layers that are meant to be
    frozen: list them in `layers.exclude`. Defaults: window 5."""

    name = "UnchangedTensor"
    DEFAULTS = {"window": 5}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (run, rank) -> tensor -> (sum, sum_squares, unchanged comparisons in a row, (min, max) then)
        self.prev: dict[tuple[str, int], dict[str, tuple]] = {}
        # (run, rank) -> (step, whether the next comparison counts)
        self.last: dict[tuple[str, int], tuple[int, bool]] = {}

    def evaluate(self, view: ReportView) -> list[Alert]:
        params = view.of_kind(PARAMETER)
        if not view.train or not params:
            return []
        key = (view.run, view.rank)
        prev = self.prev.setdefault(key, {})
        last = self.last.get(key)
        counts = last is not None and last[1] and view.step > last[0]
        self.last[key] = (view.step, bool(view.learning_rate is None or view.learning_rate > 0) and not view.nonfinite)
        window, layers, frozen = self.p["window"], self.layers, []
        for meta, s in params:
            if not layers(meta.layer):
                continue
            # The float64 sums change with any changed element: min and max are read only when they
            # match, and are then compared with those at the start of the unchanged run.
            total, squares = s.sum, s.sum_squares
            old = prev.get(meta.name)
            if old is None:
                if len(prev) < MAX_TRACKED:
                    prev[meta.name] = (total, squares, 0, None)
                continue
            n, extremes = old[2], old[3]
            if counts:
                if total == old[0] and squares == old[1]:
                    now = (s.min, s.max)
                    n, extremes = (n + 1, now) if extremes is None or extremes == now else (0, None)
                else:
                    n, extremes = 0, None
            prev[meta.name] = (total, squares, n, extremes)
            if n >= window:
                frozen.append((meta, n))
        if not counts:
            return []
        if frozen:
            meta, n = min(frozen, key=lambda f: f[0].order)
            others = len(frozen) - 1
            more = f"; {others} more parameter{'s' if others > 1 else ''} unchanged" if others else ""
            return self.transition(view, True, lambda: self.alert(view, meta.layer, meta.name, n, window, (
                f"Parameter {meta.name} of layer {meta.layer} has not changed in {n} consecutive reports up to step "
                f"{view.step} although the learning rate is {fmt(view.learning_rate or math.nan)}{more}")), None)
        return self.transition(view, False, None, lambda a: self.resolved_after(view, a, f"{a.tensor} changing again"))

    def forget(self, run: str) -> None:
        super().forget(run)
        for d in (self.prev, self.last):
            for key in [k for k in d if k[0] == run]:
                del d[key]


class PoorWeightInitialization(Rule):
    """Judged once per rank, on the first report of a run when its step is at most max_step (a run
    followed from the middle is not judged): every weight matrix or kernel (2 or more dimensions,
    not all zero) of the registered shape is checked for
      - constant non-zero values (min == max): every unit computes the same function and gradient
        descent cannot tell them apart;
      - a mean far from zero: |mean| > max_mean_ratio x std (uniform [0, 1) init has 1.7);
      - a gain std x sqrt(fan_in) outside [min_gain, max_gain], fan_in = prod(shape[1:]). LeCun has
        gain 1, He sqrt(2), PyTorch's default for Linear/Conv 1/sqrt(3), GPT-2's 0.02 at width 768
        0.55; Xavier with a 256k vocabulary head 0.08 and GPT-2's scaled residual projections 0.2.
    SageMaker Debugger instead bounds the ratio of the largest to the smallest variance across layers
    by 10; scaled residual initialisations (GPT-2, T-Fixup) exceed that by design, so it is not used.
    Embeddings (PyTorch default N(0, 1): gain sqrt(dim), 28 at 768) are excluded by name. Shapes are
    those registered by the rank: a tensor-parallel shard changes fan_in by the parallel degree and
    FSDP's flat parameters (1-D) are skipped. Defaults: max_step 1, min_gain 0.02, max_gain 10,
    max_mean_ratio 1, layers.exclude ["*emb*", "*wte", "*wpe"]."""

    name = "PoorWeightInitialization"
    DEFAULTS = {"max_step": 1, "min_gain": 0.02, "max_gain": 10.0, "max_mean_ratio": 1.0}
    EXCLUDE = ("*emb*", "*wte", "*wpe")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.judged: set[tuple[str, int]] = set()

    def evaluate(self, view: ReportView) -> list[Alert]:
        key = (view.run, view.rank)
        if key in self.judged:
            return self.transition(view, False, None, lambda a: self.resolved_after(
                view, a, "Initialisation judged at the first report; no new evidence"))
        params = view.of_kind(PARAMETER)
        if view.step > self.p["max_step"]:
            self.judged.add(key)
            return []
        if not params:
            return []
        self.judged.add(key)
        worst = None  # (factor, meta, value, threshold, sentence)
        for meta, s in params:
            if len(meta.shape) < 2 or s.zero_count == s.count or not self.layers(meta.layer):
                continue
            found = self.judge(meta, s)
            if found is not None and (worst is None or found[0] > worst[0]):
                worst = (found[0], meta, *found[1:])
        if worst is None:
            return []
        _, meta, value, threshold, sentence = worst
        return self.transition(view, True, lambda: self.alert(view, meta.layer, meta.name, value, threshold, (
            f"Poor initialisation of {meta.name} (layer {meta.layer}, shape {list(meta.shape)}) at step {view.step}: "
            f"{sentence}")), None)

    def judge(self, meta: TensorMeta, s) -> tuple[float, float, float, str] | None:
        """(how far outside, value, threshold, sentence), or None when the tensor looks fine."""
        n, mean, var = summary_moments(s)
        if n < 2:
            return None
        if s.min == s.max:
            return (math.inf, float(s.min), 0.0, f"every element is {fmt(s.min)}: units cannot differentiate")
        std = math.sqrt(var)
        ratio = abs(mean) / std if std > 0 else math.inf
        fan_in = math.prod(meta.shape[1:])
        gain = std * math.sqrt(fan_in)
        lo, hi, mr = self.p["min_gain"], self.p["max_gain"], self.p["max_mean_ratio"]
        found = []
        if ratio > mr:
            found.append((ratio / mr, ratio, mr, f"mean {fmt(mean)} is {ratio:.2g}x its std {fmt(std)}"))
        if gain > hi or gain < lo:
            limit = hi if gain > hi else lo
            found.append((max(gain / hi, lo / max(gain, 1e-300)), gain, limit,
                          f"std {fmt(std)} x sqrt(fan_in {fan_in}) = {fmt(gain)}, {'above' if gain > hi else 'below'} "
                          f"{fmt(limit)} (He init: {fmt(math.sqrt(2))}, LeCun: 1)"))
        return max(found) if found else None

    @classmethod
    def check(cls, p):
        if not 0 < p["min_gain"] < p["max_gain"]:
            raise ValueError("min_gain, max_gain: expected 0 < min_gain < max_gain")
        if not p["max_mean_ratio"] > 0:
            raise ValueError("max_mean_ratio: expected a ratio > 0")

    def forget(self, run: str) -> None:
        super().forget(run)
        self.judged = {k for k in self.judged if k[0] != run}
