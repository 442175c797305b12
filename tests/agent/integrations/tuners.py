"""What the tuner tests (test_optuna.py, test_ray_tune.py) share besides their `stack` fixture (conftest.py): a
trial's training: a small MLP fitting a linear teacher with SGD and momentum, which diverges (its gradient norm
passes ExplodingGradient's 1e4) at a learning rate of 3 and converges at 0.01 and 0.03."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

LEARNING_RATES = (0.01, 3.0, 0.03)  # the second diverges


def regression(lr: float) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[object, int], Iterator]]:
    """(model, optimizer, train): `train(watcher, steps)` yields (step, loss value) after each optimizer step and
    `watcher.step`, the same data for every learning rate."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    teacher = nn.Linear(16, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def train(watcher, steps: int) -> Iterator[tuple[int, float]]:
        for step in range(steps):
            x = torch.randn(32, 16, generator=generator)
            with torch.no_grad():
                y = 3 * teacher(x)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            watcher.step(loss=loss)
            yield step, loss.item()  # sync: the tuner needs a number

    return model, optimizer, train
