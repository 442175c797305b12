"""Rules on how training generalises and steps: a validation loss that leaves the training loss behind
(Overfit) or stops improving (Overtraining), judged once per evaluation, and optimizer updates out of
proportion to the weights they change (WeightUpdateRatio). Pure: views in, alert transitions out."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from gradwatch.aggregator.alerts.record import Alert, fmt, times
from gradwatch.aggregator.report import UNKNOWN_ORDER, ReportView
from gradwatch.aggregator.rules.base import LOSS_LAYER, Rule, Streaks, pct, where
from gradwatch.v1 import run_pb2

PARAMETER = run_pb2.TENSOR_KIND_PARAMETER
UPDATE = run_pb2.TENSOR_KIND_UPDATE


@dataclass(slots=True)
class Evaluation:
    """One evaluation of a rank: the mean loss of its eval reports at one step. Carries what Hysteresis
    and an alert read of a view (run, rank, step, time)."""

    run: str
    rank: int
    step: int
    time: float
    total: float
    n: int

    @property
    def loss(self) -> float:
        return self.total / self.n


class Evaluations:
    """Groups each rank's eval reports into evaluations. An evaluation runs between two optimizer steps,
    so its reports (one per eval batch, or one for the whole pass) share a step; it is complete at the
    rank's next report of another step or phase, or at its end-of-run marker. Non-finite eval losses
    are NonFinite's and left out."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, int], Evaluation] = {}

    def feed(self, view: ReportView) -> Evaluation | None:
        """The evaluation this report completes, if any."""
        key = (view.run, view.rank)
        ev = self.pending.get(key)
        loss = view.loss
        if not view.train and not view.final and loss is not None and math.isfinite(loss):
            if ev is not None and ev.step == view.step:
                ev.total += loss
                ev.n += 1
                ev.time = view.time
                return None
            self.pending[key] = Evaluation(view.run, view.rank, view.step, view.time, loss, 1)
            return ev
        if ev is not None and (view.final or view.train or view.step != ev.step):
            del self.pending[key]
            return ev
        return None

    def forget(self, run: str) -> None:
        for key in [k for k in self.pending if k[0] == run]:
            del self.pending[key]


def _finite_train_loss(view: ReportView) -> float | None:
    loss = view.loss
    return loss if view.train and not view.final and loss is not None and math.isfinite(loss) else None


class _ValidationRule(Rule):
    """What Overfit and Overtraining share: evaluations assembled from eval reports, each judged with the
    mean of the rank's last train_window training losses before it (`judge`, per subclass)."""

    LAYERS = False
    RESOLVE_AFTER = 2
    SEES_FINAL = True  # the end-of-run marker completes the last evaluation

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluations = Evaluations()
        self.train: dict[tuple[str, int], deque[float]] = {}

    def evaluate(self, view: ReportView) -> list[Alert]:
        done = self.evaluations.feed(view)
        out = self.judge(done) if done is not None else []
        loss = _finite_train_loss(view)
        if loss is not None:
            h = self.train.get((view.run, view.rank))
            if h is None:
                h = self.train[(view.run, view.rank)] = deque(maxlen=self.p["train_window"])
            h.append(loss)
        return out

    def judge(self, ev: Evaluation) -> list[Alert]:
        raise NotImplementedError

    def forget(self, run: str) -> None:
        super().forget(run)
        self.evaluations.forget(run)
        for d in self._per_rank():
            for key in [k for k in d if k[0] == run]:
                del d[key]

    def _per_rank(self) -> tuple[dict, ...]:
        return (self.train,)


class Overfit(_ValidationRule):
    """The validation loss pulling away from the training loss: (validation - training) / training
    above ratio_threshold in `patience` consecutive evaluations of a rank, where the validation loss is
    the mean of an evaluation's eval reports and the training loss the mean of the rank's last
    train_window training losses before it (judged once that many are known, and from start_step on).
    A training loss <= 0 is not judged: a ratio means nothing there. SageMaker Debugger's defaults are
    ratio_threshold 0.1 with patience 1 step; one evaluation of a small validation set is noisy, so the
    gap must hold for 3. A validation loss below the training loss (dropout, augmentation) is never a
    gap. Resolves after 2 evaluations under the threshold. Defaults: ratio_threshold 0.1, patience 3,
    train_window 20, start_step 0."""

    name = "Overfit"
    DEFAULTS = {"ratio_threshold": 0.1, "patience": 3, "train_window": 20, "start_step": 0}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streak: dict[tuple[str, int], int] = {}

    def judge(self, ev: Evaluation) -> list[Alert]:
        key = (ev.run, ev.rank)
        h = self.train.get(key)
        if ev.step < self.p["start_step"] or h is None or len(h) < h.maxlen:
            return []
        train = sum(h) / len(h)
        if train <= 0:
            return []
        val, limit = ev.loss, self.p["ratio_threshold"]
        gap = (val - train) / train
        n = self.streak[key] = self.streak.get(key, 0) + 1 if gap > limit else 0
        # An open incident stays open through a gap shorter than `patience`; it is no evidence of health.
        if n >= self.p["patience"] or (n and (ev.run, self.name) in self.incidents.open):
            return self.transition(ev, True, lambda: self.alert(
                ev, LOSS_LAYER, "eval_loss", gap, limit,
                f"Overfitting: validation loss {fmt(val)} at step {ev.step} is {pct(gap)} above the training loss "
                f"{fmt(train)} (mean of the last {len(h)} training reports), more than {pct(limit)} in {n} "
                f"consecutive evaluations"), None)
        if n:
            return []  # not yet `patience` evaluations
        return self.transition(ev, False, None, lambda a: a.resolve(ev.step, ev.time, gap, (
            f"Validation loss within {pct(limit)} of the training loss for {self.incidents.resolve_after} "
            f"consecutive evaluations up to step {ev.step} (now {pct(gap)}); the incident began at step {a.step} "
            f"{where(ev)}")))

    @classmethod
    def check(cls, p):
        if not (math.isfinite(p["ratio_threshold"]) and p["ratio_threshold"] > 0):
            raise ValueError("ratio_threshold: expected a ratio > 0")

    def _per_rank(self) -> tuple[dict, ...]:
        return (self.train, self.streak)


class _Best:
    __slots__ = ("loss", "step", "since", "last_step", "train")

    def __init__(self) -> None:
        self.loss = math.inf   # the reference: the validation loss at the last significant improvement
        self.step = -1         # its step; -1 before the first evaluation
        self.since = 0         # evaluations since then
        self.last_step = -1
        self.train: float | None = None  # the mean training loss then


class Overtraining(_ValidationRule):
    """The validation loss has stopped improving while the training loss still falls: no evaluation of
    a rank has brought the validation loss more than min_relative_improvement x |best| below the best
    so far for `patience` evaluations (so at least patience + 1 evaluations are needed), and the mean
    of the rank's last train_window training losses fell by more than that fraction meanwhile. Training
    on only fits the training set: stop, or restore the best checkpoint. When both losses are flat the
    run has converged or stalled (LossNotDecreasing's), not overtrained; a rank that reports no
    training loss is not judged. SageMaker Debugger's Overtraining waits 10 validation steps for an
    improvement of an absolute 0.01; a relative improvement fits losses of any scale. An evaluation at
    a step before the previous one (a restart from a checkpoint) starts over. Resolves after 2
    evaluations once a new best is found. Defaults: patience 10, min_relative_improvement 0.001,
    train_window 20."""

    name = "Overtraining"
    DEFAULTS = {"patience": 10, "min_relative_improvement": 0.001, "train_window": 20}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.best: dict[tuple[str, int], _Best] = {}

    def judge(self, ev: Evaluation) -> list[Alert]:
        key = (ev.run, ev.rank)
        b = self.best.get(key)
        if b is None or ev.step < b.last_step:
            b = self.best[key] = _Best()
        b.last_step = ev.step
        h = self.train.get(key)
        train = sum(h) / len(h) if h is not None and len(h) == h.maxlen else None
        val, frac = ev.loss, self.p["min_relative_improvement"]
        if b.step < 0 or val < b.loss - frac * abs(b.loss):
            b.loss, b.step, b.since, b.train = val, ev.step, 0, train
        else:
            b.since += 1
            if b.train is None:
                b.train = train
        patience, then = self.p["patience"], b.train
        if b.since >= patience and train is not None and then is not None and train < then - frac * abs(then):
            return self.transition(ev, True, lambda: self.alert(
                ev, LOSS_LAYER, "eval_loss", b.since, patience,
                f"Overtraining: the validation loss has not improved by more than {pct(frac)} on its best, "
                f"{fmt(b.loss)} at step {b.step}, in {b.since} evaluations up to step {ev.step} (now {fmt(val)}) while "
                f"the training loss fell from {fmt(then)} to {fmt(train)}; stop, or keep the best checkpoint"), None)
        return self.transition(ev, False, None, lambda a: a.resolve(ev.step, ev.time, b.since, (
            f"No overtraining for {self.incidents.resolve_after} consecutive evaluations up to step {ev.step} (best "
            f"validation loss {fmt(b.loss)} at step {b.step}); the incident began at step {a.step} {where(ev)}")))

    @classmethod
    def check(cls, p):
        if not 0 <= p["min_relative_improvement"] < 1:
            raise ValueError("min_relative_improvement: expected a fraction in [0, 1)")

    def _per_rank(self) -> tuple[dict, ...]:
        return (self.best, self.train)


class WeightUpdateRatio(Rule):
    """Optimizer steps out of proportion to the weights of a layer: ||update|| / ||weight|| above
    large_threshold or below small_threshold in `window` consecutive reports of a rank (SageMaker
    Debugger's defaults: 10 and 1e-8; a healthy ratio is near 1e-3). Both norms are per layer, over the
    parameters whose update (TENSOR_KIND_UPDATE, same tensor name) is in the report. A report without
    updates, with the learning rate 0, or with NaN/Inf anywhere (an AMP loss scaler skips that step) is
    no evidence. An update of exactly zero (a frozen layer) is UnchangedTensor's; a weight of zero
    (zero-initialised) has no ratio. Tiny ratios are expected while the learning rate is tiny, so the
    low side is judged only when the learning rate did not rise since the rank's previous report (not
    in warm-up) and is at least min_lr_fraction of the largest it has reported (not at the end of a
    decay to zero); a learning rate that was set too small is still caught. Names the layer farthest
    outside. Defaults: small_threshold 1e-8, large_threshold 10, window 3, min_lr_fraction 0.01."""

    name = "WeightUpdateRatio"
    DEFAULTS = {"small_threshold": 1e-8, "large_threshold": 10.0, "window": 3, "min_lr_fraction": 0.01}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streaks = Streaks()
        self.lrs: dict[tuple[str, int], tuple[float, float]] = {}  # (run, rank) -> (largest, previous) lr

    def ratios(self, view: ReportView) -> dict[str, float]:
        """layer -> ||update|| / ||weight|| for the layers with both, non-zero."""
        updates = {meta.name: s.sum_squares for meta, s in view.of_kind(UPDATE)}
        acc: dict[str, list[float]] = {}
        layers = self.layers
        for meta, s in view.of_kind(PARAMETER):
            u = updates.get(meta.name)
            if u is None or not layers(meta.layer):
                continue
            a = acc.get(meta.layer)
            if a is None:
                a = acc[meta.layer] = [0.0, 0.0]
            a[0] += u
            a[1] += s.sum_squares
        return {layer: math.sqrt(u / w) for layer, (u, w) in acc.items() if u > 0 and w > 0}

    def judge_low(self, view: ReportView) -> bool:
        lr = view.learning_rate
        if lr is None:
            return True
        key = (view.run, view.rank)
        largest, previous = self.lrs.get(key, (lr, math.inf))
        largest = max(largest, lr)
        self.lrs[key] = (largest, lr)
        return lr <= previous and lr >= self.p["min_lr_fraction"] * largest

    def evaluate(self, view: ReportView) -> list[Alert]:
        if not view.of_kind(UPDATE) or not view.train:
            return []  # updates are not captured (the default): no evidence, no cost
        lr = view.learning_rate
        if (lr is not None and lr <= 0) or view.nonfinite:
            return []
        low = self.judge_low(view)
        ratios = self.ratios(view)
        if not ratios:
            return []
        small, large = self.p["small_threshold"], self.p["large_threshold"]
        hits = [layer for layer, r in ratios.items() if r > large or (low and r < small)]
        streak = self.streaks.update(view.run, view.rank, hits)
        bad = [layer for layer in hits if streak[layer] >= self.p["window"]]
        if bad:
            layer = max(bad, key=lambda x: (self.badness(ratios[x]), -view.layer_order.get(x, UNKNOWN_ORDER)))
            return self.transition(view, True, lambda: self._fire(view, layer, ratios[layer], streak[layer],
                                                                  len(bad) - 1), None)
        return self.transition(view, False, None, lambda a: self.resolved_after(
            view, a, f"Updates of layer {a.layer} back within [{fmt(small)}, {fmt(large)}] of its weights",
            ratios.get(a.layer, math.nan)))

    def badness(self, ratio: float) -> float:
        """How far outside the limits, as a factor."""
        large = self.p["large_threshold"]
        return ratio / large if ratio > large else self.p["small_threshold"] / ratio

    def _fire(self, view: ReportView, layer: str, ratio: float, reports: int, others: int) -> Alert:
        large, small = self.p["large_threshold"], self.p["small_threshold"]
        lr = f" at learning rate {fmt(view.learning_rate)}" if view.learning_rate is not None else ""
        more = f"; {others} more layer{'s' if others > 1 else ''} too" if others else ""
        if ratio > large:
            what = (f"Updates of layer {layer} are {times(ratio)}x its weights (||update|| / ||weight|| above "
                    f"{fmt(large)})")
            threshold = large
        else:
            what = (f"Updates of layer {layer} barely move its weights: ||update|| / ||weight|| is {fmt(ratio)}, below "
                    f"{fmt(small)}")
            threshold = small
        return self.alert(view, layer, "", ratio, threshold,
                          f"{what} in {reports} consecutive reports up to step {view.step}{lr}{more}")

    @classmethod
    def check(cls, p):
        if not 0 < p["small_threshold"] < p["large_threshold"]:
            raise ValueError("small_threshold, large_threshold: expected 0 < small_threshold < large_threshold")
        if not 0 <= p["min_lr_fraction"] <= 1:
            raise ValueError("min_lr_fraction: expected a fraction in [0, 1]")

    def forget(self, run: str) -> None:
        super().forget(run)
        self.streaks.forget(run)
        for key in [k for k in self.lrs if k[0] == run]:
            del self.lrs[key]
