"""Updates (new minus old parameter values) and optimizer state, against float64 references computed by
the test itself, in real training loops against a real gRPC server on 127.0.0.1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.agent.capture.updates import Updates
from gradwatch.stats import Stats
from gradwatch.v1 import run_pb2
from tests.agent.stats.test_summarize import reference

UPDATE, STATE = run_pb2.TENSOR_KIND_UPDATE, run_pb2.TENSOR_KIND_OPTIMIZER_STATE


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def dictionary(ingest) -> dict[int, run_pb2.TensorInfo]:
    """The last registration sent: the dictionary grows when optimizer state appears."""
    reg = [r for req in ingest.requests for r in req.registrations][-1]
    return {t.id: t for t in reg.tensors}


def by_kind(report, names, kind) -> dict[str, Stats]:
    return {names[s.tensor_id].name: Stats.from_proto(s) for s in report.tensors if names[s.tensor_id].kind == kind}


def assert_matches(stats: Stats, values: np.ndarray) -> None:
    ref = reference(values)
    assert stats.count == values.size
    assert (stats.nan, stats.inf, stats.zero) == (ref["nan"], ref["inf"], ref["zero"])
    assert stats.sum == pytest.approx(ref["sum"], rel=1e-12, abs=1e-300)
    assert stats.sum_squares == pytest.approx(ref["sum_squares"], rel=1e-12, abs=1e-300)
    assert stats.min == pytest.approx(np.float32(ref["min"]), rel=1e-6)
    assert stats.max == pytest.approx(np.float32(ref["max"]), rel=1e-6)
    # An empty histogram (all values zero or non-finite) is not sent at all.
    np.testing.assert_array_equal(stats.hist if stats.hist is not None else np.zeros_like(ref["hist"]), ref["hist"])


def test_updates_match_new_minus_old_including_nan_and_inf(ingest):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    w = gradwatch.watch(model, opt, run="upd-1", collector=ingest.target, select="updates:on")
    expected = []
    for step in range(4):
        model(torch.randn(4, 8, dtype=torch.float64)).pow(2).mean().backward()
        if step == 2:  # a NaN and an Inf gradient: NaN and -Inf parameters, so NaN and -Inf updates
            model[0].weight.grad[0, 0] = float("nan")
            model[2].bias.grad[1] = float("inf")
        before = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        opt.step()
        expected.append({n: p.detach().numpy() - before[n] for n, p in model.named_parameters()})
        opt.zero_grad()
        w.step()
    w.close()
    names = dictionary(ingest)
    params = {t.name: t for t in names.values() if t.kind == run_pb2.TENSOR_KIND_PARAMETER}
    updates = {t.name: t for t in names.values() if t.kind == UPDATE}
    assert set(updates) == set(params) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    for name, info in updates.items():  # paired with its parameter by name and layer
        p = params[name]
        assert (info.module_path, info.order, list(info.shape), info.dtype) == (
            p.module_path, p.order, list(p.shape), p.dtype)
    reports = ingest.reports
    assert [r.step for r in reports] == [0, 1, 2, 3]
    for report, exp in zip(reports, expected, strict=True):
        got = by_kind(report, names, UPDATE)
        assert set(got) == set(exp)
        for name, values in exp.items():
            assert_matches(got[name], values)
    bad = by_kind(reports[2], names, UPDATE)
    assert bad["0.weight"].nan == 1 and bad["2.bias"].inf == 1
    # The NaN parameter spreads through the next forward pass: every update of that layer is NaN, counted.
    assert by_kind(reports[3], names, UPDATE)["0.weight"].nan == 8 * 16
    assert w.counters.internal_errors == 0


def test_updates_copy_only_on_captured_steps_and_is_let_go(ingest, monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="upd-2", collector=ingest.target, select="updates:on", every=3)
    copies = []
    original = Updates.copy_parameters
    monkeypatch.setattr(Updates, "copy_parameters", lambda self: (copies.append(1), original(self)))
    for _ in range(7):
        model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
        opt.step()
        assert w._capture.updates._before is None  # the copy lives from the pre-hook to the post-hook only
        opt.zero_grad()
        w.step()
    w.close()
    assert len(copies) == 3  # steps 0, 3, 6
    assert [r.step for r in ingest.reports] == [0, 3, 6]
    names = dictionary(ingest)
    assert all(by_kind(r, names, UPDATE) for r in ingest.reports)


def test_updates_byte_budget_keeps_a_prefix_and_counts_the_rest(ingest):
    model = make_model()  # float64: 0.weight 1024 B, 0.bias 128 B, 2.weight 256 B, 2.bias 16 B
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = AgentConfig(collector=ingest.target, select="updates:on", updates_max_bytes=1024 + 128 + 100)
    w = gradwatch.watch(model, opt, run="upd-3", config=cfg)
    assert w.counters.updates_over_budget == 2
    assert w._capture.updates.copy_bytes == 1024 + 128
    model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    w.close()
    names = dictionary(ingest)
    assert sorted(by_kind(ingest.reports[0], names, UPDATE)) == ["0.bias", "0.weight"]


def test_updates_need_an_optimizer_and_are_off_by_default(ingest):
    model = make_model()
    w = gradwatch.watch(model, run="upd-4", collector=ingest.target, select="updates:on")  # no optimizer
    model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    w.step()
    w.close()
    assert {t.kind for t in dictionary(ingest).values()} == {run_pb2.TENSOR_KIND_PARAMETER,
                                                            run_pb2.TENSOR_KIND_GRADIENT}
    assert UPDATE not in AgentConfig().selection().kinds
    assert w.counters.internal_errors == 0


def test_gradscaler_skipped_step_takes_no_update(ingest):
    model = make_model().float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    w = gradwatch.watch(model, opt, run="upd-5", collector=ingest.target, select="updates:on")
    for i in range(3):
        scaler.scale(model(torch.randn(4, 8)).pow(2).mean()).backward()
        if i == 1:
            model[0].weight.grad[0, 0] = float("inf")  # overflow: no optimizer step, no hooks
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        w.step()
    w.close()
    names = dictionary(ingest)
    assert [r.step for r in ingest.reports] == [0, 1]
    assert all(s.nan == s.inf == 0 for r in ingest.reports for s in by_kind(r, names, UPDATE).values())


def test_optimizer_state_of_adam_named_after_the_parameter(ingest):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)  # three moments: two are watched
    w = gradwatch.watch(model, opt, run="upd-6", collector=ingest.target, select="optimizer_state:on")
    expected = []
    for step in range(3):
        model(torch.randn(4, 8, dtype=torch.float64)).pow(2).mean().backward()
        if step == 1:
            model[2].weight.grad[0, 0] = float("nan")  # NaN moments from here on
        opt.step()
        expected.append({f"{n}.{k}": opt.state[p][k].numpy().copy()
                         for n, p in model.named_parameters() for k in ("exp_avg", "exp_avg_sq")})
        opt.zero_grad()
        w.step(loss=1.0)
    w.close()
    names = dictionary(ingest)
    states = {t.name: t for t in names.values() if t.kind == STATE}
    assert set(states) == set(expected[0])  # max_exp_avg_sq and the scalar step are left out
    params = {t.name: t for t in names.values() if t.kind == run_pb2.TENSOR_KIND_PARAMETER}
    for name, info in states.items():
        p = params[name.rsplit(".", 1)[0]]
        assert (info.module_path, info.order) == (p.module_path, p.order)
    assert [r.step for r in ingest.reports] == [0, 1, 2]  # the state of the first step is reported too
    for report, exp in zip(ingest.reports, expected, strict=True):
        got = by_kind(report, names, STATE)
        assert set(got) == set(exp)
        for name, values in exp.items():
            assert_matches(got[name], values)
    assert by_kind(ingest.reports[2], names, STATE)["2.weight.exp_avg"].nan > 0  # the NaN spreads through forward
    assert all(r.loss == 1.0 for r in ingest.reports)
    assert w.counters.internal_errors == 0


def test_full_preset_captures_updates_and_state_in_one_report(ingest):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    w = gradwatch.watch(model, opt, run="upd-7", collector=ingest.target, select="preset:full")
    for _ in range(2):
        model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
        opt.step()
        opt.zero_grad()
        w.step()
    w.close()
    names = dictionary(ingest)
    for report in ingest.reports:
        kinds = {names[s.tensor_id].kind for s in report.tensors}
        assert {UPDATE, STATE, run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT} <= kinds
        ratio = {n: math.sqrt(s.sum_squares) for n, s in by_kind(report, names, UPDATE).items()}
        assert all(0 < v < 1 for v in ratio.values())


def test_frozen_parameters_take_no_copy(ingest):
    """A LoRA-style run: the frozen base weight and a parameter outside the optimizer get no update slot
    and no bytes of the budget."""
    model = make_model()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([model[0].bias, model[2].weight], lr=0.1)  # 2.bias is not trained by it
    cfg = AgentConfig(collector=ingest.target, select="updates:on", updates_max_bytes=128 + 256)
    w = gradwatch.watch(model, opt, run="upd-8", config=cfg)
    assert w.counters.updates_over_budget == 0 and w._capture.updates.copy_bytes == 128 + 256
    model(torch.randn(4, 8, dtype=torch.float64)).sum().backward()
    opt.step()
    w.close()
    assert sorted(by_kind(ingest.reports[0], dictionary(ingest), UPDATE)) == ["0.bias", "2.weight"]
