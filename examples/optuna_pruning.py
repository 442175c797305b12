"""Early stopping of bad trials: an Optuna study of the learning rate whose objective trains with gradwatch
and prunes a trial as soon as the aggregator raises ExplodingGradient or NonFinite for the trial's run.
The training loop watches the alert stream (a thread tailing gradwatch:alerts) and raises
optuna.TrialPruned with the alert as the reason: a diverging trial stops within about a second of its
explosion instead of training on NaNs. A trial that ends before its alert arrived is judged once the
aggregator has applied its last step.

    pip install 'gradwatch[examples]'   # optuna
    python examples/optuna_pruning.py
"""

from __future__ import annotations

import math

import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig

STEPS = 300
TRIALS = 5
PRUNE_ON = {"ExplodingGradient", "NonFinite"}
# The first two trials are fixed so the example always shows both outcomes; the rest are TPE's.
ENQUEUED = ({"lr": 0.03}, {"lr": 0.8})


def objective(trial, local) -> float:
    import optuna

    lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
    run = f"optuna-trial-{trial.number}"
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(trial.number)
    teacher = nn.Linear(16, 1)
    model = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    fired: list[dict] = []
    # Reports leave every 0.1 s instead of 0.5 s: a tuner wants its alerts early.
    config = AgentConfig.from_env(collector=local.collector, export_interval_s=0.1)
    with gradwatch.watch(model, optimizer, run=run, config=config, hyperparameters=dict(trial.params),
                         labels={"study": trial.study.study_name}) as watcher:
        for step in range(STEPS):
            x = torch.randn(64, 16, generator=generator)
            with torch.no_grad():
                y = 3 * teacher(x)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            watcher.step(loss=loss)
            last = step
            fired = local.alerts.fired(run, PRUNE_ON)  # a list read: costs nothing per step
            if fired:
                break
    if not fired:
        local.wait_step(run, last)  # every report judged: the alerts of the run are decided
        fired = [a for a in local.firing(run) if a["rule"] in PRUNE_ON]
    final = loss.item()
    if fired:
        first = min(fired, key=lambda a: a["step"])
        trial.set_user_attr("gradwatch_alert", first["rule"])
        trial.set_user_attr("gradwatch_summary", first["summary"])
        trial.set_user_attr("stopped_at_step", last)
        raise optuna.TrialPruned(f"gradwatch: {first['rule']} at step {first['step']}")
    return final if math.isfinite(final) else math.inf


def main() -> int:
    from common import arguments, finish, local_stack

    args = arguments(__doc__)
    try:
        import optuna
    except ImportError:
        print("this example needs optuna: pip install 'gradwatch[examples]'")
        return 2
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="gradwatch-lr", direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.NopPruner())  # only gradwatch's alerts prune here
    for params in ENQUEUED:
        study.enqueue_trial(params)
    def report(study, t) -> None:
        if t.state == optuna.trial.TrialState.PRUNED:
            print(f"trial {t.number}: lr {t.params['lr']:.3g} PRUNED at step {t.user_attrs['stopped_at_step']} of "
                  f"{STEPS} by {t.user_attrs['gradwatch_alert']}: {t.user_attrs['gradwatch_summary']}", flush=True)
        else:
            print(f"trial {t.number}: lr {t.params['lr']:.3g} {t.state.name.lower()}, final loss {t.value:.4g}",
                  flush=True)

    with local_stack() as local:
        study.optimize(lambda t: objective(t, local), n_trials=TRIALS, callbacks=[report])
    trials = [{"number": t.number, "lr": t.params["lr"], "state": t.state.name, "value": t.value,
               **t.user_attrs} for t in study.trials]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = study.best_trial if complete else None
    if best is not None:
        print(f"\nbest trial {best.number}: lr {best.params['lr']:.3g}, loss {best.value:.4g}")
    result = {"trials": trials, "best": best.number if best is not None else None}
    ok = (trials[1]["state"] == "PRUNED" and trials[1].get("gradwatch_alert") in PRUNE_ON
          and trials[0]["state"] == "COMPLETE" and best is not None)
    return finish(args, ok, result, "the diverging trial was pruned by gradwatch's alert, the healthy one completed"
                  if ok else "the trials did not end as expected")


if __name__ == "__main__":
    raise SystemExit(main())
