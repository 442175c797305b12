"""Hyperparameter sweep: learning rate x weight decay on a small MLP, six short runs that carry their
hyperparameters and labels (`gradwatch.watch(..., hyperparameters=..., labels=...)`); then the runs side
by side, as `gradwatch runs compare` prints them from the aggregator's API, and which runs diverged and
why, from their alerts.

    python examples/sweep.py
    gradwatch runs compare sweep-lr0.01-wd0 sweep-lr0.5-wd0 --url ...   # against a running stack
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

LEARNING_RATES = (0.01, 0.1, 0.5)
WEIGHT_DECAYS = (0.0, 0.01)
STEPS = 40
EVAL_EVERY = 10
DIVERGED = {"ExplodingGradient", "NonFinite"}


def run_name(lr: float, wd: float) -> str:
    return f"sweep-lr{lr:g}-wd{wd:g}"


def trial(local, lr: float, wd: float) -> None:
    """Regression of a noisy linear teacher with SGD + momentum; from lr 0.5 on it diverges."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    teacher = nn.Linear(16, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    val_x = torch.randn(256, 16, generator=generator)
    with torch.no_grad():
        val_y = 3 * teacher(val_x)
    hyperparameters = {"lr": lr, "weight_decay": wd, "momentum": 0.9, "batch_size": 64}
    with local.watch(model, optimizer, run=run_name(lr, wd), hyperparameters=hyperparameters,
                     labels={"sweep": "lr-x-wd", "model": "mlp-tanh"}) as watcher:
        for step in range(STEPS):
            x = torch.randn(64, 16, generator=generator)
            with torch.no_grad():
                y = 3 * teacher(x) + 0.1 * torch.randn(64, 1, generator=generator)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            watcher.step(loss=loss)
            if (step + 1) % EVAL_EVERY == 0:
                with torch.no_grad():
                    watcher.step(phase="eval", loss=nn.functional.mse_loss(model(val_x), val_y))


def main() -> int:
    from common import arguments, finish, local_stack

    from gradwatch.cli.runs import compare_table

    args = arguments(__doc__)
    grid = list(itertools.product(LEARNING_RATES, WEIGHT_DECAYS))
    with local_stack() as local:
        for lr, wd in grid:
            print(f"run {run_name(lr, wd)}: lr {lr:g}, weight decay {wd:g}, {STEPS} steps", flush=True)
            trial(local, lr, wd)
        details = [local.wait_step(run_name(lr, wd), STEPS - 1) for lr, wd in grid]
        print(f"\nthe runs side by side (gradwatch runs compare ... --url {local.api}):\n")
        print(compare_table(details))
        diverged = {}
        for d in details:
            why = [a for a in d.get("alerts") or [] if a["rule"] in DIVERGED]
            if why:
                diverged[d["run"]] = sorted(why, key=lambda a: a["step"])
    print("\ndiverged:" if diverged else "\nno run diverged")
    for run, why in diverged.items():
        first = why[0]
        print(f"  {run}: {first['rule']} at step {first['step']} in layer {first['layer']}: {first['summary']}")
        for a in why[1:]:
            print(f"    then {a['rule']} at step {a['step']} in layer {a['layer']}")
    expected = {run_name(lr, wd) for lr, wd in grid if lr >= 0.5}
    result = {"runs": [{k: d.get(k) for k in ("run", "hyperparameters", "labels", "step", "loss", "eval_loss",
                                               "grad_norm")} for d in details],
              "diverged": {run: [a["rule"] for a in why] for run, why in diverged.items()},
              "expected_diverged": sorted(expected)}
    ok = set(diverged) == expected
    return finish(args, ok, result, f"the runs at lr 0.5 diverged ({', '.join(sorted(diverged))}); the others did not"
                  if ok else f"expected {sorted(expected)} to diverge, got {sorted(diverged)}")


if __name__ == "__main__":
    raise SystemExit(main())
