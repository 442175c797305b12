"""The Watcher in real training loops against a real gRPC server on 127.0.0.1."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.v1 import run_pb2


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def train(model, optimizer, watcher, steps, accumulate=1, step_scalars=True):
    for _ in range(steps):
        for _ in range(accumulate):
            loss = model(torch.randn(4, 8)).pow(2).mean() / accumulate
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step_scalars:
            watcher.step(loss=loss, accuracy=0.5)


def test_reports_reach_the_collector_with_dictionary_and_sequence(ingest):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, run="unit-1", collector=ingest.target, hyperparameters={"lr": 0.1}) as w:
        train(model, opt, w, steps=6)
        assert w.flush(5)
    reports = ingest.reports
    assert [r.step for r in reports] == list(range(6))
    assert [r.sequence for r in reports] == list(range(1, 7))
    reg = ingest.requests[0].registrations[0]
    assert reg.run_id == "unit-1" and reg.world_size == 1 and reg.hyperparameters["lr"].number == 0.1
    names = {t.id: t for t in reg.tensors}
    assert {t.name for t in reg.tensors} >= {"0.weight", "0.weight.grad", "2.bias.grad"}
    assert all(not req.registrations for req in ingest.requests[1:])  # sent once, until acknowledged
    first = reports[0]
    assert first.loss > 0 and first.scalars["accuracy"] == 0.5 and list(first.learning_rates) == [0.1]
    grads = [s for s in first.tensors if names[s.tensor_id].kind == run_pb2.TENSOR_KIND_GRADIENT]
    assert len(grads) == 4 and all(s.sum_squares > 0 for s in grads)  # measured before zero_grad
    assert w.counters.exported == 6 and w.counters.dropped == 0


def test_every_n_and_gradient_accumulation_count_optimizer_steps(ingest):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="unit-2", collector=ingest.target, every=3)
    train(model, opt, w, steps=7, accumulate=4)
    w.close()
    assert [r.step for r in ingest.reports] == [0, 3, 6]


def test_optimizer_hook_alone_reports_every_optimizer_step(ingest):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="unit-3", collector=ingest.target)
    train(model, opt, w, steps=5, step_scalars=False)
    w.close()
    assert [r.step for r in ingest.reports] == [0, 1, 2, 3, 4]


def test_without_optimizer_step_is_the_capture_window(ingest):
    model = make_model()
    w = gradwatch.watch(model, run="unit-4", collector=ingest.target)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        w.step(loss=1.5)
        model.zero_grad()
    w.close()
    assert [r.loss for r in ingest.reports] == [1.5, 1.5, 1.5]
    assert all(len(r.tensors) == 8 for r in ingest.reports)


def test_token_travels_as_bearer_metadata(ingest):
    model = make_model()
    w = gradwatch.watch(model, run="unit-5", collector=ingest.target, token="s3cret")
    w.step()
    w.close()
    assert ingest.metadata[0]["authorization"] == "Bearer s3cret"


def test_retryable_failures_are_retried_and_nothing_is_lost(ingest):
    import grpc

    ingest.fail_with = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="unit-6", collector=ingest.target)
    train(model, opt, w, steps=4)
    w.close()
    assert [r.sequence for r in ingest.reports] == [1, 2, 3, 4]
    assert w.counters.export_errors == 0 and w.counters.dropped == 0


def test_collector_unreachable_training_goes_on_and_drops_are_counted():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = AgentConfig(collector="127.0.0.1:1", queue_size=4, batch_reports=2, export_timeout_s=0.3,
                      shutdown_timeout_s=0.5)
    w = gradwatch.watch(model, opt, run="unit-7", config=cfg)
    started = time.monotonic()
    train(model, opt, w, steps=20)
    w.close()
    assert time.monotonic() - started < 10
    c = w.counters
    assert c.captured + c.skipped_busy == 20
    assert c.exported == 0 and c.dropped == c.captured  # every captured report accounted for
    assert c.internal_errors == 0


def test_agent_errors_never_reach_the_training_loop(ingest, monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="unit-8", collector=ingest.target)
    monkeypatch.setattr(w._capture.summarizer, "summarize_many", lambda *a: 1 / 0)
    train(model, opt, w, steps=3)  # must not raise
    w.close()
    assert w.counters.internal_errors >= 3


def test_training_thread_makes_no_host_reads(ingest, monkeypatch):
    """CPU stand-in for set_sync_debug_mode: any host read of a tensor on the training thread fails."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="unit-9", collector=ingest.target)
    training_thread = threading.current_thread()
    offenders = []

    def trap(name, original):
        def wrapped(self, *args, **kwargs):
            if threading.current_thread() is training_thread:
                offenders.append(name)
            return original(self, *args, **kwargs)
        return wrapped

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, trap(name, getattr(torch.Tensor, name)))
    for _ in range(5):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        w.step(loss=loss)
    monkeypatch.undo()
    w.close()
    assert offenders == []
    assert len(ingest.reports) == 5 and all(r.loss > 0 for r in ingest.reports)


def full_capture_loop(watcher, model, opt, device="cpu", steps=4):
    """Every capture at once: the full preset (activation gradients, updates, Adam state), inputs with
    channels, labels, accumulation, held scalars and an evaluation report with a tensor loss."""
    for _ in range(steps):
        for _ in range(2):
            x = torch.randn(4, 3, 5, device=device)
            y = torch.randint(0, 4, (4,), device=device)
            watcher.observe_inputs({"x": x, "ids": y}, labels=y)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            watcher.step(micro=loss)
        opt.step()
        opt.zero_grad()
        watcher.step(loss=loss)
        watcher.step(phase="eval", loss=loss.detach() * 2, accuracy=loss.detach())


def conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(18, 4))


def test_new_captures_make_no_host_reads_on_the_training_thread(ingest, host_reads):
    model = conv_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    w = gradwatch.watch(model, opt, run="unit-9b", collector=ingest.target, select="preset:full")
    full_capture_loop(w, model, opt)
    w.close()
    assert host_reads == []
    reports = ingest.reports
    assert [(r.step, r.phase) for r in reports] == [(s, p) for s in range(4) for p in (1, 2)]
    reg = [r for req in ingest.requests for r in req.registrations][-1]
    kinds = {t.id: t.kind for t in reg.tensors}
    assert {kinds[s.tensor_id] for s in reports[0].tensors} == set(range(1, 8))  # every TensorKind
    assert all(r.scalars["labels/0"] + r.scalars["labels/3"] >= 0 for r in reports[::2])
    assert w.counters.internal_errors == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_new_captures_pass_sync_debug_mode_error(ingest):
    model = conv_model().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    w = gradwatch.watch(model, opt, run="unit-cuda-full", collector=ingest.target, select="preset:full")
    full_capture_loop(w, model, opt, "cuda", steps=1)  # the first step grows the dictionary (allowed to sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        full_capture_loop(w, model, opt, "cuda", steps=4)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    w.close()
    assert len(ingest.reports) == 10 and w.counters.internal_errors == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_hot_path_passes_sync_debug_mode_error(ingest):
    model = make_model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="unit-cuda", collector=ingest.target)
    x = torch.randn(4, 8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.step(loss=loss)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    w.close()
    assert len(ingest.reports) == 5


def test_forked_child_stays_quiet_and_parent_keeps_exporting(ingest):
    """DataLoader workers fork: the child must neither export nor hang, the parent goes on."""
    import os

    model = make_model()
    w = gradwatch.watch(model, run="unit-fork", collector=ingest.target)
    w.step()
    assert w.flush(5)
    pid = os.fork()
    if pid == 0:  # child: a few steps and a close must return at once and send nothing
        code = 1
        try:
            started = time.monotonic()
            w.step()
            w.close()
            code = 0 if time.monotonic() - started < 2 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    w.step()
    w.close()
    assert [r.sequence for r in ingest.reports] == [1, 2]


def test_micro_batch_calls_and_gradscaler_skipped_steps_report_optimizer_steps_only(ingest):
    """watcher.step() per micro-batch, and a step GradScaler skips for overflow: neither is a report,
    so fp16 loss-scale overflows (routine) never look like NaN gradients downstream."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    w = gradwatch.watch(model, opt, run="unit-amp", collector=ingest.target)
    for i in range(6):
        for micro in range(2):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            scaler.scale(loss).backward()
            w.step(micro=float(micro))
        if i == 3:
            next(model.parameters()).grad[0, 0] = float("inf")  # overflow: scaler.step skips opt.step()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        w.step(loss=loss)
    w.close()
    reports = ingest.reports
    assert [r.step for r in reports] == [0, 1, 2, 3, 4]  # 6 iterations, one skipped by the scaler
    assert all(s.nan_count == 0 and s.inf_count == 0 for r in reports for s in r.tensors)
    assert all(r.scalars["micro"] == 1.0 and r.loss > 0 for r in reports)  # held scalars attach


class Reversed(nn.Module):
    """Registered b-then-a, executed a-then-b: orders must follow execution, not registration."""

    def __init__(self):
        super().__init__()
        self.b = nn.Linear(6, 2)
        self.a = nn.Linear(8, 6)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_activations_and_forward_execution_order(ingest):
    model = Reversed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="unit-act", collector=ingest.target, config=AgentConfig(
        collector=ingest.target, activations=True))
    for batch in (3, 5, 7):  # optimizer-hook-only mode: activations must stay with their own step
        model(torch.randn(batch, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    w.close()
    reg = ingest.requests[0].registrations[0]
    order = {t.name: t.order for t in reg.tensors}
    assert order["a.weight"] < order["act:output"] < order["b.weight"]
    assert order["a:output"] == order["a.weight"] and order["b.bias.grad"] == order["b:output"]
    kinds = {t.id: t for t in reg.tensors}
    for report, batch in zip(ingest.reports, (3, 5, 7), strict=True):
        acts = {kinds[s.tensor_id].name: s for s in report.tensors
                if kinds[s.tensor_id].kind == run_pb2.TENSOR_KIND_ACTIVATION}
        assert set(acts) == {"a:output", "act:output", "b:output"}
        assert acts["a:output"].count == batch * 6 and acts["b:output"].count == batch * 2
        assert acts["act:output"].max <= 1.0 and acts["act:output"].min >= -1.0  # tanh


def test_eval_forward_passes_are_not_reported_as_activations(ingest):
    model = make_model()
    w = gradwatch.watch(model, run="unit-eval", config=AgentConfig(collector=ingest.target, activations=True))
    with torch.no_grad():
        model(torch.randn(50, 8))  # validation between steps: no grad, not captured
    w.step()
    w.close()
    assert ingest.reports[0].tensors
    assert all(s.count != 50 * 16 for s in ingest.reports[0].tensors)


def test_selection_limits_what_is_watched(ingest):
    model = make_model()
    w = gradwatch.watch(model, run="unit-select", collector=ingest.target, select="exclude:*.bias,gradients:0")
    model(torch.randn(4, 8)).sum().backward()
    w.step()
    w.close()
    reg = ingest.requests[0].registrations[0]
    assert sorted(t.name for t in reg.tensors) == ["0.weight", "2.weight"]
    assert len(ingest.reports[0].tensors) == 2 and len(ingest.reports[0].tensors[0].histogram) > 0


def test_schedule_with_a_burst_after_a_local_nan(ingest):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the injected NaN stays put
    w = gradwatch.watch(model, opt, run="unit-burst", config=AgentConfig(
        collector=ingest.target, schedule="every:4", burst_steps=3))
    for step in range(13):
        if step == 4:
            with torch.no_grad():
                model[2].weight[0, 0] = float("nan")
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        w.step()
        if step == 4:
            assert w.flush(5)  # the reader sees the NaN; the burst starts at the next due() call
        if step == 8:
            with torch.no_grad():
                model[2].weight[0, 0] = 0.0
            assert w.flush(5)
    w.close()
    # every:4 gives 0, 4, 8, 12; the NaN seen at 4 bursts 5-7; still NaN at 8, so 9-11 as well.
    assert [r.step for r in ingest.reports] == [0, *range(4, 13)]


def test_invalid_select_or_schedule_is_a_clear_error_at_watch():
    from gradwatch.settings import ConfigError

    with pytest.raises(ConfigError, match="preset"):
        gradwatch.watch(make_model(), select="preset:luxury", collector="127.0.0.1:1")
    with pytest.raises(ConfigError, match="every"):
        gradwatch.watch(make_model(), schedule="every:0", collector="127.0.0.1:1")


def test_dropped_reports_reach_the_collector(ingest):
    """Reports lost while the collector was unreachable are announced with the next delivered batch."""
    import grpc

    ingest.fail_with = [grpc.StatusCode.UNAVAILABLE] * 1000  # down until cleared below
    model = make_model()
    cfg = AgentConfig(collector=ingest.target, queue_size=2, batch_reports=2, export_timeout_s=0.2,
                      export_interval_s=0.05)
    w = gradwatch.watch(model, run="unit-drops", config=cfg)
    for _ in range(6):
        model(torch.randn(4, 8)).sum().backward()
        w.step()
        model.zero_grad()
    assert w.flush(0.5) is False  # nothing can be delivered
    ingest.fail_with = []
    assert w.flush(10)
    w.close()
    assert w.counters.dropped == 4 and w.counters.exported == 2
    assert sum(r.dropped_reports for r in ingest.reports) == 4 + w.counters.skipped_busy
    assert [r.sequence for r in ingest.reports] == [5, 6]  # the gap shows the same loss


def test_watchers_flush_at_interpreter_exit(ingest, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import torch, gradwatch\n"
        "m = torch.nn.Linear(3, 3)\n"
        f"w = gradwatch.watch(m, run='unit-atexit', collector='{ingest.target}')\n"
        "for _ in range(3):\n"
        "    m(torch.randn(2, 3)).sum().backward(); w.step(); m.zero_grad()\n"
        "# no close(): the atexit hook flushes\n")
    subprocess.run([sys.executable, str(script)], check=True, timeout=60)
    assert [r.step for r in ingest.reports] == [0, 1, 2]


def test_close_sends_one_end_of_run_marker_after_the_last_report(ingest):
    model = make_model()
    w = gradwatch.watch(model, run="unit-final", collector=ingest.target)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        w.step()
        model.zero_grad()
    w.close()
    w.close()  # idempotent: still one marker
    (final,) = ingest.finals
    assert final.sequence == 4 and final.step == 2 and not final.tensors
    assert w.counters.exported == 3  # counters count step reports only


def test_eval_phase_reports_scalars_at_the_last_optimizer_step_and_disturbs_nothing(ingest):
    from gradwatch.v1 import report_pb2

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="unit-evalphase", collector=ingest.target)
    w.step(phase="eval", loss=3.0)  # a baseline before training: step 0
    for i in range(3):
        for micro in range(2):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            loss.backward()
            w.step(micro=float(micro))  # held for the next report
            if i == 1 and micro == 0:  # mid-accumulation: held scalars and the step stay as they are
                w.step(phase="eval", loss=loss.detach() + 1, accuracy=torch.tensor(0.75))
        opt.step()
        opt.zero_grad()
        if i == 2:  # between optimizer.step() and watcher.step(): the captured step waits for its loss
            w.step(phase="eval", loss=torch.tensor(float("nan")))
        w.step(loss=loss)
    w.step(phase="test", loss=1.0)  # not a phase: counted, never raised
    w.close()
    reports = ingest.reports
    phases = [(r.step, r.phase) for r in reports]
    train, evals = report_pb2.PHASE_TRAIN, report_pb2.PHASE_EVAL
    assert phases == [(0, evals), (0, train), (0, evals), (1, train), (2, evals), (2, train)]
    assert [r.sequence for r in reports] == list(range(1, 7))
    for r in reports:
        if r.phase == evals:
            assert not r.tensors and not r.learning_rates
        else:
            assert len(r.tensors) == 8 and r.scalars["micro"] == 1.0 and r.loss > 0 and list(r.learning_rates) == [0.1]
    assert reports[0].loss == 3.0
    assert reports[2].loss > 1 and reports[2].scalars["accuracy"] == 0.75
    assert math.isnan(reports[4].loss)  # data: no burst, no alarm from the agent
    assert w.counters.internal_errors == 1 and w.counters.captured == 6


def test_external_window_gives_up_a_step_the_optimizer_never_made(ingest):
    """Lightning's way: the integration opens the window after backward; a step that GradScaler skips
    (no optimizer hooks run) is given up at the next window, with no sequence gap and no update."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="unit-window", collector=ingest.target, select="updates:on")
    w.external_window = True
    for i in range(4):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        w.capture_window()
        if i != 1:
            opt.step()
        opt.zero_grad()
        w.step(loss=float(i))
    w.close()
    reports = ingest.reports
    assert [r.step for r in reports] == [0, 1, 2] and [r.sequence for r in reports] == [1, 2, 3]
    assert [r.loss for r in reports] == [0.0, 2.0, 3.0]
    reg = [r for req in ingest.requests for r in req.registrations][-1]
    kinds = {t.id: t.kind for t in reg.tensors}
    for r in reports:
        assert sum(1 for s in r.tensors if kinds[s.tensor_id] == run_pb2.TENSOR_KIND_UPDATE) == 4
        assert all(s.sum_squares > 0 for s in r.tensors if kinds[s.tensor_id] == run_pb2.TENSOR_KIND_GRADIENT)
    assert w.counters.captured == 3 and w.counters.internal_errors == 0
