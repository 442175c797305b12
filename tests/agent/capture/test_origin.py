"""The always-on NaN/Inf origin check, with the default selection, against a real gRPC server: the reports
name the module, the direction and the step where NaN or Inf was born, in a transformer-like model
(embedding, blocks of LayerNorm + nn.MultiheadAttention + MLP with residuals, head), under activation
checkpointing, gradient accumulation, torch.compile, without an optimizer, and with no host reads on the
training thread."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.agent.capture.origin import OriginCheck, leaf_modules
from gradwatch.v1 import report_pb2
from tests.agent.capture.test_updates import dictionary

V, D, HEADS, T, B = 24, 16, 2, 5, 3
FORWARD, BACKWARD = report_pb2.DIRECTION_FORWARD, report_pb2.DIRECTION_BACKWARD
BLOCK = ("ln1", "attn", "ln2", "fc", "relu", "act", "out")
ORDER = ["embed", *(f"blocks.{b}.{m}" for b in range(3) for m in BLOCK), "ln", "head"]  # forward execution order


class _InfGrad(torch.autograd.Function):
    """Identity forward; its backward turns one element of the (finite) gradient it passes on into Inf."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad.view(-1)[0] = math.inf
        return grad


class Act(nn.Module):
    """GELU that can be told to produce NaN or Inf in its forward, or Inf in its backward."""

    def __init__(self):
        super().__init__()
        self.forward_value: float | None = None
        self.backward_inf = False

    def forward(self, x):
        y = F.gelu(x)
        if self.forward_value is not None:
            y[0, 0, 0] = self.forward_value
        return _InfGrad.apply(y) if self.backward_inf else y


class Attention(nn.MultiheadAttention):
    """Attention that can be told to put a NaN into its second output (the weights) only."""

    nan_weights = False

    def forward(self, *args, **kwargs):
        out, weights = super().forward(*args, **kwargs)
        if self.nan_weights:
            weights = weights.clone()
            weights[0, 0, 0] = math.nan
        return out, weights


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(D), Attention(D, HEADS, batch_first=True)
        self.ln2, self.fc, self.relu = nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.ReLU(inplace=True)
        self.act, self.out = Act(), nn.Linear(4 * D, D)

    def forward(self, x):
        h = self.ln1(x)
        a, _ = self.attn(h, h, h)  # two outputs: the attention and its averaged weights
        x = x + a
        return x + self.out(self.act(self.relu(self.fc(self.ln2(x)))))  # ReLU in place on fc's output


class Net(nn.Module):
    def __init__(self, reentrant: bool | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, V)
        self.reentrant = reentrant  # None: no activation checkpointing

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x) if self.reentrant is None else checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(self.ln(x))


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def loss_of(model, seed):
    idx, target = batch(seed)
    return F.cross_entropy(model(idx).view(-1, V), target.view(-1))


def config(ingest, **fields) -> AgentConfig:
    """The defaults (selection included), without the burst after a NaN: which steps a burst takes depends on
    how fast the reader thread sees the NaN."""
    return AgentConfig(collector=ingest.target, burst_steps=0, **fields)


def stand_in_optimizer() -> torch.optim.Optimizer:
    """An optimizer whose hooks open the capture windows while the model's parameters stay as they are, so
    that only the poisoned step is bad (lr 0 would not do: 0 * NaN is NaN)."""
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def train(model, ingest, poison, *, bad_step=2, steps=4, accumulate=1, bad_micro=0, optimizer=True, **fields):
    """Train `steps` steps; `poison(model, on)` turns the fault on for micro-batch `bad_micro` of `bad_step`."""
    opt = stand_in_optimizer() if optimizer else None
    w = gradwatch.watch(model, opt, run="origin", config=config(ingest, **fields))
    for step in range(steps):
        for micro in range(accumulate):
            poison(model, step == bad_step and micro == bad_micro)
            loss = loss_of(model, 100 * step + micro) / accumulate
            loss.backward()
        if opt is not None:
            opt.step()
        w.step(loss=loss)
        model.zero_grad(set_to_none=True)
    poison(model, False)
    w.close()
    assert w.counters.internal_errors == 0 and w.counters.dropped == 0
    return w, ingest.reports


def act_forward(value):
    def poison(model, on):
        model.blocks[1].act.forward_value = value if on else None
    return poison


def attn_weights(model, on):
    model.blocks[1].attn.nan_weights = on


def act_backward(model, on):
    model.blocks[1].act.backward_inf = on


def fc_weight(model, on):
    with torch.no_grad():
        model.blocks[1].fc.weight[0, 0] = math.nan if on else 0.5


def origins(report) -> dict[int, tuple[str, int, str]]:
    return {o.direction: (o.module, o.order, o.observed) for o in report.nonfinite_origins}


def forward_origin(module):
    return FORWARD, (module, ORDER.index(module), f"{module}:output")


def only_bad_step(reports, step=2):
    bad = [r for r in reports if r.nonfinite_origins]
    assert [r.step for r in bad] == [step], [(r.step, origins(r)) for r in reports]
    return bad[0]


@pytest.mark.parametrize(("poison", "module", "loss_finite"), [
    (act_forward(math.nan), "blocks.1.act", False),
    (act_forward(math.inf), "blocks.1.act", False),
    (attn_weights, "blocks.1.attn", True),  # NaN in the second of two outputs only: nothing downstream sees it
], ids=["nan", "inf", "attention-weights"])
def test_forward_origin_names_the_middle_module_where_nan_or_inf_was_born(ingest, poison, module, loss_finite):
    _, reports = train(Net(), ingest, poison)
    assert [r.step for r in reports] == [0, 1, 2, 3]  # the default: every step, the origin check on
    bad = only_bad_step(reports)
    got = origins(bad)
    assert got[FORWARD] == forward_origin(module)[1]
    if loss_finite:
        assert math.isfinite(bad.loss) and BACKWARD not in got
    else:  # NaN reached the logits: the loss's own gradient is the first non-finite one in backward
        assert math.isnan(bad.loss) and got[BACKWARD] == ("(loss)", len(ORDER), "head:output.grad")


def test_backward_origin_names_the_module_whose_backward_made_inf(ingest):
    _, reports = train(Net(), ingest, act_backward)
    bad = only_bad_step(reports)
    # act's backward turned the finite gradient of its output into an Inf gradient of its input, which is
    # the output of the in-place ReLU before it.
    assert origins(bad) == {BACKWARD: ("blocks.1.act", ORDER.index("blocks.1.act"), "blocks.1.relu:output.grad")}
    assert math.isfinite(bad.loss)


def test_poisoned_weight_names_its_module_and_its_summary_shows_the_nan(ingest):
    _, reports = train(Net(), ingest, fc_weight)
    bad = only_bad_step(reports)
    assert origins(bad)[FORWARD] == forward_origin("blocks.1.fc")[1]
    names = {i: t.name for i, t in dictionary(ingest).items()}
    weight = next(s for s in bad.tensors if names[s.tensor_id] == "blocks.1.fc.weight")
    assert weight.nan_count == 1 and weight.count == 4 * D * D


def checks_per_step(model) -> list[tuple[int, int]]:
    """(forward, backward) checks of each step of a short run, counted at the window."""
    w = gradwatch.watch(model, run="origin-count", collector="127.0.0.1:1", select="origin:on")
    counts, close = [], w._capture.origin.close

    def counting_close():
        window = close()
        counts.append((sum(v >= 0 for v in window.visits), sum(v < 0 for v in window.visits)))
        return window

    w._capture.origin.close = counting_close
    for step in range(2):
        loss_of(model, step).backward()
        w.step()
        model.zero_grad()
    w.close(timeout=0.1)
    return counts


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize(("poison", "direction", "origin"), [
    (act_forward(math.nan), FORWARD, forward_origin("blocks.1.act")[1]),
    (act_backward, BACKWARD, ("blocks.1.act", ORDER.index("blocks.1.act"), "blocks.1.relu:output.grad")),
    (fc_weight, FORWARD, forward_origin("blocks.1.fc")[1]),
], ids=["forward", "backward", "poisoned-weight"])
def test_activation_checkpointing_neither_double_counts_nor_misnames(ingest, reentrant, poison, direction, origin):
    # The recomputation in backward runs every block's forward again: its checks must not count.
    plain = checks_per_step(Net())
    assert plain == checks_per_step(Net(reentrant)) and plain[0][0] == len(ORDER) + 3  # + the weights of 3 attns
    _, reports = train(Net(reentrant), ingest, poison)
    assert origins(only_bad_step(reports))[direction] == origin


def test_gradient_accumulation_catches_the_micro_batch_that_went_bad(ingest):
    _, reports = train(Net(), ingest, act_forward(math.nan), accumulate=3, bad_micro=1)
    assert [r.step for r in reports] == [0, 1, 2, 3]
    assert origins(only_bad_step(reports))[FORWARD] == forward_origin("blocks.1.act")[1]


def test_without_an_optimizer_watcher_step_is_the_window(ingest):
    _, reports = train(Net(), ingest, act_backward, optimizer=False)
    assert origins(only_bad_step(reports))[BACKWARD][0] == "blocks.1.act"


def test_steps_that_were_not_due_are_reported_with_honest_steps_and_sequences(ingest):
    w, reports = train(Net(), ingest, act_forward(math.inf), steps=7, every=5)
    assert [(r.step, r.sequence) for r in reports] == [(0, 1), (2, 2), (5, 3)]
    bad = reports[1]
    assert not bad.tensors and math.isnan(bad.loss) and origins(bad)[FORWARD] == forward_origin("blocks.1.act")[1]
    assert w.counters.unscheduled == 1 and w.counters.captured == 2


def test_a_non_finite_loss_alone_is_reported_on_a_step_that_was_not_due(ingest):
    model = Net()
    w = gradwatch.watch(model, run="origin-loss", config=config(ingest, every=5))
    for step in range(4):
        loss = loss_of(model, step)
        w.step(loss=loss * math.inf if step == 2 else loss)  # outside the model: no module made it
        model.zero_grad()
    w.step(loss=math.nan)  # a number works too
    w.close()
    reports = ingest.reports
    assert [r.step for r in reports] == [0, 2, 4] and not reports[1].nonfinite_origins
    assert math.isinf(reports[1].loss) and math.isnan(reports[2].loss)


@pytest.mark.parametrize("flush", [True, False])
def test_a_report_with_an_origin_is_exported_at_once(ingest, flush):
    model = Net()
    w = gradwatch.watch(model, run="origin-flush", config=config(ingest, every=100, export_interval_s=30,
                                                                 flush_nonfinite=flush))
    for step in range(3):
        act_forward(math.nan)(model, step == 1)
        loss_of(model, step).backward()
        w.step()
        model.zero_grad()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and len(ingest.reports) < 2:
        time.sleep(0.02)
    exported = [r.step for r in ingest.reports]
    w.close()
    # Step 0 (due) waited in the queue; the origin's report took it along at once, or nothing went yet.
    assert exported == ([0, 1] if flush else [])
    assert [r.step for r in ingest.reports] == [0, 1]


@pytest.mark.parametrize("switch", ["select", "environment"])
def test_the_check_can_be_turned_off(ingest, monkeypatch, switch):
    if switch == "environment":
        monkeypatch.setenv("GRADWATCH_AGENT_ORIGIN", "0")
    model = Net()
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    w = gradwatch.watch(model, run="origin-off", collector=ingest.target, every=5,
                        select="origin:off" if switch == "select" else None)
    assert w._capture.origin is None and w.selection.origin is False
    for step in range(4):
        act_forward(math.nan)(model, step == 2)
        loss_of(model, step).backward()
        w.step()
        model.zero_grad()
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks  # the first step's order hooks are gone
    w.close()
    assert [r.step for r in ingest.reports] == [0] and not ingest.reports[0].nonfinite_origins


def test_no_host_reads_on_the_training_thread(ingest, host_reads):
    """Due and not due steps, accumulation, checkpointing, a NaN and a tensor loss: device work only."""
    model = Net(reentrant=False)
    opt = stand_in_optimizer()
    w = gradwatch.watch(model, opt, run="origin-sync", config=config(ingest, every=3))
    for step in range(5):
        for micro in range(2):
            act_forward(math.nan)(model, step == 1 and micro == 1)
            loss = loss_of(model, step)
            loss.backward()
        opt.step()
        model.zero_grad()
        w.step(loss=loss)
    w.close()
    assert host_reads == []
    assert [r.step for r in ingest.reports] == [0, 1, 3]


def test_torch_compile_gets_the_forward_origin_without_a_graph_break(ingest):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), Act(), nn.Linear(D, 4))
    check = OriginCheck(model)
    explained = torch._dynamo.explain(model)(torch.randn(2, 5, D))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    check.close()
    check.remove()

    compiled = torch.compile(model, backend="aot_eager")
    w = gradwatch.watch(model, run="origin-compile", config=config(ingest, every=10))
    for step in range(4):
        model[1].forward_value = math.nan if step == 2 else None
        compiled(torch.randn(2, 5, D)).sum().backward()
        w.step()
        model.zero_grad()
    w.close()
    assert [r.step for r in ingest.reports] == [0, 2]
    assert origins(ingest.reports[1])[FORWARD] == ("1", 1, "1:output")
    assert w.counters.internal_errors == 0


def test_every_floating_output_is_checked_and_leaves_include_attention():
    assert [p for p, _ in leaf_modules(Net())] == ORDER  # attn's out_proj never runs: the attention is the leaf
    model = nn.Sequential(nn.Linear(4, 4))
    check = OriginCheck(model)
    hook = model[0]._forward_hooks[next(iter(model[0]._forward_hooks))]
    x = torch.ones(2, 4)
    hook(model[0], (x,), {"a": x, "b": (x, torch.arange(3)), "c": torch.zeros(0)})  # dict; nested, int, empty
    hook(model[0], (x,), [x, x.double(), x.to(torch.int32)])
    assert check.close().visits == [0, 0, 0]


def test_steps_gradscaler_skipped_for_a_loss_scale_overflow_name_no_origin(ingest):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.mul_(1e3)  # the scaled gradient overflows to Inf in model[2]'s backward
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 118)
    w = gradwatch.watch(model, opt, run="origin-scaler", config=config(ingest))
    for _ in range(10):
        loss = model(torch.randn(3, 4)).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)  # skipped while the gradients hold Inf
        scaler.update()
        opt.zero_grad()
        w.step(loss=loss)
    assert copy.deepcopy(opt).zero_grad.__self__ is not opt  # a copy's zero_grad is its own
    w.close()
    assert 0 < len(ingest.reports) < 10  # some steps were skipped, some were made
    assert not any(r.nonfinite_origins for r in ingest.reports)
    assert "zero_grad" not in vars(opt)  # close() unwrapped it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_origin_check_passes_sync_debug_mode_error(ingest):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 4 * D), Act(), nn.Linear(4 * D, D)).cuda()
    opt = torch.optim.SGD([torch.zeros(1, device="cuda", requires_grad=True)], lr=0.1)
    w = gradwatch.watch(model, opt, run="origin-cuda", config=config(ingest, every=3))
    xs = [torch.randn(B, T, D, device="cuda") for _ in range(7)]  # made before the check: a pageable copy syncs

    def step(i):
        model[1].forward_value = math.nan if i == 4 else None
        loss = model(xs[i]).pow(2).mean()
        loss.backward()
        opt.step()
        model.zero_grad()
        w.step(loss=loss)

    step(0)  # the first step learns the forward order (and may allocate)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 7):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    w.close()
    assert [r.step for r in ingest.reports] == [0, 3, 4, 6] and w.counters.internal_errors == 0
    assert origins(ingest.reports[2]) == {FORWARD: ("1", 1, "1:output"), BACKWARD: ("(loss)", 3, "2:output.grad")}
