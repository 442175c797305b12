"""Ray Tune stopping on gradwatch's alerts: a trial stops once an alert of chosen rules fired for its run.

    from ray import tune
    from gradwatch.agent.integrations.ray_tune import GradwatchStopper, report, watch_trial

    def train_fn(config):                                           # runs in a Ray worker
        model, optimizer = ...
        with watch_trial(config, model, optimizer) as watcher:      # run "<experiment>-<trial id>"
            for step, (x, y) in enumerate(loader):
                ...; optimizer.step(); watcher.step(loss=loss)
                report({"loss": loss.item()}, watcher)              # sync: Tune needs a number; yours to place

    stopper = GradwatchStopper(rules=("ExplodingGradient", "NonFinite"), url="127.0.0.1:4772")
    results = tune.Tuner(train_fn, param_space=..., run_config=tune.RunConfig(stop=stopper)).fit()
    # a stopped trial's last result has "gradwatch_alert" (the reason); stopper.alert(trial_id) is the alert

Optional: importing this module needs `ray[tune]` (2.41 or later: tune.report and tune.get_context).
`watch_trial` is `gradwatch.watch` with the trial's run id, its `config` as hyperparameters (plain values) and
labels `experiment` and `trial`. The trainable runs in a Ray worker, the stopper in the driver: the stopper
cannot flush the trial's watcher, so the trainable says what to wait for. `report()` flushes the watcher (at
most `flush_s`), then calls `tune.report` with the metrics and two more keys: `gradwatch_run`, the run, and
`gradwatch_step`, the step of the watcher's last report, now with the collector (left out when the flush timed
out). Tune hands each result to the stopper before the trainable goes on (a function trainable's report waits
for the driver), and the stopper (alerts.StopOnAlerts, the Optuna pruner's decision too) waits at most `wait_s`
until the aggregator's step for the run reaches `gradwatch_step`, then looks for a firing alert of `rules`.
Reported every step, a trial is stopped at the first result whose step is the alert's or later: within one
step. The cost per result is the watcher's flush in the worker (about 10 ms for a small model on one machine)
and the decision in the driver (about 2 ms, the aggregator having mostly judged the step by then; the first
result of a trial also waits for the aggregator to discover the run); the driver decides one result at a
time. A stop is final; the stopper writes the alert's sentence into the result as `gradwatch_alert`, where
Tune keeps it as the trial's last result. Results without `gradwatch_run` are never stopped (one warning,
counted in `unwatched`). The aggregator unreachable or refusing the token: no stopping, a warning once,
counted in `errors`. `stop_all()` is always False.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ray import tune

import gradwatch
from gradwatch.agent.integrations.alerts import DEFAULT_RULES, DEFAULT_WAIT_S, StopOnAlerts, sentence, watching
from gradwatch.agent.integrations.hyperparameters import plain
from gradwatch.streams import RUN_ID_MAX_CHARS, run_id_part

RUN_KEY = "gradwatch_run"  # result keys: the trial's run, the step of its last report sent, why it stopped
STEP_KEY = "gradwatch_step"
ALERT_KEY = "gradwatch_alert"


def run_id(experiment: str, trial_id: str) -> str:
    """The run id of a trial: "<experiment>-<trial id>", both made valid run id parts."""
    suffix = "-" + run_id_part(trial_id, RUN_ID_MAX_CHARS // 2)
    return run_id_part(experiment, RUN_ID_MAX_CHARS - len(suffix)) + suffix


def watch_trial(config: Mapping[str, object] | None, model, optimizer=None, *, run: str | None = None,
                hyperparameters: Mapping[str, object] | None = None, labels: Mapping[str, str] | None = None,
                **watch_kwargs):
    """gradwatch.watch() for the Tune trial this trainable runs: its run id (default "<experiment>-<trial id>"),
    `config` (and `hyperparameters`) registered as hyperparameters, labels `experiment` and `trial` (and
    `labels`). `watch_kwargs` go to gradwatch.watch() (collector, select, config, ...)."""
    context = tune.get_context()
    experiment, trial_id = context.get_experiment_name(), context.get_trial_id()
    if trial_id is None and run is None:
        raise RuntimeError("watch_trial() belongs in a function run by a ray.tune.Tuner (outside one, give run=)")
    run = run or run_id(experiment, trial_id)
    trial_labels = {"experiment": experiment, "trial": trial_id} if trial_id is not None else {}
    watcher = gradwatch.watch(model, optimizer, run=run, hyperparameters=plain(config, hyperparameters),
                              labels={**trial_labels, **(labels or {})}, **watch_kwargs)
    watching(run, watcher)
    return watcher


def report(metrics: Mapping[str, object], watcher, *, checkpoint: tune.Checkpoint | None = None,
           flush_s: float = DEFAULT_WAIT_S) -> None:
    """tune.report() of `metrics` with the watcher's run and its last reported step, once that step has left
    for the collector (the watcher flushed, at most flush_s; 0: no wait, and no step for the stopper to wait
    for)."""
    extra: dict[str, object] = {RUN_KEY: watcher.run}
    if watcher.flush(flush_s) and watcher.reported_step is not None:
        extra[STEP_KEY] = watcher.reported_step
    tune.report({**metrics, **extra}, checkpoint=checkpoint)


class GradwatchStopper(StopOnAlerts, tune.Stopper):
    def __init__(self, rules: Iterable[str] = DEFAULT_RULES, *, url: str | None = None, token: str | None = None,
                 wait_s: float = DEFAULT_WAIT_S):
        """rules: the alert rules that stop a trial; url: the aggregator's HTTP address (default 127.0.0.1:4772);
        token: its read token (default $GRADWATCH_AGGREGATOR_READ_TOKEN); wait_s: how long a result waits for
        the aggregator to judge its `gradwatch_step` (0: never). `errors` and `late` count the looks that
        failed and those that gave up waiting, `unwatched` the results without `gradwatch_run`."""
        super().__init__(rules, url=url, token=token, wait_s=wait_s, acting="stopping")
        self.unwatched = 0

    def __call__(self, trial_id: str, result: dict) -> bool:
        run, step = result.get(RUN_KEY), result.get(STEP_KEY)
        if not isinstance(run, str) or not run:
            self.unwatched += 1
            self._warn("unwatched", f"gradwatch: a result of trial {trial_id} has no {RUN_KEY!r}, so its alerts "
                                    "cannot stop it; report with gradwatch.agent.integrations.ray_tune.report()")
            return False
        alert = self._decide(trial_id, run, step if isinstance(step, int) else None)
        if alert is None:
            return False
        result[ALERT_KEY] = sentence(alert)  # Tune keeps this result as the trial's last: the reason stays with it
        return True

    def stop_all(self) -> bool:
        return False

    def alert(self, trial) -> dict | None:
        """The alert that stopped the trial (a trial id, or a Trial), as the aggregator's JSON: rule, step,
        layer, summary, ...; None if none did."""
        return self._alert_of(trial if isinstance(trial, str) else trial.trial_id)

    def reason(self, trial) -> str | None:
        """Why the trial was stopped, as a sentence; None if gradwatch did not stop it."""
        a = self.alert(trial)
        return sentence(a) if a is not None else None
