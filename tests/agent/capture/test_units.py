"""Dead units of ReLU layers: per-unit activity counts against explicit float64 references, for
convolution (units on dim 1) and transformer-shaped (units last) outputs, the window between reports,
the cap on units, and no host reads on the training thread."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.agent.capture.units import unit_dim
from gradwatch.v1 import run_pb2
from tests.agent.capture.test_updates import assert_matches, by_kind, dictionary

ACT = run_pb2.TENSOR_KIND_ACTIVATION


def fired(out: torch.Tensor, dim: int) -> np.ndarray:
    """1.0 for each unit (along `dim`) positive somewhere in `out`, from float64 values, one by one."""
    x = out.detach().double().movedim(dim, 0).reshape(out.shape[dim], -1).numpy()
    return np.array([1.0 if (row > 0).any() else 0.0 for row in x])


def units_of(report, names) -> dict:
    return {n: s for n, s in by_kind(report, names, ACT).items() if n.endswith(":units")}


def train(model, batches, cfg, run, hook_module=None, dim=1):
    """SGD at lr 0 (the weights stay as they are) over `batches`: a list of steps, each a list of micro-batches.
    Returns the watcher and, per step, the reference `fired` vectors of hook_module's output per micro-batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    w = gradwatch.watch(model, opt, run=run, config=cfg)
    seen: list = []
    handle = hook_module.register_forward_hook(lambda m, i, o: seen.append(fired(o, dim))) if hook_module else None
    per_step = []
    for micro in batches:
        start = len(seen)
        for x in micro:
            model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        w.step()
        per_step.append(seen[start:])
    if handle:
        handle.remove()
    w.close()
    return w, per_step


def conv_model():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(3, 8, 3)), ("relu", nn.ReLU()),
                                       ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()),
                                       ("head", nn.Linear(8, 2))])).double()
    with torch.no_grad():  # channels 0-2 can never fire, channel 3 only on bright images
        model.conv.bias[:3] = -1e3
        model.conv.weight[3].zero_()
        model.conv.bias[3] = 0.0
        model.conv.weight[3, 0, 1, 1] = 1.0
    return model


def test_conv_channels_count_the_forward_passes_each_channel_fired_in(ingest, host_reads):
    model = conv_model()
    cfg = AgentConfig(collector=ingest.target, select="activations:on", burst_steps=0)
    steps = [[torch.randn(4, 3, 6, 6, dtype=torch.float64) - 5.0, torch.randn(2, 3, 6, 6, dtype=torch.float64)]]
    steps.append([torch.randn(4, 3, 6, 6, dtype=torch.float64) + 5.0])
    w, ref = train(model, steps, cfg, "units-conv", model.relu, dim=1)
    assert host_reads == []
    names = dictionary(ingest)
    info = next(t for t in names.values() if t.name == "relu:units")
    assert (info.kind, info.module_path, info.partition) == (ACT, "relu", run_pb2.PARTITION_PER_RANK)
    assert [t.name for t in names.values() if t.name.endswith(":units")] == ["relu:units"]  # ReLUs only
    assert len(ingest.reports) == 2
    for report, forwards in zip(ingest.reports, ref, strict=True):
        counts = np.sum(forwards, axis=0)  # forward passes each channel fired in: two, then one
        got = units_of(report, names)["relu:units"]
        assert_matches(got, counts)
        assert got.count == 8 and list(counts[:4]) == [0, 0, 0, 1]  # 0-2 dead; 3 fired on one micro-batch
        assert got.zero == 8 - np.count_nonzero(counts)
    assert w.counters.internal_errors == 0


class Block(nn.Module):
    """A transformer MLP: (B, T, d) -> Linear -> ReLU -> Linear, units on the last dim."""

    def __init__(self, d=6, f=10):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, f), nn.ReLU(inplace=True), nn.Linear(f, d)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


def test_transformer_features_are_units_and_the_window_resets_at_each_report(ingest, host_reads):
    torch.manual_seed(1)
    model = Block().double()
    with torch.no_grad():  # feature j fires only on tokens whose input j is positive
        model.up.weight.zero_()
        model.up.bias.zero_()
        model.up.weight[:6, :6] = torch.eye(6)
    cfg = AgentConfig(collector=ingest.target, select="activations:on", every=2, burst_steps=0)

    def tokens(*features):
        x = -torch.ones(2, 3, 6, dtype=torch.float64)
        for j in features:
            x[1, 2, j] = 1.0  # one token of the batch
        return [x]

    steps = [tokens(0), tokens(1), tokens(2, 3), tokens(3)]  # reports at steps 0 and 2
    w, ref = train(model, steps, cfg, "units-mlp")
    assert host_reads == []
    names = dictionary(ingest)
    assert [r.step for r in ingest.reports] == [0, 2]
    first, second = (units_of(r, names)["act:units"] for r in ingest.reports)
    assert_matches(first, np.array([1.0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
    # Steps 1 and 2 (the window after the report of step 0): feature 0 is dead again, 1-3 fired once.
    assert_matches(second, np.array([0.0, 1, 1, 1, 0, 0, 0, 0, 0, 0]))
    assert (second.count, second.zero) == (10, 7)
    assert w.counters.internal_errors == 0


def test_units_beyond_the_cap_are_left_out_and_zero_turns_it_off(ingest):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU()).double()
    x = torch.randn(64, 4, dtype=torch.float64)
    expected = fired(model(x), 1)[:3]
    cfg = AgentConfig(collector=ingest.target, select="activations:on", units_max=3)
    train(model, [[x]], cfg, "units-cap")
    names = dictionary(ingest)
    assert_matches(units_of(ingest.reports[0], names)["1:units"], expected)
    n = len(names)
    cfg = AgentConfig(collector=ingest.target, select="activations:on", units_max=0)
    train(model, [[x]], cfg, "units-off")
    assert not any(t.name.endswith(":units") for t in dictionary(ingest).values())
    assert len(dictionary(ingest)) == n - 1


@pytest.mark.parametrize(("make", "shape", "dim"), [
    pytest.param(lambda: nn.Conv2d(3, 4, 1), (2, 3, 5, 5), 1, id="N,C,H,W after a convolution"),
    pytest.param(lambda: nn.Conv1d(3, 4, 1), (2, 3, 7), 1, id="N,C,L after a Conv1d"),
    pytest.param(lambda: nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)), (2, 3, 7), 1, id="N,C,L after BN"),
    pytest.param(lambda: nn.Linear(3, 4), (2, 5, 3), 2, id="B,T,F after a Linear"),
    pytest.param(lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), (2, 5, 3), 2, id="B,T,F after LayerNorm"),
    pytest.param(lambda: nn.Linear(3, 4), (2, 5, 5, 3), 3, id="B,H,W,F after a Linear"),
    pytest.param(lambda: nn.Linear(3, 4), (2, 3), 1, id="N,F"),
])
def test_unit_dim_follows_the_layer_that_produced_the_output(make, shape, dim):
    out = torch.relu_(make()(torch.randn(*shape)))  # in place, as ReLU(inplace=True)
    assert unit_dim(out) == dim
    with torch.no_grad():
        assert unit_dim(torch.relu(make()(torch.randn(*shape)))) == (1 if len(shape) != 3 else 2)  # no graph
