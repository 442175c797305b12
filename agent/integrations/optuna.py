"""Optuna pruning on gradwatch's alerts: a trial is pruned once an alert of chosen rules fired for its run.

    from gradwatch.agent.integrations.optuna import GradwatchPruner, watch_trial

    pruner = GradwatchPruner(rules=("ExplodingGradient", "NonFinite"), url="127.0.0.1:4772")
    study = optuna.create_study(pruner=pruner)

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)       # suggest first: the params are registered
        ...
        with watch_trial(trial, model, optimizer) as watcher:       # run "<study>-trial-<number>"
            for step, (x, y) in enumerate(loader):
                ...; optimizer.step(); watcher.step(loss=loss)
                trial.report(loss.item(), step)                   # sync: Optuna needs a number; yours to place
                if trial.should_prune():                            # after watcher.step: the step is judged
                    raise optuna.TrialPruned(pruner.reason(trial))

Optional: importing this module needs `optuna`. `watch_trial` is `gradwatch.watch` with the trial's run id, its
`params` as hyperparameters (plain values) and labels `study` and `trial`; it records the run id as the trial's
user attribute `gradwatch_run`, where the pruner (and a person in the dashboard) finds it.

What `should_prune()` asks (GradwatchPruner.prune): whether an alert of `rules` has fired for the trial's run.
When the trial's watcher lives in this process, it first waits (at most `wait_s`) until the aggregator has
judged everything the trial reported so far: the watcher is flushed, then the aggregator's step for the run is
polled until it reaches the step of the watcher's last report. A trial is then pruned at the first
`should_prune()` after the report that raised the alert: called every step, within one step of the alert. The
cost is one round trip through collector, Redis and aggregator per call (20 to 40 ms on one machine, mostly the
watcher's flush; the first call of a trial also waits for the aggregator to discover the run,
`GRADWATCH_AGGREGATOR_DISCOVER_INTERVAL_S`). With
`wait_s=0`, or a watcher in another process, it answers from what the aggregator knows now. A prune is final:
the alert stays the trial's reason. Without an alert the `wrapped_pruner` (MedianPruner, ...) decides, if any.
The aggregator unreachable or refusing the token: no pruning, a warning once, counted in `errors`.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable, Mapping

import optuna

import gradwatch
from gradwatch.agent.integrations.alerts import AggregatorError, AlertReader
from gradwatch.agent.integrations.hyperparameters import plain
from gradwatch.streams import RUN_ID_MAX_CHARS, run_id_part

log = logging.getLogger("gradwatch.agent")

RUN_ATTR = "gradwatch_run"  # the trial's user attribute that names its run
DEFAULT_RULES = ("ExplodingGradient", "NonFinite")
DEFAULT_WAIT_S = 5.0
POLL_S = 0.01  # between two reads of the run while waiting for the aggregator: a local HTTP GET each

_watchers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # run -> its Watcher in this process


def run_id(study_name: str, number: int) -> str:
    """The run id of trial `number`: "<study>-trial-<number>", the study's name made a valid run id part."""
    suffix = f"-trial-{number}"
    return run_id_part(study_name, RUN_ID_MAX_CHARS - len(suffix)) + suffix


def trial_run(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.Trial) -> str:
    return trial.user_attrs.get(RUN_ATTR) or run_id(study.study_name, trial.number)


def watch_trial(trial: optuna.Trial, model, optimizer=None, *, run: str | None = None,
                hyperparameters: Mapping[str, object] | None = None, labels: Mapping[str, str] | None = None,
                **watch_kwargs):
    """gradwatch.watch() for one trial: its run id (default "<study>-trial-<number>"), `trial.params` (and
    `hyperparameters`) registered as hyperparameters, labels `study` and `trial` (and `labels`). Call it after
    the trial's suggestions. `watch_kwargs` go to gradwatch.watch() (collector, select, config, ...)."""
    study = trial.study.study_name
    run = run or run_id(study, trial.number)
    trial.set_user_attr(RUN_ATTR, run)
    watcher = gradwatch.watch(model, optimizer, run=run, hyperparameters=plain(trial.params, hyperparameters),
                              labels={"study": study, "trial": str(trial.number), **(labels or {})}, **watch_kwargs)
    _watchers[run] = watcher
    return watcher


class GradwatchPruner(optuna.pruners.BasePruner):
    def __init__(self, rules: Iterable[str] = DEFAULT_RULES, *, url: str | None = None, token: str | None = None,
                 wait_s: float = DEFAULT_WAIT_S, wrapped_pruner: optuna.pruners.BasePruner | None = None):
        """rules: the alert rules that prune; url: the aggregator's HTTP address (default 127.0.0.1:4772);
        token: its read token (default $GRADWATCH_AGGREGATOR_READ_TOKEN); wait_s: how long should_prune()
        waits for the aggregator to judge the trial's latest report (0: never); wrapped_pruner: asked when no
        alert fired."""
        self.rules = frozenset(rules)
        if not self.rules:
            raise ValueError("rules: name at least one alert rule, e.g. ExplodingGradient")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.reader = AlertReader(url, token)
        self.wait_s = wait_s
        self.wrapped_pruner = wrapped_pruner
        self.errors = 0  # looks that failed: the aggregator unreachable or refusing
        self.late = 0  # looks that gave up waiting for the aggregator after wait_s
        self._lock = threading.Lock()
        self._alerts: dict[str, dict] = {}  # run -> the alert that pruned it
        self._judged: dict[str, int] = {}  # run -> the aggregator's step at the last look
        self._runs: dict[int, str] = {}  # trial number -> its run, for alert() and reason()
        self._warned: set[str] = set()

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        run = trial_run(study, trial)
        with self._lock:
            self._runs[trial.number] = run
        if self._alerted(run) is not None:
            return True
        return self.wrapped_pruner.prune(study, trial) if self.wrapped_pruner is not None else False

    def alert(self, trial: optuna.trial.FrozenTrial | optuna.Trial | int) -> dict | None:
        """The alert that pruned the trial (the aggregator's JSON: rule, step, layer, summary, ...), or None."""
        number = trial if isinstance(trial, int) else trial.number
        with self._lock:
            return self._alerts.get(self._runs.get(number, ""))

    def reason(self, trial: optuna.trial.FrozenTrial | optuna.Trial | int) -> str:
        """A sentence for optuna.TrialPruned: the alert, or the wrapped pruner's name."""
        a = self.alert(trial)
        if a is None:
            return f"pruned by {type(self.wrapped_pruner).__name__}" if self.wrapped_pruner else "pruned"
        return f"gradwatch: {a.get('rule')} at step {a.get('step')}: {a.get('summary')}"

    def _alerted(self, run: str) -> dict | None:
        with self._lock:
            if run in self._alerts:
                return self._alerts[run]
        try:
            found = self._look(run)
        except AggregatorError as e:
            self.errors += 1
            self._warn(str(e), f"gradwatch: cannot ask the aggregator about run {run!r} (no pruning on its "
                               f"alerts meanwhile): {e}")
            return None
        if found is not None:
            with self._lock:
                found = self._alerts.setdefault(run, found)
        return found

    def _look(self, run: str) -> dict | None:
        watcher = _watchers.get(run)
        target = None
        deadline = time.monotonic() + self.wait_s
        if watcher is not None and self.wait_s > 0:
            watcher.flush(self.wait_s)  # every step made so far leaves for the collector
            target = watcher.reported_step
        state = self.reader.run(run)
        while target is not None and (state.step is None or state.step < target) and not self._match(state.firing):
            if time.monotonic() >= deadline:
                self.late += 1
                self._warn("late", f"gradwatch: the aggregator had not judged step {target} of run {run!r} within "
                                   f"{self.wait_s:g} s (wait_s); pruning decisions may lag")
                break
            time.sleep(POLL_S)
            state = self.reader.run(run)
        if (found := self._match(state.firing)) is not None or state.step is None:
            return found
        # Judged since the last look: more than one report, so an alert may have fired and resolved in between.
        last = self._judged.get(run)
        self._judged[run] = state.step
        if last is None or state.step - last > 1:
            return self._match([a for a in self.reader.transitions(run) if a.get("status") == "firing"])
        return None

    def _match(self, alerts: list[dict]) -> dict | None:
        chosen = [a for a in alerts if a.get("rule") in self.rules]
        return min(chosen, key=lambda a: a.get("step", 0)) if chosen else None

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)
