"""The agent's memory budget: the report queue never holds more than queue_bytes of encoded reports,
drops the oldest (counted exactly) while the collector is down, and delivers the newest, in order,
once it is back. Against a real gRPC server on 127.0.0.1 that fails with UNAVAILABLE until cleared."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.agent.config import DEFAULT_QUEUE_BYTES
from gradwatch.agent.export.batch import ReportPipeline
from gradwatch.agent.export.counters import AgentCounters
from gradwatch.agent.export.exporter import ExportResult
from gradwatch.settings import ConfigError
from gradwatch.v1 import report_pb2, run_pb2

QUEUE_BYTES = 64 << 10
BATCH_BYTES = 16 << 10


def make_model(layers: int = 25) -> nn.Module:
    """25 bias-free layers: 50 watched tensors (each weight and its gradient)."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(layers)])


def train_step(model, opt, watcher) -> None:
    loss = model(torch.randn(4, 16)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    watcher.step(loss=loss)


def budget_config(collector: str, **changes) -> AgentConfig:
    values = dict(collector=collector, queue_bytes=QUEUE_BYTES, batch_bytes=BATCH_BYTES, queue_size=4096,
                  host_slots=64, export_timeout_s=0.2, export_interval_s=0.02, shutdown_timeout_s=2.0)
    return AgentConfig(**{**values, **changes})


class Sampler:
    """Reads pipeline.queued_bytes as often as it can from another thread; keeps the maximum."""

    def __init__(self, pipeline: ReportPipeline):
        self.pipeline, self.peak, self.samples = pipeline, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.pipeline.queued_bytes)
            self.samples += 1
            time.sleep(0.0005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def test_queue_stays_within_its_byte_budget_and_the_newest_arrive_after_recovery(ingest):
    ingest.fail_with = [grpc.StatusCode.UNAVAILABLE] * 1_000_000  # down until cleared below
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = gradwatch.watch(model, opt, run="budget-1", config=budget_config(ingest.target))
    pipeline = w._pipeline
    sampler = Sampler(pipeline)
    steps, peak = 150, 0
    try:
        for step in range(steps):
            if step == steps - 1:  # every host slot back: the last step is surely captured, not skipped
                wait_for(lambda: len(w._capture.free_hosts) == w.config.host_slots, timeout=10)
            train_step(model, opt, w)
            peak = max(peak, pipeline.queued_bytes)
        wait_for(lambda: len(w._capture.free_hosts) == w.config.host_slots, timeout=10)  # all encoded and queued
        assert ingest.requests == [] and w.counters.exported == 0
        assert w.counters.export_errors > 0  # the outage was real: batches failed and went back
        assert 0 < pipeline.queued_bytes <= QUEUE_BYTES
        assert w.counters.dropped > 0  # the budget made them: the count bound (4096) is out of reach
        ingest.fail_with.clear()  # the collector comes back
        assert w.flush(10)
        peak = max(peak, sampler.stop())
    finally:
        sampler.stop()
        w.close()
    assert sampler.samples > 100 and peak <= QUEUE_BYTES
    c = w.counters
    assert c.captured + c.skipped_busy == steps and c.internal_errors == 0
    assert c.captured == c.exported + c.dropped  # every report accounted for, exactly once
    # and the collector was told of every report lost: dropped, or never made for want of a host slot
    assert sum(r.dropped_reports for r in ingest.reports) == c.dropped + c.skipped_busy
    sequences = [r.sequence for r in ingest.reports]
    assert len(sequences) == c.exported
    assert sequences == sorted(set(sequences))  # in order, no duplicates
    assert sequences[-1] == steps  # the newest report survived the outage
    report_bytes = max(r.ByteSize() for r in ingest.reports)
    assert len(sequences) >= (QUEUE_BYTES - BATCH_BYTES) // report_bytes  # the budget was used, not wasted
    assert all(len(r.tensors) == 50 for r in ingest.reports)


def test_training_with_the_collector_down_is_not_much_slower(ingest):
    """The same number of steps, collector up vs down (127.0.0.1:1), alternating; their best times compared
    with a generous factor, because the point is that nothing blocks on the network, not a benchmark. A
    fixed step count (not a time window) keeps the comparison meaningful on a busy machine."""
    best = {"up": float("inf"), "down": float("inf")}
    for _ in range(2):
        for mode, target in (("up", ingest.target), ("down", "127.0.0.1:1")):
            model = make_model()
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            w = gradwatch.watch(model, opt, run=f"budget-speed-{mode}",
                                config=budget_config(target, shutdown_timeout_s=0.5))
            for _ in range(5):  # warm-up: first-step order learning, channel set-up
                train_step(model, opt, w)
            start = time.monotonic()
            for _ in range(40):
                train_step(model, opt, w)
            best[mode] = min(best[mode], time.monotonic() - start)
            w.close()
            assert w.counters.internal_errors == 0
    assert best["down"] <= 3 * best["up"], best


# ---- the pipeline alone, with an exporter the test controls ------------------------------------


class GatedExporter:
    """Holds each export until the test opens the gate, then answers as told; records (ok, sequences)."""

    target = "gated"

    def __init__(self):
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.ok = False
        self.calls: list[tuple[bool, list[int]]] = []

    def export(self, request, deadline=None) -> ExportResult:
        self.entered.set()
        self.gate.wait(10)
        ok = self.ok
        self.calls.append((ok, [r.sequence for r in request.reports]))
        return ExportResult(ok=True) if ok else ExportResult(ok=False, retryable=True, error="UNAVAILABLE")

    def shutdown(self) -> None:
        self.gate.set()


class Captured:
    def __init__(self, report):
        self.report = report

    def release(self) -> None:
        pass


def make_report(sequence: int) -> report_pb2.StepReport:
    report = report_pb2.StepReport(run_id="gated", sequence=sequence, step=100 + sequence)
    report.tensors.add(tensor_id=0, count=1, histogram=[1] * 500)  # the same ~500 B for every sequence
    return report


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize(("queue_size", "budget_reports", "dropped_while_in_flight", "delivered"), [
    # bytes bind: the 4 in flight count against the budget of 10, so 6 may wait; 5-8 go, nothing more on put-back
    (1000, 10, [5, 6, 7, 8], [1, 2, 3, 4, 9, 10, 11, 12, 13, 14]),
    # the count binds (in-flight reports do not count): 8 wait; the put-back batch is then the oldest to go
    (8, 1000, [5, 6], [7, 8, 9, 10, 11, 12, 13, 14]),
])
def test_put_back_after_a_failed_export_obeys_both_bounds(queue_size, budget_reports, dropped_while_in_flight,
                                                          delivered):
    size = make_report(1).ByteSize()
    assert size == make_report(14).ByteSize()
    exporter, counters = GatedExporter(), AgentCounters()
    budget = budget_reports * size
    # A long interval: the exporter wakes only when a full batch (4) is waiting, so the first batch is 1-4.
    pipeline = ReportPipeline(exporter, lambda c: c.report, run_pb2.RunRegistration(run_id="gated"), counters,
                              queue_size=queue_size, batch_reports=4, batch_bytes=4 * size + 64,
                              export_interval_s=30, queue_bytes=budget)
    try:
        for seq in range(1, 5):
            pipeline.submit(Captured(make_report(seq)))
        assert exporter.entered.wait(5)  # 1-4 are in flight, held at the gate
        for seq in range(5, 15):
            pipeline.submit(Captured(make_report(seq)))
        wait_for(lambda: counters.dropped == len(dropped_while_in_flight))
        assert pipeline.queued_bytes <= budget
        exporter.gate.set()  # the export fails: 1-4 go back to the front
        wait_for(lambda: len(exporter.calls) == 2)  # and are retried (failing again, or not)
        assert pipeline.queued_bytes <= budget
        exporter.ok = True
        assert pipeline.force_flush(5)
    finally:
        exporter.gate.set()
        pipeline.shutdown(1)
    assert exporter.calls[0] == (False, [1, 2, 3, 4])
    assert [seq for ok, batch in exporter.calls if ok for seq in batch] == delivered
    assert counters.dropped == 14 - len(delivered) and counters.exported == len(delivered)
    assert pipeline.queued_bytes == 0


class FailingExporter:
    """Refuses every export for good, with the given errors in turn."""

    target = "failing"

    def __init__(self, errors: list[str]):
        self.errors = errors

    def export(self, request, deadline=None) -> ExportResult:
        error = self.errors.pop(0)
        return ExportResult(ok=False, error=error, code=error.split(":")[0] if ":" in error else "")

    def shutdown(self) -> None:
        pass


def test_a_repeated_export_error_is_logged_once_until_another_one(caplog):
    errors = ["UNAVAILABLE", "UNAVAILABLE", "UNAUTHENTICATED", "UNAUTHENTICATED", "UNAVAILABLE"]
    counters = AgentCounters()
    pipeline = ReportPipeline(FailingExporter(list(errors)), lambda c: c.report, run_pb2.RunRegistration(run_id="x"),
                              counters, queue_size=8, batch_reports=1, batch_bytes=1 << 20, export_interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        try:
            for seq in range(1, len(errors) + 1):
                pipeline.submit(Captured(make_report(seq)))
                assert pipeline.force_flush(5)
        finally:
            pipeline.shutdown(1)
    assert counters.export_errors == counters.dropped == len(errors)  # every failure counted
    assert [r.getMessage() for r in caplog.records if r.name == "gradwatch.agent"] == [
        f"gradwatch: export to failing failed: {e} (counting further failures silently)"
        for e in ("UNAVAILABLE", "UNAUTHENTICATED", "UNAVAILABLE")]


def test_an_outage_is_one_line_however_its_details_vary(caplog):
    # gRPC words one outage differently from call to call: the line is keyed by the status code.
    errors = ["UNAVAILABLE: Connection refused", "UNAVAILABLE: Socket closed", "UNAVAILABLE: failed to connect"]
    counters = AgentCounters()
    pipeline = ReportPipeline(FailingExporter(list(errors)), lambda c: c.report, run_pb2.RunRegistration(run_id="x"),
                              counters, queue_size=8, batch_reports=1, batch_bytes=1 << 20, export_interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        try:
            for seq in range(1, len(errors) + 1):
                pipeline.submit(Captured(make_report(seq)))
                assert pipeline.force_flush(5)
        finally:
            pipeline.shutdown(1)
    assert counters.export_errors == len(errors)
    assert [r.getMessage() for r in caplog.records] == [
        "gradwatch: export to failing failed: UNAVAILABLE: Connection refused (counting further failures silently)"]


def test_queue_bytes_from_env_and_validated(monkeypatch):
    assert AgentConfig().queue_bytes == DEFAULT_QUEUE_BYTES == 64 << 20
    monkeypatch.setenv("GRADWATCH_AGENT_QUEUE_BYTES", str(8 << 20))
    assert AgentConfig.from_env().validate().queue_bytes == 8 << 20
    with pytest.raises(ConfigError, match="queue_bytes must be >= batch_bytes"):
        AgentConfig(queue_bytes=1 << 20, batch_bytes=2 << 20).validate()
    with pytest.raises(ConfigError, match="queue_bytes must be >= 1"):
        AgentConfig(queue_bytes=0).validate()
