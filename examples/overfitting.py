"""Overfitting: a wide MLP memorises a training set of 48 noisy examples; every 5 steps it is evaluated on
held-out data with `watcher.step(phase="eval", loss=..., accuracy=...)`. The training loss falls towards
0 while the validation loss bottoms out after about 15 steps and rises: Overfit fires on the
train/validation gap, Overtraining when the validation loss stops improving while the training loss still
falls.

    python examples/overfitting.py
"""

from __future__ import annotations

import torch
from torch import nn

RUN = "overfit-tiny-train-set"
STEPS = 80
EVAL_EVERY = 5


def dataset(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear rule with 10 % of the labels flipped at random: memorising the flips cannot generalise."""
    x = torch.randn(n, 20, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    flip = torch.rand(n, generator=generator) < 0.1
    return x, torch.where(flip, 1 - y, y)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def main() -> int:
    from common import arguments, finish, local_stack

    args = arguments(__doc__)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = dataset(48, generator)
    val_x, val_y = dataset(1000, generator)
    model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    curve = []
    with local_stack() as local:
        print(f"\nrun {RUN}: {STEPS} full-batch steps on 48 examples, evaluated on 1000 every {EVAL_EVERY}", flush=True)
        with local.watch(model, optimizer, run=RUN, hyperparameters={"lr": 1e-3, "train_examples": 48}) as watcher:
            for step in range(STEPS):
                model.train()
                logits = model(train_x)
                loss = nn.functional.cross_entropy(logits, train_y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                watcher.step(loss=loss, accuracy=accuracy(logits, train_y))
                if (step + 1) % EVAL_EVERY == 0:
                    model.eval()
                    with torch.no_grad():
                        val_logits = model(val_x)
                        val_loss = nn.functional.cross_entropy(val_logits, val_y).item()
                    val_acc = accuracy(val_logits, val_y)
                    watcher.step(phase="eval", loss=val_loss, accuracy=val_acc)
                    curve.append((step, loss.item(), val_loss, accuracy(logits, train_y), val_acc))
                    if (step + 1) % 10 == 0:
                        print(f"  step {step:3d}  train loss {loss.item():.3f} acc {curve[-1][3]:.2f}   "
                              f"validation loss {val_loss:.3f} acc {val_acc:.2f}   gap {val_loss - loss.item():+.3f}",
                              flush=True)
        detail = local.wait_step(RUN, STEPS - 1)
        local.alerts.wait_for(RUN, {"Overfit", "Overtraining"})
        firing = local.firing(RUN)
    best = min(curve, key=lambda c: c[2])
    print(f"\nthe validation loss was lowest at step {best[0]} ({best[2]:.3f}); the aggregator now has training loss "
          f"{detail.get('loss')}, validation loss {detail.get('eval_loss')}, accuracy "
          f"{(detail.get('scalars') or {}).get('accuracy')} / {(detail.get('eval_scalars') or {}).get('accuracy')} "
          f"(training / validation)")
    rules = {a["rule"] for a in firing}
    result = {"alerts": [{"rule": a["rule"], "step": a["step"], "summary": a["summary"]} for a in firing],
              "curve": curve, "best_step": best[0], "run": {k: detail.get(k) for k in (
                  "loss", "eval_loss", "scalars", "eval_scalars", "hyperparameters")}}
    ok = {"Overfit", "Overtraining"} <= rules
    return finish(args, ok, result, "Overfit and Overtraining fired while the training loss kept falling" if ok
                  else f"expected Overfit and Overtraining, got {sorted(rules)}")


if __name__ == "__main__":
    raise SystemExit(main())
