"""Activation gradients (gradients with respect to module outputs) against float64 autograd references,
a NaN born in the backward pass, in-place ops after a module, and the schedule."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.stats import Stats
from gradwatch.v1 import run_pb2
from tests.agent.capture.test_updates import assert_matches, dictionary

ACT_GRAD = run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT


class _Poison(torch.autograd.Function):
    """Identity forward; backward puts a NaN into the gradient it passes on."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad


class Poison(nn.Module):
    def __init__(self):
        super().__init__()
        self.on = False

    def forward(self, x):
        return _Poison.apply(x) if self.on else x.clone()


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([("a", nn.Linear(8, 6)), ("p", Poison()), ("act", nn.Tanh()),
                                      ("b", nn.Linear(6, 2))])).double()


def reference_grads(model, x) -> dict[str, np.ndarray]:
    """Gradients of the same loss with respect to each module's output, by plain autograd."""
    outputs, h = {}, x
    for name, module in model.named_children():
        h = outputs[name] = module(h)
    grads = torch.autograd.grad(h.pow(2).sum(), list(outputs.values()))
    return {f"{name}:output.grad": g.detach().numpy() for name, g in zip(outputs, grads, strict=True)}


def act_grads(report, names) -> dict[str, Stats]:
    return {names[s.tensor_id].name: Stats.from_proto(s) for s in report.tensors if names[s.tensor_id].kind == ACT_GRAD}


def test_activation_gradients_match_autograd_and_a_backward_nan_is_located(ingest):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    w = gradwatch.watch(model, opt, run="agrad-1", collector=ingest.target, select="activation_gradients:on")
    inputs = [torch.randn(5, 8, dtype=torch.float64) for _ in range(2)]
    expected = []
    for step, x in enumerate(inputs):
        model.p.on = step == 1
        expected.append(reference_grads(model, x))
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        w.step()
    w.close()
    names = dictionary(ingest)
    info = {t.name: t for t in names.values() if t.kind == ACT_GRAD}
    assert sorted(info, key=lambda n: info[n].order) == ["a:output.grad", "p:output.grad", "act:output.grad",
                                                         "b:output.grad"]  # forward execution order
    assert all(info[n].module_path == n.split(":")[0] for n in info)
    assert all(info[n].partition == run_pb2.PARTITION_PER_RANK for n in info)
    for report, exp in zip(ingest.reports, expected, strict=True):
        got = act_grads(report, names)
        assert set(got) == set(exp)
        for name, values in exp.items():
            assert_matches(got[name], values)
    poisoned = act_grads(ingest.reports[1], names)
    # Born in p's backward: everything after p in forward order is finite, a's output gradient is not, so
    # the non-finite backward tensor with the highest forward order names the layer.
    assert {n for n, s in poisoned.items() if s.nan} == {"a:output.grad"}
    assert w.counters.internal_errors == 0


def test_inplace_op_after_the_module_sees_the_gradient_of_the_module_output(ingest):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    twin = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    twin.load_state_dict(model.state_dict())
    w = gradwatch.watch(model, run="agrad-2", collector=ingest.target,
                        select="activations:on,activation_gradients:on")
    x = torch.randn(7, 4, dtype=torch.float64)
    model(x).sum().backward()
    w.step()
    w.close()
    h = twin[0](x)
    (expected,) = torch.autograd.grad(twin[2](torch.relu(h)).sum(), [h])
    twin(x).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # the hooks leave the gradients alone
    names = dictionary(ingest)
    got = act_grads(ingest.reports[0], names)
    assert_matches(got["0:output.grad"], expected.numpy())
    assert w.counters.internal_errors == 0


def test_activation_gradients_only_on_due_steps_and_last_micro_batch(ingest, monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # origin:off: the NaN/Inf origin check puts tensor hooks of its own on every step (test_origin.py)
    cfg = AgentConfig(collector=ingest.target, every=2, burst_steps=0, select="activation_gradients:on,origin:off")
    w = gradwatch.watch(model, opt, run="agrad-3", config=cfg)
    registered = []
    original = torch.Tensor.register_hook
    monkeypatch.setattr(torch.Tensor, "register_hook", lambda t, fn: (registered.append(1), original(t, fn))[1])
    for _ in range(4):
        for batch in (3, 5):  # accumulation: the last micro-batch's gradients are the ones reported
            model(torch.randn(batch, 8, dtype=torch.float64)).sum().backward()
        opt.step()
        opt.zero_grad()
        w.step()
    monkeypatch.undo()
    w.close()
    assert len(registered) == 2 * 2 * 4  # due steps 0 and 2, two micro-batches, four modules
    names = dictionary(ingest)
    assert [r.step for r in ingest.reports] == [0, 2]
    for report in ingest.reports:
        got = act_grads(report, names)
        assert got["a:output.grad"].count == 5 * 6 and got["b:output.grad"].count == 5 * 2
