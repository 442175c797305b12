"""Rules on the data a run is fed: label counts out of balance (ClassImbalance, from the user scalars
`labels/<class>`), input statistics that drift from those at the start of the run (InputDataDrift) and
inputs that were never normalised (UnnormalizedInput), from TENSOR_KIND_INPUT summaries. Pure: views
in, alert transitions out."""

from __future__ import annotations

import itertools
import math
from collections import deque

from gradwatch.aggregator.alerts.record import Alert, fmt, times
from gradwatch.aggregator.report import ReportView, TensorMeta
from gradwatch.aggregator.rules.base import LayerFilter, Rule, Streaks, pct, where
from gradwatch.names import LABELS_PREFIX, split_channel
from gradwatch.stats import moments, summary_moments
from gradwatch.v1 import run_pb2

INPUT = run_pb2.TENSOR_KIND_INPUT
DATA_LAYER = "(data)"
# Per run: at most this many classes and input tensors are followed (memory is bounded whatever is sent).
MAX_CLASSES = 10_000
MAX_INPUTS = 1_000


class _Labels:
    __slots__ = ("recent", "counts", "total")

    def __init__(self, window: int):
        self.recent: deque[dict[str, float]] = deque(maxlen=window)
        self.counts: dict[str, float] = {}  # every class seen in the run -> its count in the window
        self.total = 0.0


class ClassImbalance(Rule):
    """Label counts out of balance: the most frequent class has more than threshold_imbalance x the
    labels of the least frequent one over the run's last `window` training reports (all ranks), where
    each report carries the labels of the batches since the previous one as user scalars
    `labels/<class>` = count. A class seen earlier in the run but absent from the window counts as 0
    (a sampler or shard that stopped yielding it); an id never seen (a gap in the ids, sent as 0) is
    no class. Judged once the window holds `samples` labels and on average min_mean_per_class per
    class, so that chance does not make the ratio: with 20 per class a balanced 1000-class window has
    a ratio near 6. Evaluation reports are not read (validation sets are often ordered by class).
    SageMaker Debugger's ClassImbalance: threshold_imbalance 10 over 500 samples. A dataset that is
    imbalanced on purpose (and weighted or resampled for it): raise threshold_imbalance or disable the
    rule. Defaults: threshold_imbalance 10, samples 500, min_mean_per_class 20, window 100."""

    name = "ClassImbalance"
    DEFAULTS = {"threshold_imbalance": 10.0, "samples": 500, "min_mean_per_class": 20.0, "window": 100}
    LAYERS = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs: dict[str, _Labels] = {}

    def evaluate(self, view: ReportView) -> list[Alert]:
        scalars = view.scalars
        if not scalars or not view.train:
            return []
        batch = {k[len(LABELS_PREFIX):]: v for k, v in scalars.items()
                 if k.startswith(LABELS_PREFIX) and 0 <= v < math.inf}
        if not batch:
            return []
        st = self.runs.get(view.run)
        if st is None:
            st = self.runs[view.run] = _Labels(self.p["window"])
        counts = st.counts
        if len(st.recent) == st.recent.maxlen:
            for c, v in st.recent[0].items():  # leaves the window with the append below
                counts[c] -= v
                st.total -= v
        kept = {}
        for c, v in batch.items():
            # The agent sends every class id up to the highest seen, unused ids as 0: a class is known
            # once it has a label.
            if c in counts or (v > 0 and len(counts) < MAX_CLASSES):
                counts[c] = counts.get(c, 0.0) + v
                kept[c] = v
                st.total += v
        st.recent.append(kept)
        total = st.total
        if len(counts) < 2 or total < self.p["samples"] or total < self.p["min_mean_per_class"] * len(counts):
            return []
        most, least = max(counts, key=counts.__getitem__), min(counts, key=counts.__getitem__)
        hi, lo = counts[most], counts[least]
        ratio = hi / lo if lo > 0 else math.inf
        limit = self.p["threshold_imbalance"]
        if ratio > limit:
            return self.transition(view, True, lambda: self._fire(view, st, most, least, ratio), None)
        return self.transition(view, False, None, lambda a: self.resolved_after(
            view, a, f"Classes back within {times(limit)}x of each other (now {times(ratio)}x)", ratio))

    def _fire(self, view: ReportView, st: _Labels, most: str, least: str, ratio: float) -> Alert:
        counts, total, limit = st.counts, st.total, self.p["threshold_imbalance"]
        hi, lo = counts[most], counts[least]
        over = f"the last {total:.0f} training labels ({len(st.recent)} reports)"
        if lo == 0:
            missing = sum(1 for v in counts.values() if v == 0)
            more = f"; {missing - 1} more class{'es' if missing > 2 else ''} missing too" if missing > 1 else ""
            sentence = (f"Class {least} is missing from {over} although it was seen earlier in the run; class {most} "
                        f"has {hi:.0f} ({pct(hi / total)}){more}")
        else:
            sentence = (f"Class imbalance: class {most} has {times(ratio)}x the labels of class {least} ({hi:.0f} vs "
                        f"{lo:.0f} of {over}; limit {times(limit)}x): weight the loss or resample")
        return self.alert(view, DATA_LAYER, LABELS_PREFIX + least, ratio, limit, sentence)

    @classmethod
    def check(cls, p):
        if not (math.isfinite(p["threshold_imbalance"]) and p["threshold_imbalance"] > 1):
            raise ValueError("threshold_imbalance: expected a ratio > 1")

    def forget(self, run: str) -> None:
        super().forget(run)
        self.runs.pop(run, None)


def _mean_std(n: int, total: float, squares: float, lo: float, hi: float) -> tuple[float, float]:
    """Mean and std of merged summaries: n finite elements, their sums and their extremes."""
    _, mean, var = moments(n, 0, 0, total, squares, lo, hi)
    return mean, math.sqrt(var)


class _Inputs:
    __slots__ = ("reports", "sums", "reference", "recent")

    def __init__(self, window: int):
        self.reports = 0
        self.sums: dict[str, list[float]] = {}               # name -> [n, sum, squares, min, max] while building
        self.reference: dict[str, tuple[float, float]] | None = None  # name -> (mean, std) once built
        self.recent: deque[dict[str, tuple]] = deque(maxlen=window)


class InputDataDrift(Rule):
    """The inputs of a run drifting from what it was trained on at first: a reference mean and std per
    input tensor (and per channel, `inputs.x[0]`, when the agent sends them) merged exactly from the
    counts, sums and sums of squares of the run's first reference_reports training reports with inputs
    (all ranks), then the same over the last `window` reports: the alert fires when the window's mean
    is more than max_mean_shift reference stds from the reference mean, or its std is more than
    max_std_ratio x or less than 1 / max_std_ratio x the reference std (a loader that returns blank
    images has std 0). Catches a changed source or preprocessing (normalisation applied twice moves
    ImageNet-normalised pixels by about 2 stds and scales the std by 4), not the batch-to-batch noise
    of a shuffled dataset, nor mixup or progressive resizing. Constant inputs (reference std 0 at
    float precision) are skipped; evaluation reports are not read (no augmentation there).
    exclude_tensors: globs on input names not to follow. SageMaker Debugger has no such rule.
    Defaults: reference_reports 50, window 20, max_mean_shift 1.0, max_std_ratio 2.0."""

    name = "InputDataDrift"
    DEFAULTS = {"reference_reports": 50, "window": 20, "max_mean_shift": 1.0, "max_std_ratio": 2.0,
                "exclude_tensors": []}
    LAYERS = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs: dict[str, _Inputs] = {}
        self.names = LayerFilter(("*",), tuple(self.p["exclude_tensors"]))

    def evaluate(self, view: ReportView) -> list[Alert]:
        inputs = view.of_kind(INPUT)
        if not inputs or not view.train:
            return []
        now = {}
        for meta, s in inputs:
            n = summary_moments(s)[0]
            if n > 0 and self.names(meta.name):
                # (finite elements, sum, sum of squares, min, max): what merges exactly across reports
                now[meta.name] = (n, s.sum, s.sum_squares, s.min, s.max, meta)
        if not now:
            return []
        st = self.runs.get(view.run)
        if st is None:
            st = self.runs[view.run] = _Inputs(self.p["window"])
        if st.reference is None:
            self._build(st, now)
            return []
        st.recent.append(now)
        if len(st.recent) < st.recent.maxlen:
            return []
        found = self.drifts(st)
        if found:
            # The input farthest outside; within rounding, the first, and a whole tensor before its channels.
            factor, meta, sentence, value, threshold = max(found, key=lambda f: (float(f"{f[0]:.6g}"), -f[1].order,
                                                                                 -len(f[1].name)))
            more = f"; {len(found) - 1} more input{'s' if len(found) > 2 else ''} too" if len(found) > 1 else ""
            return self.transition(view, True, lambda: self.alert(view, meta.layer, meta.name, value, threshold, (
                f"Input {meta.name} drifted from its reference (the first {self.p['reference_reports']} training "
                f"reports): over the last {len(st.recent)} reports up to step {view.step} {sentence}{more}")), None)
        return self.transition(view, False, None, lambda a: self.resolved_after(
            view, a, f"Input {a.tensor} back within limits of its reference"))

    def _build(self, st: _Inputs, now: dict) -> None:
        for name, (n, total, squares, lo, hi, _) in now.items():
            acc = st.sums.get(name)
            if acc is None:
                if len(st.sums) >= MAX_INPUTS:
                    continue
                acc = st.sums[name] = [0, 0.0, 0.0, math.inf, -math.inf]
            acc[0] += n
            acc[1] += total
            acc[2] += squares
            acc[3] = min(acc[3], lo)
            acc[4] = max(acc[4], hi)
        st.reports += 1
        if st.reports >= self.p["reference_reports"]:
            st.reference = {name: _mean_std(*acc) for name, acc in st.sums.items()}
            st.sums = {}

    def drifts(self, st: _Inputs) -> list[tuple[float, TensorMeta, str, float, float]]:
        """(how far outside as a factor, tensor, sentence, value, threshold) of the drifting inputs."""
        k, r = self.p["max_mean_shift"], self.p["max_std_ratio"]
        earlier, out = list(itertools.islice(st.recent, len(st.recent) - 1)), []
        for name, (n, total, squares, lo, hi, meta) in st.recent[-1].items():
            ref = st.reference.get(name)
            if ref is None:
                continue
            mean_r, std_r = ref
            if std_r <= 1e-6 * abs(mean_r):  # constant (std 0), or too close to it for ratios to mean anything
                continue
            for report in earlier:
                m = report.get(name)
                if m is not None:
                    n, total, squares, lo, hi = n + m[0], total + m[1], squares + m[2], min(lo, m[3]), max(hi, m[4])
            mean, std = _mean_std(n, total, squares, lo, hi)
            shift, ratio = abs(mean - mean_r) / std_r, std / std_r
            mean_factor = shift / k
            std_factor = ratio / r if ratio >= 1 else (1 / (r * ratio) if ratio > 0 else math.inf)
            if mean_factor > 1 and mean_factor >= std_factor:
                out.append((mean_factor, meta, f"its mean {fmt(mean)} is {shift:.2g} reference stds from the "
                                               f"reference mean {fmt(mean_r)} (limit {fmt(k)})", shift, k))
            elif std_factor > 1:
                out.append((std_factor, meta, f"its std {fmt(std)} is {times(ratio)}x the reference std {fmt(std_r)} "
                                              f"(limits {times(1 / r)}x to {times(r)}x)", ratio,
                            r if ratio > 1 else 1 / r))
        return out

    @classmethod
    def check(cls, p):
        if not (math.isfinite(p["max_mean_shift"]) and p["max_mean_shift"] > 0):
            raise ValueError("max_mean_shift: expected a number of stds > 0")
        if not (math.isfinite(p["max_std_ratio"]) and p["max_std_ratio"] > 1):
            raise ValueError("max_std_ratio: expected a factor > 1")

    def forget(self, run: str) -> None:
        super().forget(run)
        self.runs.pop(run, None)


class UnnormalizedInput(Rule):
    """Inputs fed without normalisation: a floating-point input tensor (or channel) whose values all
    lie in [0, max_value] with a mean above min_mean in `window` consecutive reports of a rank and
    phase, as raw 8-bit pixels (0..255) are; scaled to [0, 1] the mean is below 1, standardised the
    minimum is negative. Training and evaluation are judged apart: a validation loader that forgot the
    transform is caught too. Reports carry no dtype, and token ids or class labels in the batch look
    the same, so an input counts as floating point only when the agent sent per-channel summaries of
    it (`inputs.x[0]`, ...: floating-point tensors with 2+ dims and at most 64 channels, NCHW images);
    NHWC images and 1-D inputs are not judged. Models that normalise inside (detectron2 takes 0..255
    images) are expected to fire: list their input in exclude_tensors (globs on the input name).
    Defaults: max_value 255, min_mean 1, window 3, exclude_tensors []."""

    name = "UnnormalizedInput"
    DEFAULTS = {"max_value": 255.0, "min_mean": 1.0, "window": 3, "exclude_tensors": []}
    LAYERS = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streaks = {True: Streaks(), False: Streaks()}  # by phase: training reports do not clear eval
        self.phase: dict[str, bool] = {}  # run -> the phase of its open incident
        self.names = LayerFilter(("*",), tuple(self.p["exclude_tensors"]))

    def evaluate(self, view: ReportView) -> list[Alert]:
        inputs = view.of_kind(INPUT)
        if not inputs:
            return []
        # Tensors with per-channel summaries (`name[c]`) are floating point: only they are judged.
        floats = {whole for whole, channel in (split_channel(m.name) for m, _ in inputs) if channel is not None}
        top, floor, hits = self.p["max_value"], self.p["min_mean"], []
        for meta, s in inputs if floats else ():
            n, mean, _ = summary_moments(s)
            if n > 0 and s.min >= 0 and s.max <= top and mean > floor and self.names(meta.name):
                if split_channel(meta.name)[0] in floats:
                    hits.append((meta, mean))
        streak = self.streaks[view.train].update(view.run, view.rank, [m.name for m, _ in hits])
        bad = [h for h in hits if streak[h[0].name] >= self.p["window"]]
        phase = "training" if view.train else "evaluation"
        if bad:
            meta, mean = min(bad, key=lambda h: h[0].order)
            more = f"; {len(bad) - 1} more input{'s' if len(bad) > 2 else ''} too" if len(bad) > 1 else ""

            def fire() -> Alert:
                self.phase[view.run] = view.train
                return self.alert(view, meta.layer, meta.name, mean, floor, (
                    f"Input {meta.name} looks unnormalised in {phase}: values within [0, {top:g}] with mean "
                    f"{mean:.3g} in {streak[meta.name]} consecutive reports up to step {view.step}, as raw 8-bit "
                    f"pixels are; scale and standardise it{more}"))
            return self.transition(view, True, fire, None)
        if self.phase.get(view.run, view.train) != view.train:
            return []  # the open incident is the other phase's: no evidence either way
        return self.transition(view, False, None, lambda a: self._resolved(view, a, phase))

    def _resolved(self, view: ReportView, a: Alert, phase: str) -> Alert:
        self.phase.pop(view.run, None)
        return a.resolve(view.step, view.time, math.nan, (
            f"Inputs normalised in {phase} for at least {self.incidents.resolve_after} consecutive reports up to "
            f"step {view.step}; the incident began at step {a.step} in {a.tensor} {where(view)}"))

    @classmethod
    def check(cls, p):
        if not (math.isfinite(p["max_value"]) and p["max_value"] > p["min_mean"]):
            raise ValueError("max_value: expected a finite number > min_mean")

    def forget(self, run: str) -> None:
        super().forget(run)
        for s in self.streaks.values():
            s.forget(run)
        self.phase.pop(run, None)
