"""Data statistics: `watcher.observe_inputs(images, labels=labels)` sends per-channel statistics of every
batch (mean, std, min, max, NaN counts) and a label histogram; the aggregator catches images fed without
normalisation (UnnormalizedInput), a class-imbalanced loader (ClassImbalance) and inputs whose
preprocessing changed mid-run (InputDataDrift).

    python examples/data_statistics.py

Two runs of a small convolutional net on synthetic 3x16x16 images of 4 classes:
  data-raw-pixels   8-bit pixels converted to float but never scaled or standardised (0..255)
  data-imbalanced   standardised images, but the sampler draws class 0 nine times in ten; from step
                    30 on the loader applies the standardisation twice (a changed preprocessing)
"""

from __future__ import annotations

import torch
from torch import nn

STEPS = 40
DRIFT_STEP = 30
MEAN, STD = 110.0, 60.0  # the dataset's pixel statistics, the way torchvision's Normalize takes them


def images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 images whose brightest channel tells the class (channel = label % 3)."""
    x = torch.randint(40, 180, (len(labels), 3, 16, 16), generator=generator).float()
    x[torch.arange(len(labels)), labels % 3] += 60
    return x.clamp(0, 255).to(torch.uint8)


def loader(imbalanced: bool, generator: torch.Generator):
    for step in range(STEPS):
        if imbalanced:
            labels = torch.where(torch.rand(64, generator=generator) < 0.9, 0,
                                 torch.randint(1, 4, (64,), generator=generator))
        else:
            labels = torch.randint(0, 4, (64,), generator=generator)
        yield step, images(labels, generator), labels


def convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def train(local, run: str, normalize: bool, imbalanced: bool) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with local.watch(model, optimizer, run=run) as watcher:
        for step, pixels, labels in loader(imbalanced, generator):
            x = pixels.float()  # the bug of run data-raw-pixels: no scaling, no standardisation
            if normalize:
                x = (x - MEAN) / STD
                if step >= DRIFT_STEP:
                    x = (x - MEAN) / STD  # a second transform in the pipeline: standardised twice
            watcher.observe_inputs(x, labels=labels)
            loss = nn.functional.cross_entropy(model(x), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            watcher.step(loss=loss)
            if step % 10 == 0:
                print(f"  {run} step {step:3d}  loss {loss.item():.4f}  input mean {x.mean().item():8.3f}  "
                      f"class 0 share {(labels == 0).float().mean().item():.2f}", flush=True)


def main() -> int:
    from common import arguments, finish, local_stack

    args = arguments(__doc__)
    cases = {"data-raw-pixels": (False, False, {"UnnormalizedInput"}),
             "data-imbalanced": (True, True, {"ClassImbalance", "InputDataDrift"})}
    result: dict = {}
    with local_stack() as local:
        for run, (normalize, imbalanced, rules) in cases.items():
            print(f"\nrun {run}: {STEPS} steps, observe_inputs(images, labels=labels)", flush=True)
            train(local, run, normalize, imbalanced)
            local.wait_step(run, STEPS - 1)
            local.alerts.wait_for(run, rules)
            result[run] = {"alerts": [{"rule": a["rule"], "tensor": a["tensor"], "step": a["step"],
                                       "summary": a["summary"]} for a in local.firing(run)],
                           "expected": sorted(rules)}
    ok = all(set(r["expected"]) <= {a["rule"] for a in r["alerts"]} for r in result.values())
    return finish(args, ok, result, "raw pixels, the imbalanced sampler and the changed preprocessing were caught"
                  if ok else "an expected alert did not fire")


if __name__ == "__main__":
    raise SystemExit(main())
