"""Early stopping of bad trials in Ray Tune: a grid over the learning rate with gradwatch's packaged stopper
(`gradwatch.agent.integrations.ray_tune`). Each trial runs in a Ray worker; `watch_trial` watches it as run
"<experiment>-<trial id>" with the trial's config as hyperparameters, and `report` hands Tune the metrics with
the run and the step the watcher last sent. `GradwatchStopper`, in the driver, waits until the aggregator has
judged that step and stops the trial once ExplodingGradient or NonFinite fired for its run: a diverging trial
stops within one step of its alert instead of training on NaNs; the healthy trials run to the end.

    pip install 'gradwatch[examples,ray]'
    python examples/ray_tune.py
"""

from __future__ import annotations

import math
import tempfile

import torch
from torch import nn

STEPS = 60
STOP_ON = ("ExplodingGradient", "NonFinite")
LEARNING_RATES = [0.01, 0.03, 0.8, 2.0]  # the last two diverge


def train_fn(config: dict, collector: str) -> None:
    """One trial, in a Ray worker. The collector's address comes through tune.with_parameters: it is no
    hyperparameter, so it stays out of the config (and out of the run's registered hyperparameters)."""
    from gradwatch.agent.integrations.ray_tune import report, watch_trial

    torch.set_num_threads(1)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    teacher = nn.Linear(16, 1)
    model = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    with watch_trial(config, model, optimizer, collector=collector, labels={"model": "mlp-tanh"}) as watcher:
        for step in range(STEPS):
            x = torch.randn(64, 16, generator=generator)
            with torch.no_grad():
                y = 3 * teacher(x)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            watcher.step(loss=loss)
            value = loss.item()  # sync: Tune needs a number
            report({"loss": value if math.isfinite(value) else math.inf, "step": step}, watcher)


def main() -> int:
    from common import arguments, finish, local_stack

    args = arguments(__doc__)
    try:
        import ray
        from ray import tune

        from gradwatch.agent.integrations.ray_tune import GradwatchStopper
    except ImportError:
        print("this example needs ray[tune]: pip install 'gradwatch[ray]'")
        return 2

    # Tune's experiment directory, like the stack's Redis data, in a temporary directory gone afterwards.
    with local_stack() as local, tempfile.TemporaryDirectory(prefix="gradwatch-example-tune-") as storage:
        # Trials are Ray actors of one CPU each: two at a time on a 2-core machine.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            stopper = GradwatchStopper(rules=STOP_ON, url=local.api)
            tuner = tune.Tuner(tune.with_parameters(train_fn, collector=local.collector),
                               param_space={"lr": tune.grid_search(LEARNING_RATES)},
                               run_config=tune.RunConfig(name="gradwatch-lr", storage_path=storage, stop=stopper,
                                                         verbose=0))
            results = tuner.fit()
        finally:
            ray.shutdown()
        trials = []
        for result in sorted(results, key=lambda r: r.config["lr"]):
            m = result.metrics
            alert = stopper.alert(m["trial_id"])
            trial = {"lr": result.config["lr"], "run": m["gradwatch_run"], "iterations": m["training_iteration"],
                     "last_step": m["step"], "loss": m["loss"], "state": "STOPPED" if alert else "COMPLETE",
                     "error": str(result.error) if result.error else None}
            if alert is not None:
                trial.update(gradwatch_alert=alert["rule"], alert_step=alert["step"], reason=m.get("gradwatch_alert"))
                print(f"trial lr {trial['lr']:g}: STOPPED at step {trial['last_step']} of {STEPS}: "
                      f"{alert['rule']} at step {alert['step']}", flush=True)
            else:
                print(f"trial lr {trial['lr']:g}: completed {trial['iterations']} steps, final loss "
                      f"{trial['loss']:.4g}", flush=True)
            trials.append(trial)
        diverging = next(t for t in trials if t["lr"] == 0.8)
        registered = local.run(diverging["run"])
    result = {"trials": trials, "registered": {"hyperparameters": registered["hyperparameters"],
                                               "labels": registered["labels"]},
              "stopper": {"errors": stopper.errors, "late": stopper.late, "unwatched": stopper.unwatched}}
    healthy = next(t for t in trials if t["lr"] == 0.03)
    ok = (diverging["state"] == "STOPPED" and healthy["state"] == "COMPLETE" and healthy["iterations"] == STEPS
          and not any(t["error"] for t in trials))
    return finish(args, ok, result, "the diverging trial was stopped by gradwatch's alert, the healthy one completed"
                  if ok else "the trials did not end as expected")


if __name__ == "__main__":
    raise SystemExit(main())
