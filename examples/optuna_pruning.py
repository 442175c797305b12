"""Early stopping of bad trials: an Optuna study of the learning rate with gradwatch's packaged pruner
(`gradwatch.agent.integrations.optuna`). `watch_trial` watches each trial as run "<study>-trial-<n>" with the
trial's params as hyperparameters; `GradwatchPruner` makes `trial.should_prune()` true once the aggregator
raised ExplodingGradient or NonFinite for the trial's run. Asked after every step, it first waits until the
aggregator has judged that step, so a diverging trial stops within one step of its alert instead of training
on NaNs; the healthy trials run to the end.

    pip install 'gradwatch[integrations]' optuna
    python examples/optuna_pruning.py
"""

from __future__ import annotations

import math

import torch
from torch import nn

STEPS = 60
TRIALS = 4
PRUNE_ON = ("ExplodingGradient", "NonFinite")
# The first two trials are fixed so the example always shows both outcomes; the rest are TPE's.
ENQUEUED = ({"lr": 0.03}, {"lr": 0.8})


def objective(trial, pruner, collector: str) -> float:
    import optuna

    from gradwatch.agent.integrations.optuna import watch_trial

    lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(trial.number)
    teacher = nn.Linear(16, 1)
    model = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with watch_trial(trial, model, optimizer, collector=collector, labels={"model": "mlp-tanh"}) as watcher:
        for step in range(STEPS):
            x = torch.randn(64, 16, generator=generator)
            with torch.no_grad():
                y = 3 * teacher(x)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            watcher.step(loss=loss)
            value = loss.item()
            if math.isfinite(value):
                trial.report(value, step)
            if trial.should_prune():  # after watcher.step(): the step just made is judged
                alert = pruner.alert(trial)
                trial.set_user_attr("gradwatch_alert", alert["rule"])
                trial.set_user_attr("alert_step", alert["step"])
                trial.set_user_attr("stopped_at_step", step)
                raise optuna.TrialPruned(pruner.reason(trial))
    return value if math.isfinite(value) else math.inf


def main() -> int:
    from common import arguments, finish, local_stack

    args = arguments(__doc__)
    try:
        import optuna

        from gradwatch.agent.integrations.optuna import GradwatchPruner
    except ImportError:
        print("this example needs optuna: pip install optuna")
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def report(study, t) -> None:
        if t.state == optuna.trial.TrialState.PRUNED:
            print(f"trial {t.number}: lr {t.params['lr']:.3g} PRUNED at step {t.user_attrs['stopped_at_step']} of "
                  f"{STEPS}: {t.user_attrs['gradwatch_alert']} at step {t.user_attrs['alert_step']}", flush=True)
        else:
            print(f"trial {t.number}: lr {t.params['lr']:.3g} {t.state.name.lower()}, final loss {t.value:.4g}",
                  flush=True)

    with local_stack() as local:
        pruner = GradwatchPruner(rules=PRUNE_ON, url=local.api)
        study = optuna.create_study(study_name="gradwatch-lr", direction="minimize", pruner=pruner,
                                    sampler=optuna.samplers.TPESampler(seed=0))
        for params in ENQUEUED:
            study.enqueue_trial(params)
        study.optimize(lambda t: objective(t, pruner, local.collector), n_trials=TRIALS, callbacks=[report])
        registered = local.run("gradwatch-lr-trial-1")
    trials = [{"number": t.number, "lr": t.params["lr"], "state": t.state.name, "value": t.value,
               **t.user_attrs} for t in study.trials]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = study.best_trial if complete else None
    if best is not None:
        print(f"\nbest trial {best.number}: lr {best.params['lr']:.3g}, loss {best.value:.4g}")
    result = {"trials": trials, "best": best.number if best is not None else None,
              "registered": {"hyperparameters": registered["hyperparameters"], "labels": registered["labels"]}}
    ok = (trials[1]["state"] == "PRUNED" and trials[1].get("gradwatch_alert") in PRUNE_ON
          and trials[0]["state"] == "COMPLETE" and best is not None)
    return finish(args, ok, result, "the diverging trial was pruned by gradwatch's alert, the healthy one completed"
                  if ok else "the trials did not end as expected")


if __name__ == "__main__":
    raise SystemExit(main())
