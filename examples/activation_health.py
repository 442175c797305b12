"""Activation health: a tanh network driven into saturation and a ReLU network whose units died, caught by
the SaturatedActivation and DeadReLU rules from the activations the agent summarizes (select
"preset:business": the outputs of every leaf module).

    python examples/activation_health.py

Saturation: the first layer is initialised 25x too large, so most tanh inputs are far beyond +-3 and
the gradient through the layer all but vanishes. Dead units: the first layer's biases start at -5, so
no input ever makes a ReLU unit positive, and a dead unit gets no gradient to revive it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

STEPS = 25


def mlp(act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(fc1=nn.Linear(32, 64), act1=act(), fc2=nn.Linear(64, 64), act2=act(),
                                     head=nn.Linear(64, 10)))


def saturated_tanh() -> nn.Module:
    torch.manual_seed(0)
    model = mlp(nn.Tanh)
    with torch.no_grad():
        model.fc1.weight.mul_(25.0)  # a bad initialisation: std 25 / sqrt(3 * 32) instead of 1 / sqrt(3 * 32)
    return model


def dead_relu() -> nn.Module:
    torch.manual_seed(0)
    model = mlp(nn.ReLU)
    with torch.no_grad():
        model.fc1.bias.fill_(-5.0)  # every pre-activation of act1 is negative: all of its units are dead
    return model


def train(local, run: str, model: nn.Module) -> None:
    torch.manual_seed(1)
    teacher = nn.Linear(32, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with local.watch(model, optimizer, run=run, select="preset:business") as watcher:
        for step in range(STEPS):
            x = torch.randn(64, 32)
            loss = nn.functional.cross_entropy(model(x), teacher(x).argmax(1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            watcher.step(loss=loss)
            if step % 10 == 0:
                print(f"  {run} step {step:3d}  loss {loss.item():.4f}", flush=True)


def main() -> int:
    from common import arguments, finish, local_stack

    args = arguments(__doc__)
    cases = {"act-saturated-tanh": (saturated_tanh, "SaturatedActivation"), "act-dead-relu": (dead_relu, "DeadReLU")}
    result: dict = {}
    with local_stack() as local:
        for run, (make, rule) in cases.items():
            print(f"\nrun {run}: {STEPS} steps, activations watched", flush=True)
            train(local, run, make())
            local.wait_step(run, STEPS - 1)
            local.alerts.wait_for(run, {rule})
            layers = local.get(f"/api/v1/runs/{run}/layers")["layers"]
            print(f"  layer health of {run} (from /api/v1/runs/{run}/layers):")
            for layer in layers:
                if layer.get("dead_fraction") is not None or layer.get("saturated_fraction") is not None:
                    print(f"    {layer['layer']:6s} dead {layer.get('dead_fraction')}  "
                          f"saturated {layer.get('saturated_fraction')}")
            result[run] = {"alerts": [{"rule": a["rule"], "layer": a["layer"], "step": a["step"]}
                                      for a in local.firing(run)],
                           "layers": {x["layer"]: {k: x.get(k) for k in ("dead_fraction", "saturated_fraction")}
                                      for x in layers}}
    ok = all(any(a["rule"] == rule and a["layer"] == "act1" for a in result[run]["alerts"])
             for run, (_, rule) in cases.items())
    return finish(args, ok, result, "SaturatedActivation named act1 of the tanh net, DeadReLU act1 of the ReLU net"
                  if ok else "an expected alert did not fire")


if __name__ == "__main__":
    raise SystemExit(main())
