"""Hyperparameters as plain values, as a table: what frameworks hand over, what a registration carries."""

from __future__ import annotations

import enum
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import gradwatch.agent.integrations.hyperparameters as hp
from gradwatch.agent.export import encode


class Schedule(str, enum.Enum):  # noqa: UP042 (transformers' ExplicitEnum: str() gives "Schedule.LINEAR")
    LINEAR = "linear"


class Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize(("value", "expected"), [
    (0.1, 0.1), (3, 3), (True, True), ("adamw", "adamw"),
    (Schedule.LINEAR, "linear"), (Level.HIGH, 3),
    (np.float32(0.5), 0.5), (np.int64(7), 7), (torch.tensor(0.25), 0.25), (torch.tensor([4]), 4),
    (Path("/data/train"), "/data/train"), ([1, 2], "[1, 2]"), (torch.ones(2), str(torch.ones(2))),
    (None, None),
])
def test_value_of(value, expected):
    out = hp.value_of(value)
    assert out == expected and type(out) is type(expected)


def test_plain_flattens_merges_and_drops_none():
    out = hp.plain({"lr": 0.1, "optimizer": {"name": "sgd", "betas": {"b1": 0.9}}, "resume": None},
                   None, {"lr": 0.2, "scheduler": Schedule.LINEAR})
    assert out == {"lr": 0.2, "optimizer.name": "sgd", "optimizer.betas.b1": 0.9, "scheduler": "linear"}
    # As the registration carries them: a number, a text, never an enum's repr.
    reg = encode.registration("r", 0, 1, [], out, None, None, 0.0)
    assert reg.hyperparameters["scheduler"].text == "linear" and reg.hyperparameters["lr"].number == 0.2


def test_plain_is_bounded(monkeypatch, caplog):
    monkeypatch.setattr(hp, "MAX_HYPERPARAMETERS", 3)
    with caplog.at_level(logging.WARNING, "gradwatch.agent"):
        out = hp.plain({f"k{i}": i for i in range(5)}, {"k0": 10})
    assert out == {"k0": 10, "k1": 1, "k2": 2}  # a later source still overrides a name already kept
    assert "2 hyperparameters past the first 3" in caplog.text
