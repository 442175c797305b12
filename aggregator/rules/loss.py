"""Rules on the training loss and on the reports' arrival: loss spikes, a loss that stopped improving,
and a run that stopped reporting (time-driven: `evaluate_idle(now)`). Only training reports count;
non-finite losses are NonFinite's. Pure: views (and the time) in, alert transitions out."""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from gradwatch.aggregator.alerts.record import FIRING, Alert, fmt, iso, times
from gradwatch.aggregator.report import ReportView
from gradwatch.aggregator.rules.base import LOSS_LAYER, RUN_LAYER, WARNING, Rule


def _train_loss(view: ReportView) -> float | None:
    loss = view.loss
    return loss if view.train and loss is not None and math.isfinite(loss) else None


class LossSpike(Rule):
    """The training loss above `ratio` x the rolling median of the rank's last `window` losses, once
    `min_history` losses are known (the fast fall of the first steps is never a spike, and the median
    ignores single outliers). A loss whose median is zero or negative is not judged: a ratio means
    nothing there. A learning-rate warm-up bump (1.5-2x) and per-batch noise stay under the default.
    SageMaker Debugger has no such rule. Defaults: ratio 3, window 50, min_history 20."""

    name = "LossSpike"
    DEFAULTS = {"ratio": 3.0, "window": 50, "min_history": 20}
    LAYERS = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.history: dict[tuple[str, int], deque[float]] = {}

    def evaluate(self, view: ReportView) -> list[Alert]:
        loss = _train_loss(view)
        if loss is None:
            return []
        h = self.history.get((view.run, view.rank))
        if h is None:
            h = self.history[(view.run, view.rank)] = deque(maxlen=self.p["window"])
        ratio, median = self.p["ratio"], None
        # loss > ratio * median needs loss > ratio * min: skip the sort for almost every report.
        if len(h) >= self.p["min_history"] and loss > ratio * min(h):
            median = statistics.median(h)
        n = len(h)
        h.append(loss)
        if median is not None and median > 0 and loss > ratio * median:
            return self.transition(view, True, lambda: self.alert(
                view, LOSS_LAYER, "loss", loss, ratio * median,
                f"Loss spiked to {fmt(loss)} at step {view.step}, {times(loss / median)}x its median of {fmt(median)} "
                f"over the last {n} reports"), None)
        return self.transition(view, False, None, lambda a: self.resolved_after(
            view, a, f"Loss back under {fmt(ratio)}x its rolling median (now {fmt(loss)})", loss))

    @classmethod
    def check(cls, p):
        if not p["ratio"] > 1:
            raise ValueError("ratio: expected a factor > 1")
        if not 1 <= p["min_history"] <= p["window"]:
            raise ValueError("min_history: expected an integer from 1 to window")

    def forget(self, run: str) -> None:
        super().forget(run)
        for key in [k for k in self.history if k[0] == run]:
            del self.history[key]


class _Progress:
    __slots__ = ("recent", "total", "step", "ref", "ref_step", "best")

    def __init__(self, smoothing: int):
        self.recent: deque[float] = deque(maxlen=smoothing)
        self.total = 0.0
        self.step = -1
        self.ref: float | None = None  # the smoothed loss at the last significant improvement
        self.ref_step = 0
        self.best = math.inf


class LossNotDecreasing(Rule):
    """No significant improvement of the training loss for `window_steps` steps: the loss is smoothed
    over the rank's last `smoothing` reports (per-batch noise would otherwise set new minima by
    chance), and the rolling minimum counts as improved only when it falls by more than
    min_relative_improvement x |reference| below the reference, the smoothed loss at the previous
    improvement. SageMaker Debugger checks a 0.1 % decrease every 10 steps; that fires on every noisy
    stretch, so the window here is 1000 steps (late-training progress of a large model is about 0.1 %
    per 1000 steps: raise window_steps for long runs). Steps before warmup_steps are not judged; a
    step going backwards (restart from a checkpoint) starts over. Defaults: window_steps 1000,
    min_relative_improvement 0.001, smoothing 10, warmup_steps 0."""

    name = "LossNotDecreasing"
    DEFAULTS = {"window_steps": 1000, "min_relative_improvement": 0.001, "smoothing": 10, "warmup_steps": 0}
    LAYERS = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress: dict[tuple[str, int], _Progress] = {}

    def evaluate(self, view: ReportView) -> list[Alert]:
        loss = _train_loss(view)
        if loss is None:
            return []
        key = (view.run, view.rank)
        p = self.progress.get(key)
        if p is None or view.step < p.step:
            p = self.progress[key] = _Progress(self.p["smoothing"])
        p.step = view.step
        if len(p.recent) == p.recent.maxlen:
            p.total -= p.recent[0]
        p.recent.append(loss)
        p.total += loss
        if len(p.recent) < p.recent.maxlen or view.step < self.p["warmup_steps"]:
            return []
        smoothed = p.total / len(p.recent)
        p.best = min(p.best, smoothed)
        if p.ref is None or smoothed < p.ref - self.p["min_relative_improvement"] * abs(p.ref):
            p.ref, p.ref_step = smoothed, view.step
        stalled = view.step - p.ref_step
        limit = self.p["window_steps"]
        if stalled >= limit:
            return self.transition(view, True, lambda: self.alert(
                view, LOSS_LAYER, "loss", stalled, limit,
                f"Loss not decreasing: no improvement of more than {pct_text(self.p['min_relative_improvement'])} "
                f"below {fmt(p.ref)} (step {p.ref_step}) for {stalled} steps up to step {view.step}; smoothed loss "
                f"now {fmt(smoothed)}, best {fmt(p.best)}"), None)
        return self.transition(view, False, None, lambda a: self.resolved_after(
            view, a, f"Loss improving again (smoothed {fmt(smoothed)})", stalled))

    @classmethod
    def check(cls, p):
        if not p["window_steps"] >= 1:
            raise ValueError("window_steps: expected an integer >= 1")
        if not 0 <= p["min_relative_improvement"] < 1:
            raise ValueError("min_relative_improvement: expected a fraction in [0, 1)")

    def forget(self, run: str) -> None:
        super().forget(run)
        for key in [k for k in self.progress if k[0] == run]:
            del self.progress[key]


def pct_text(x: float) -> str:
    return f"{100 * x:.2g} %"


@dataclass(frozen=True, slots=True)
class _At:
    """What Hysteresis reads of a report, for incidents judged on this aggregator's clock."""

    run: str
    rank: int
    step: int
    time: float


class StalledTraining(Rule):
    """No report of a run (any rank, training or evaluation) for threshold_s seconds of this
    aggregator's clock, so a backlog read after a restart or an agent clock that is off does not
    count. Checked by `evaluate_idle(now)`, which the consumer calls at its discovery interval; the
    next report resolves it (after keep_firing_s). Only runs that reported since this aggregator
    started are watched, until they expire (run_expiry_s). A run that finished normally looks the
    same unless the agent closed its watcher: the rank's end-of-run marker (StepReport.final) ends the
    watch of that run. SageMaker Debugger's StalledTrainingRule default: 1800 s. Defaults: threshold_s
    1800."""

    name = "StalledTraining"
    DEFAULTS = {"threshold_s": 1800.0}
    LAYERS = False
    RESOLVE_AFTER = 1
    SEES_FINAL = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last: dict[str, tuple[float, int, int]] = {}  # run -> (applied_at, rank, step)

    def evaluate(self, view: ReportView) -> list[Alert]:
        if view.final:  # a rank ended its run cleanly: silence from now on is expected
            self.last.pop(view.run, None)
        else:
            self.last[view.run] = (view.applied_at, view.rank, view.step)
        if not self.incidents.open:
            return []
        at = _At(view.run, 0, view.step, view.applied_at)
        alert = self.incidents.clear((view.run, self.name), at, lambda a: a.resolve(
            view.step, view.applied_at, 0.0,
            f"Run {view.run} reports again: step {view.step} from rank {view.rank}; it was silent from step {a.step}"))
        return [alert] if alert else []

    def evaluate_idle(self, now: float) -> list[Alert]:
        out = []
        limit = self.p["threshold_s"]
        for run, (seen, rank, step) in self.last.items():
            idle = now - seen
            if idle <= limit or (run, self.name) in self.incidents.open:
                continue
            alert = self.incidents.bad((run, self.name), _At(run, 0, step, now),
                                       lambda r=run, st=step, rk=rank, i=idle: self._fire(r, st, rk, i, now))
            if alert:
                out.append(alert)
        return out

    def _fire(self, run: str, step: int, rank: int, idle: float, now: float) -> Alert:
        limit = self.p["threshold_s"]
        return Alert(self.name, FIRING, run, step, rank, RUN_LAYER, "", idle, limit, self.settings.severity or WARNING,
                     f"Training stalled: no report from run {run} for {idle:.0f} s (limit {limit:.0f} s); the last was "
                     f"step {step} from rank {rank}", iso(now))

    @classmethod
    def check(cls, p):
        if not (math.isfinite(p["threshold_s"]) and p["threshold_s"] > 0):
            raise ValueError("threshold_s: expected a number of seconds > 0")

    def forget(self, run: str) -> None:
        super().forget(run)
        self.last.pop(run, None)
