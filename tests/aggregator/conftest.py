"""Aggregator fixtures: protobuf builders for registrations and reports, a publisher that writes them to
Redis the way the collector does, and aggregators on a fresh metrics registry per test."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from prometheus_client import CollectorRegistry

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.consumer import Aggregator
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.ruleset import RuleEngine
from gradwatch.aggregator.state import State
from gradwatch.collector.streams import FIELD_REGISTRATION, FIELD_REPORT, RUNS_KEY, registrations_key, reports_key
from gradwatch.v1 import report_pb2, run_pb2

# A four-layer model in forward order: each layer has a weight, its gradient and its output.
LAYERS = ("embed", "fc1", "fc2", "head")
KINDS = {"parameter": run_pb2.TENSOR_KIND_PARAMETER, "gradient": run_pb2.TENSOR_KIND_GRADIENT,
         "activation": run_pb2.TENSOR_KIND_ACTIVATION}
KIND_SLOT = {"parameter": 1, "gradient": 2, "activation": 3, "units": 4}
# "units": a ReLU layer's per-unit activity counts (agent/units.py), an ACTIVATION named "<layer>:units";
# registered by Scenario, in its reports only where a table gives their fields.
T0 = 1_700_000_000.0


class Build:
    """Registrations and reports as an agent would encode them."""

    layers = LAYERS

    @staticmethod
    def tensor_id(layer: str, kind: str) -> int:
        return 10 * LAYERS.index(layer) + KIND_SLOT[kind]

    @staticmethod
    def tensor_name(layer: str, kind: str) -> str:
        return {"parameter": f"{layer}.weight", "gradient": f"{layer}.weight.grad", "activation": f"{layer}.out",
                "units": f"{layer}:units"}[kind]

    def registration(self, run: str = "demo", rank: int = 0, start_s: float = T0,
                     units: bool = False) -> run_pb2.RunRegistration:
        reg = run_pb2.RunRegistration(run_id=run, rank=rank, world_size=1, agent_version="test", host="test-host")
        reg.start_time.FromNanoseconds(int(start_s * 1e9))
        for order, layer in enumerate(LAYERS):
            for kind, value in KINDS.items():
                reg.tensors.add(id=self.tensor_id(layer, kind), name=self.tensor_name(layer, kind), kind=value,
                                shape=[16, 16], dtype="float32", module_path=layer, order=order)
            if units:
                reg.tensors.add(id=self.tensor_id(layer, "units"), name=self.tensor_name(layer, "units"),
                                kind=run_pb2.TENSOR_KIND_ACTIVATION, dtype="float32", module_path=layer, order=order)
        return reg

    def report(self, step: int, *, run: str = "demo", rank: int = 0, seq: int | None = None,
               grad: float | dict[str, float] = 1.0, param: float | dict[str, float] = 10.0,
               loss: float | None = 0.5, lr: float = 1e-3, nonfinite: dict[tuple[str, str], int] | None = None,
               phase: int = report_pb2.PHASE_TRAIN, t: float | None = None) -> report_pb2.StepReport:
        """grad/param: a norm for every layer, or per layer; nonfinite: {(layer, kind): NaN count}."""
        r = report_pb2.StepReport(run_id=run, rank=rank, step=step, sequence=step + 1 if seq is None else seq,
                                  phase=phase, learning_rates=[lr, lr / 10])
        r.capture_time.FromNanoseconds(int((T0 + step * 0.1 if t is None else t) * 1e9))
        if loss is not None:
            r.loss = loss
        nonfinite = nonfinite or {}
        for layer in LAYERS:
            for kind, norms in (("parameter", param), ("gradient", grad), ("activation", 3.0)):
                norm = norms.get(layer, 1.0) if isinstance(norms, dict) else norms
                # Parameters train: their sum moves a little every step (UnchangedTensor stays quiet).
                r.tensors.add(tensor_id=self.tensor_id(layer, kind), count=256,
                              sum=1e-3 * step if kind == "parameter" else 0.0, sum_squares=norm * norm,
                              min=-norm, max=norm, nan_count=nonfinite.get((layer, kind), 0))
        return r


class Publisher:
    """Writes to Redis exactly what the collector writes (see gradwatch.collector.streams)."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def registration(self, reg: run_pb2.RunRegistration, stream: bool = True, hash_: bool = True) -> None:
        raw = reg.SerializeToString()
        if hash_:
            self.client.hset(registrations_key(reg.run_id), str(reg.rank), raw)
        if stream:
            self.client.xadd(reports_key(reg.run_id), {FIELD_REGISTRATION: raw})
        self.client.zadd(RUNS_KEY, {reg.run_id: time.time()})

    def report(self, report: report_pb2.StepReport) -> bytes:
        entry_id = self.client.xadd(reports_key(report.run_id), {FIELD_REPORT: report.SerializeToString()})
        self.client.zadd(RUNS_KEY, {report.run_id: time.time()})
        return entry_id

    def raw(self, run: str, fields: dict) -> bytes:
        entry_id = self.client.xadd(reports_key(run), fields)
        self.client.zadd(RUNS_KEY, {run: time.time()})
        return entry_id


@pytest.fixture
def build() -> Build:
    return Build()


@pytest.fixture
def publish(redis_client) -> Publisher:
    return Publisher(redis_client)


@pytest.fixture
def agg_config(redis_url) -> AggregatorConfig:
    """Fast loops for tests: discover and claim on every run_once()."""
    return AggregatorConfig(redis_url=redis_url, metrics_listen="127.0.0.1:0", consumer="test-aggregator",
                            block_ms=20, discover_interval_s=0.0, claim_interval_s=0.0)


@pytest.fixture
def make_aggregator(agg_config) -> Iterator[Callable[..., Aggregator]]:
    """make_aggregator(**config overrides) -> an Aggregator on its own fresh CollectorRegistry."""
    made: list[Aggregator] = []

    def make(**overrides) -> Aggregator:
        agg = Aggregator(dataclasses.replace(agg_config, **overrides), CollectorRegistry())
        made.append(agg)
        return agg

    yield make
    for agg in made:
        agg.stop(2.0)


def drain(agg: Aggregator, max_rounds: int = 20) -> int:
    """run_once() until nothing is left to read; returns the entries handled."""
    total = 0
    for _ in range(max_rounds):
        n = agg.run_once()
        total += n
        if n == 0:
            return total
    return total


@pytest.fixture
def run_all() -> Callable[[Aggregator], int]:
    return drain


def alerts_of(reports, rule: str, registration: run_pb2.RunRegistration | None = None,
              config: AggregatorConfig | None = None) -> list:
    """Applies the reports (numbered from 1) to a fresh State and RuleEngine, every rule on and
    keep_firing_s=0 unless `config` says otherwise; the alerts of `rule`."""
    config = config or AggregatorConfig(keep_firing_s=0)
    state, engine = State(config, Counters()), RuleEngine(config)
    if registration is not None:
        state.register("demo", registration)
    alerts = []
    for seq, r in enumerate(reports, 1):
        r.sequence = seq
        alerts.extend(a for a in engine.evaluate(state.apply("demo", r)) if a.rule == rule)
    return alerts


@pytest.fixture
def feed() -> Callable[..., list]:
    return alerts_of


def healthy(step: int, layer: str, kind: str) -> dict:
    """Summary fields of a healthily training layer: weights of std 0.25 (gain 1 at fan_in 16) that
    move every step, gradients of RMS 1e-2, ReLU outputs half zero."""
    i = LAYERS.index(layer)
    if kind == "parameter":
        return dict(count=256, sum=0.5 * math.sin(step + i), sum_squares=256 * 0.25 ** 2, min=-0.6, max=0.6)
    if kind == "gradient":
        rms = 1e-2 * (1 + 0.2 * math.sin(0.7 * step + i))
        return dict(count=256, sum=0.0, sum_squares=256 * rms ** 2, min=-5 * rms, max=5 * rms)
    if kind == "units":
        return dict(count=None)
    return dict(count=256, zero_count=128, sum=128.0, sum_squares=256.0, min=0.0, max=3.0)


class Scenario:
    """Reports of the four-layer model with any summary fields per (layer, kind) and step, applied to a
    fresh State and RuleEngine; returns the alert transitions."""

    def __init__(self, build: Build):
        self.build = build

    def report(self, step: int, tensors, loss, lr) -> report_pb2.StepReport:
        r = report_pb2.StepReport(run_id="demo", rank=0, step=step, sequence=step + 1, phase=report_pb2.PHASE_TRAIN,
                                  learning_rates=[lr(step)])
        r.capture_time.FromNanoseconds(int((T0 + step * 0.1) * 1e9))
        value = loss(step)
        if value is not None:
            r.loss = value
        for layer in LAYERS:
            for kind in (*KINDS, "units"):
                fields = healthy(step, layer, kind)
                fields.update((tensors(step, layer, kind) if tensors else None) or {})
                if fields.get("count") is not None:  # count=None: the tensor is not in this report
                    r.tensors.add(tensor_id=Build.tensor_id(layer, kind), **fields)
        return r

    def __call__(self, steps: int, tensors=None, loss=lambda step: 0.5, lr=lambda step: 1e-3, rule: str | None = None,
                 config: AggregatorConfig | None = None, engine=None, start: int = 0) -> list[tuple]:

        config = config or AggregatorConfig(keep_firing_s=0)
        state = State(config, Counters())
        self.engine = engine or RuleEngine(config)
        state.register("demo", self.build.registration(units=True))
        self.alerts = []
        for step in range(start, start + steps):
            view = state.apply("demo", self.report(step, tensors, loss, lr))
            self.alerts.extend(self.engine.evaluate(view))
        return [(a.step, a.status, a.rule, a.layer) for a in self.alerts if rule is None or a.rule == rule]


@pytest.fixture
def scenario(build) -> Scenario:
    return Scenario(build)


class Receiver:
    """A small real HTTP server on 127.0.0.1 standing in for Alertmanager or a webhook: records each POST
    to `path` (any path when None) as (path, headers, JSON body) and answers with the queued statuses
    (an int, or (status, headers)), then `ok`; other paths get 404. `release.clear()` makes it hang."""

    def __init__(self, path: str | None = None, ok: int = 204, url_path: str = ""):
        self.posts: list[tuple[str, dict, object]] = []
        self.statuses: list = []
        self.release = threading.Event()
        self.release.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.release.wait(5)
                queued = receiver.statuses.pop(0) if receiver.statuses else ok
                status, headers = queued if isinstance(queued, tuple) else (queued, {})
                if path is not None and self.path != path:
                    status, headers = 404, {}
                if status < 300:
                    receiver.posts.append((self.path, dict(self.headers), json.loads(raw)))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="fake-receiver",
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}{url_path}"

    def bodies(self) -> list:
        return [body for _, _, body in self.posts]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_receiver() -> Iterator[Callable[..., Receiver]]:
    """http_receiver(path=None, ok=204, url_path="") -> a started Receiver, closed after the test."""
    made: list[Receiver] = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()
