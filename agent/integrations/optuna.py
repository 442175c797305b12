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

What `should_prune()` asks (GradwatchPruner.prune, the decision of alerts.StopOnAlerts): whether an alert of
`rules` has fired for the trial's run.
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

from collections.abc import Iterable, Mapping

import optuna

import gradwatch
from gradwatch.agent.integrations.alerts import DEFAULT_RULES, DEFAULT_WAIT_S, StopOnAlerts, sentence, watching
from gradwatch.agent.integrations.hyperparameters import plain
from gradwatch.streams import RUN_ID_MAX_CHARS, run_id_part

RUN_ATTR = "gradwatch_run"  # the trial's user attribute that names its run


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
    watching(run, watcher)
    return watcher


class GradwatchPruner(StopOnAlerts, optuna.pruners.BasePruner):
    def __init__(self, rules: Iterable[str] = DEFAULT_RULES, *, url: str | None = None, token: str | None = None,
                 wait_s: float = DEFAULT_WAIT_S, wrapped_pruner: optuna.pruners.BasePruner | None = None):
        """rules: the alert rules that prune; url: the aggregator's HTTP address (default 127.0.0.1:4772);
        token: its read token (default $GRADWATCH_AGGREGATOR_READ_TOKEN); wait_s: how long should_prune()
        waits for the aggregator to judge the trial's latest report (0: never); wrapped_pruner: asked when no
        alert fired. `errors` and `late` count the looks that failed and those that gave up waiting."""
        super().__init__(rules, url=url, token=token, wait_s=wait_s, acting="pruning")
        self.wrapped_pruner = wrapped_pruner

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        if self._decide(trial.number, trial_run(study, trial)) is not None:
            return True
        return self.wrapped_pruner.prune(study, trial) if self.wrapped_pruner is not None else False

    def alert(self, trial: optuna.trial.FrozenTrial | optuna.Trial | int) -> dict | None:
        """The alert that pruned the trial (the aggregator's JSON: rule, step, layer, summary, ...), or None."""
        return self._alert_of(trial if isinstance(trial, int) else trial.number)

    def reason(self, trial: optuna.trial.FrozenTrial | optuna.Trial | int) -> str:
        """A sentence for optuna.TrialPruned: the alert, or the wrapped pruner's name."""
        a = self.alert(trial)
        if a is None:
            return f"pruned by {type(self.wrapped_pruner).__name__}" if self.wrapped_pruner else "pruned"
        return sentence(a)
