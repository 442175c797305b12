"""Fuzzing the Export RPC of a real collector process (`python -m gradwatch.collector`, real Redis).

For every input the collector answers OK (possibly a partial success) or refuses with INVALID_ARGUMENT,
RESOURCE_EXHAUSTED or UNAVAILABLE and a reason, never UNKNOWN or INTERNAL; afterwards it is still up and
serving, nothing is left in flight, its memory (RSS) has not grown without bound, and Redis holds a bounded
number of keys and stream entries.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.cli.processes import stop_process
from gradwatch.cli.redis_server import RedisServer, free_port
from gradwatch.streams import RUN_ID_RE, reports_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest, ExportResponse
from gradwatch.v1.report_pb2 import StepReport, TensorSummary
from gradwatch.v1.run_pb2 import HyperparameterValue, RunRegistration, TensorInfo

pytestmark = pytest.mark.e2e

EXPORT_METHOD = "/gradwatch.v1.IngestService/Export"
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_INFLIGHT_BYTES = 4 * MAX_MESSAGE_BYTES
STREAM_MAXLEN = 200
# XADD MAXLEN ~ trims whole stream nodes (100 entries each by default): a stream may run this far past MAXLEN.
STREAM_SLACK = 100
RSS_GROWTH_LIMIT_BYTES = 32 * 1024 * 1024  # measured: under 10 MiB
# Examples per test; the whole module stays well under 20 s.
EXAMPLES = {"random": 300, "truncated": 100, "oversized": 5, "shaped": 150}
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
FUZZ = settings(deadline=None, suppress_health_check=[  # each example is a network call, some are megabytes
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


@dataclass
class Target:
    proc: subprocess.Popen
    export: grpc.UnaryUnaryMultiCallable
    redis: redis.Redis
    metrics_url: str
    log_path: str
    baseline_rss: int = 0
    outcomes: Counter = field(default_factory=Counter)  # (test, outcome) -> count, printed at the end
    run_ids: set[str] = field(default_factory=set)  # valid run ids sent: the only ones that may create keys

    def send(self, request: bytes) -> ExportResponse | grpc.StatusCode:
        """Export `request`; the response, or the refusal's code after checking it is an allowed one."""
        try:
            response = self.export(request, timeout=20)
        except grpc.RpcError as err:
            assert self.proc.poll() is None, f"collector died: {self.log_tail()}"
            assert err.code() in REFUSALS, (err.code(), err.details(), self.log_tail())
            assert err.details(), f"{err.code()} without a reason"
            self.outcomes[_test_name(), err.code().name] += 1
            return err.code()
        self.outcomes[_test_name(), "OK_PARTIAL" if response.HasField("partial_success") else "OK"] += 1
        return response

    def note_run_ids(self, request: ExportRequest) -> None:
        for item in (*request.registrations, *request.reports):
            if RUN_ID_RE.match(item.run_id):
                self.run_ids.add(item.run_id)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def metric(self, sample: str) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.split()[-1])
        return 0.0

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]


def _test_name() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]


def _wait_listening(proc: subprocess.Popen, port: int, log_path: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log_path).read()[-2000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("collector did not start listening")


def valid_request(run: str = "fuzz-valid", sequence: int = 1) -> ExportRequest:
    return ExportRequest(
        registrations=[RunRegistration(run_id=run, world_size=1, tensors=[TensorInfo(id=0, name="w")])],
        reports=[StepReport(run_id=run, step=sequence, sequence=sequence,
                            tensors=[TensorSummary(tensor_id=0, count=4, sum=1.0, histogram=[4], histogram_offset=3)])])


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Target:
    tmp = tmp_path_factory.mktemp("fuzz")
    server = RedisServer(tmp / "redis", appendonly=False).start()
    port, metrics_port = free_port(), free_port()
    log_path = str(tmp / "collector.log")
    env = dict(os.environ, GRADWATCH_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
               GRADWATCH_MAX_INFLIGHT_BYTES=str(MAX_INFLIGHT_BYTES))
    env.pop("GRADWATCH_TOKEN", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradwatch.collector", "--listen", f"127.0.0.1:{port}", "--redis-url", server.url,
             "--metrics-listen", f"127.0.0.1:{metrics_port}", "--stream-maxlen", str(STREAM_MAXLEN),
             "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT, env=env)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    client = redis.Redis.from_url(server.url)
    try:
        _wait_listening(proc, port, log_path)
        export = channel.unary_unary(EXPORT_METHOD, request_serializer=None,
                                     response_deserializer=ExportResponse.FromString)
        target = Target(proc, export, client, f"http://127.0.0.1:{metrics_port}/metrics", log_path)
        # Warm up every path once (valid, malformed, oversized) so the baseline RSS includes its one-off costs.
        for sequence in range(1, 20):
            assert isinstance(target.send(valid_request(sequence=sequence).SerializeToString()), ExportResponse)
        target.send(b"\xff" * 100)
        target.send(bytes(MAX_MESSAGE_BYTES + 1))
        target.run_ids.add("fuzz-valid")
        target.baseline_rss = target.rss()
        yield target
    finally:
        channel.close()
        stop_process(proc)
        client.close()
        server.stop()
        if "target" in locals():  # shown with -s: how the inputs fared, per test
            print("\nfuzz outcomes:", *(f"{t} {o}: {n}" for (t, o), n in sorted(target.outcomes.items())), sep="\n  ")


# ---- strategies ------------------------------------------------------------------------------------------------

ints = st.integers
any_float = st.floats(allow_nan=True, allow_infinity=True)
float32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
uint32, uint64, int64 = ints(0, 2**32 - 1), ints(0, 2**64 - 1), ints(-(2**63), 2**63 - 1)
# Strings that could be ids or names, unicode included, and at the limits of max_string_bytes (1024).
text = st.one_of(st.text(max_size=40), st.sampled_from(["", "layer.0.weight", "a" * 1024, "a" * 1025, "é" * 513]))
# Far past every limit, sometimes past max_message_bytes too (1-4 bytes a character). Used sparingly: each
# oversized request costs gRPC ~0.1 s to refuse.
huge_text = st.tuples(st.sampled_from("aé€😀"), ints(1_000, 400_000)).map(lambda t: t[0] * t[1])
run_ids = st.one_of(st.sampled_from(["fuzz-a", "fuzz-b", "run:1.x_y-z", "x" * 128, "x" * 129]),
                    st.from_regex(RUN_ID_RE, fullmatch=True), text, huge_text)


@st.composite
def summaries(draw) -> list[TensorSummary]:
    """A few random summaries, or thousands built from one random template (cheap to draw)."""
    def one(tensor_id: int, buckets: int) -> TensorSummary:
        return TensorSummary(
            tensor_id=tensor_id, count=draw(uint64), nan_count=draw(uint64), inf_count=draw(uint64),
            zero_count=draw(uint64), sum=draw(any_float), sum_squares=draw(any_float), min=draw(float32),
            max=draw(float32), histogram=draw(st.lists(uint64, max_size=buckets)),
            histogram_offset=draw(st.one_of(ints(0, 70), uint32)))

    if draw(st.booleans()):
        return [one(draw(uint32), 70) for _ in range(draw(ints(0, 4)))]
    template = one(0, 8)
    first, n = draw(uint32), draw(ints(1_000, 5_000))
    out = []
    for i in range(n):
        summary = TensorSummary()
        summary.CopyFrom(template)
        summary.tensor_id = (first + i) % 2**32
        out.append(summary)
    return out


@st.composite
def reports(draw) -> StepReport:
    report = StepReport(
        run_id=draw(run_ids), rank=draw(uint32), step=draw(int64), sequence=draw(uint64),
        step_seconds=draw(any_float), phase=draw(ints(0, 5)), learning_rates=draw(st.lists(any_float, max_size=4)),
        scalars=draw(st.dictionaries(st.one_of(text, huge_text), any_float, max_size=3)), tensors=draw(summaries()),
        dropped_reports=draw(uint64))
    if draw(st.booleans()):
        report.loss = draw(any_float)
    if draw(st.booleans()):
        report.capture_time.FromNanoseconds(draw(ints(0, 2**62)))
    return report


hyperparameters = st.one_of(
    any_float.map(lambda v: HyperparameterValue(number=v)), int64.map(lambda v: HyperparameterValue(integer=v)),
    text.map(lambda v: HyperparameterValue(text=v)), st.booleans().map(lambda v: HyperparameterValue(flag=v)))


@st.composite
def registrations(draw) -> RunRegistration:
    return RunRegistration(
        run_id=draw(run_ids), rank=draw(uint32), world_size=draw(uint32),
        hyperparameters=draw(st.dictionaries(text, hyperparameters, max_size=5)),
        labels=draw(st.dictionaries(text, text, max_size=3)),
        tensors=[TensorInfo(id=draw(uint32), name=draw(text), kind=draw(ints(0, 9)),
                            shape=draw(st.lists(int64, max_size=4)), dtype=draw(text), module_path=draw(text))
                 for _ in range(draw(ints(0, 4)))],
        agent_version=draw(text), host=draw(text))


export_requests = st.builds(lambda regs, reps: ExportRequest(registrations=regs, reports=reps),
                            st.lists(registrations(), max_size=2), st.lists(reports(), max_size=3))


# ---- the fuzz tests --------------------------------------------------------------------------------------------

@settings(FUZZ, max_examples=EXAMPLES["random"])
@given(data=st.one_of(st.binary(max_size=2048),
                      # Bytes that start like an ExportRequest field, so framing errors deeper in are reached too.
                      st.tuples(st.sampled_from([b"\x0a", b"\x12", b"\x0b", b"\x13", b"\x08"]),
                                st.binary(max_size=512)).map(b"".join)))
def test_random_bytes(target, data):
    target.send(data)


@settings(FUZZ, max_examples=EXAMPLES["truncated"])
@given(request=export_requests, cut=st.floats(0, 1, exclude_max=True))
def test_truncated_valid_requests(target, request, cut):
    raw = request.SerializeToString()
    target.note_run_ids(request)
    target.send(raw[:int(len(raw) * cut)])


@settings(FUZZ, max_examples=EXAMPLES["oversized"])
@given(size=ints(MAX_MESSAGE_BYTES + 1, 3 * MAX_MESSAGE_BYTES), shape=st.sampled_from(["zeros", "report", "random"]))
def test_oversized_requests_are_resource_exhausted(target, size, shape):
    if shape == "zeros":
        raw = bytes(size)
    elif shape == "report":  # a well-formed request, just too big
        raw = ExportRequest(reports=[StepReport(run_id="fuzz-a", sequence=1, scalars={"x" * size: 1.0})]
                            ).SerializeToString()
    else:
        raw = os.urandom(size)
    assert target.send(raw) is grpc.StatusCode.RESOURCE_EXHAUSTED


@settings(FUZZ, max_examples=EXAMPLES["shaped"])
@given(request=export_requests)
def test_valid_shaped_requests_with_random_values(target, request):
    target.note_run_ids(request)
    outcome = target.send(request.SerializeToString())
    if request.ByteSize() > MAX_MESSAGE_BYTES:
        assert outcome is grpc.StatusCode.RESOURCE_EXHAUSTED
        return
    # Within the size limit a well-formed request is never refused whole: bad items are a partial success.
    assert isinstance(outcome, ExportResponse), outcome
    partial = outcome.partial_success
    assert 0 <= partial.rejected_reports <= len(request.reports)
    assert 0 <= partial.rejected_registrations <= len(request.registrations)
    assert bool(partial.error_message) == bool(partial.rejected_reports or partial.rejected_registrations)


# ---- afterwards: still serving, nothing stuck, bounded ---------------------------------------------------------

def test_after_the_fuzz_the_collector_serves_and_stays_bounded(target):
    assert target.proc.poll() is None, target.log_tail()
    response = target.send(valid_request(run="fuzz-after").SerializeToString())
    assert isinstance(response, ExportResponse) and not response.HasField("partial_success")
    assert target.redis.xlen(reports_key("fuzz-after")) == 2  # its registration and its report
    target.run_ids.add("fuzz-after")

    assert target.metric("gradwatch_collector_inflight_bytes") == 0
    assert target.metric('gradwatch_collector_requests_total{code="INTERNAL"}') == 0
    assert "Export failed unexpectedly" not in target.log_tail()

    growth = target.rss() - target.baseline_rss
    print(f"\ncollector RSS {target.baseline_rss / 2**20:.1f} MiB -> +{growth / 2**20:.1f} MiB after the fuzz")
    assert growth < RSS_GROWTH_LIMIT_BYTES, f"collector RSS grew by {growth / 2**20:.1f} MiB"

    # Keys only for valid run ids (a stream and a registrations hash each) plus the runs index.
    keys = target.redis.dbsize()
    assert keys <= 2 * len(target.run_ids) + 1, (keys, len(target.run_ids))
    for key in target.redis.scan_iter("gradwatch:{*}:reports"):
        assert target.redis.xlen(key) <= STREAM_MAXLEN + STREAM_SLACK, key
