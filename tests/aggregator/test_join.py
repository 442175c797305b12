"""The cross-rank step join (complete, watermark, timeout, late reports, exact merge by partition) and
RankDivergence on the steps it closes."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.http.api import run_detail
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.state import State
from gradwatch.streams import ALERTS_KEY
from gradwatch.v1 import run_pb2

RUN = "ddp"


def registration(build, rank: int, world: int, sharded: tuple[str, ...] = ()):
    reg = build.registration(run=RUN, rank=rank)
    reg.world_size = world
    for t in reg.tensors:
        if t.kind == run_pb2.TENSOR_KIND_ACTIVATION:
            t.partition = run_pb2.PARTITION_PER_RANK
        else:
            t.partition = run_pb2.PARTITION_SHARDED if t.module_path in sharded else run_pb2.PARTITION_REPLICATED
    return reg


class Cluster:
    """A State and RuleEngine fed with the reports of `world` ranks."""

    def __init__(self, build, world: int, sharded: tuple[str, ...] = (), **config):
        self.build = build
        self.config = dataclasses.replace(AggregatorConfig(), keep_firing_s=0.0, **config)
        self.counters = Counters()
        self.state = State(self.config, self.counters)
        self.engine = RuleEngine(self.config, self.counters)
        self.alerts = []
        for rank in range(world):
            self.state.register(RUN, registration(build, rank, world, sharded))

    def report(self, step: int, rank: int, **kw):
        return self.apply(self.build.report(step, run=RUN, rank=rank, **kw))

    def apply(self, report):
        self.alerts += self.engine.evaluate(self.state.apply(RUN, report))
        return self.closed()

    def closed(self):
        joined = self.state.take_closed()
        for j in joined:
            self.alerts += self.engine.evaluate_joined(j)
        return joined

    def step(self, step: int, world: int, grad_of=lambda rank: 1.0, **kw):
        out = []
        for rank in range(world):
            out += self.report(step, rank, grad=grad_of(rank), **kw)
        return out

    def fired(self, rule: str = "RankDivergence"):
        return [a for a in self.alerts if a.rule == rule and a.status == "firing"]


def test_a_step_closes_when_every_rank_reported(build):
    c = Cluster(build, world=3)
    assert c.report(0, 0) == [] and c.report(0, 1) == []
    (joined,) = c.report(0, 2)
    assert joined.step == 0 and joined.reason == "complete" and joined.missing == ()
    assert sorted(joined.parts) == [0, 1, 2]
    # replicated gradients count once: four layers of norm 1 -> sqrt(4), not sqrt(12)
    assert joined.global_grad_norm == pytest.approx(2.0)
    assert c.state.views()[0].joined is joined
    assert c.counters.get("steps_joined") == 1 and c.counters.get("steps_incomplete") == 0


def test_sharded_gradients_add_over_ranks(build):
    c = Cluster(build, world=2, sharded=("fc1", "fc2"))
    c.report(0, 0, grad={"fc1": 3.0, "fc2": 0.0})
    (joined,) = c.report(0, 1, grad={"fc1": 4.0, "fc2": 0.0})
    # embed and head replicated (1 each, counted once); fc1 shards 3 and 4 on the two ranks
    assert joined.global_grad_norm == pytest.approx(math.sqrt(1 + 1 + 9 + 16))
    assert c.state.runs[RUN].grad_norm == pytest.approx(math.sqrt(27))
    assert joined.parts[0].grad_norm == pytest.approx(math.sqrt(1 + 1 + 9))


def test_watermark_closes_steps_a_rank_skipped(build):
    """Rank 0 in burst mode reports every step, rank 1 every 5th: steps 1-4 close once rank 1 passes them."""
    c = Cluster(build, world=2)
    c.step(0, 2)
    for step in range(1, 6):
        assert c.report(step, 0) == []
    closed = c.report(5, 1)
    assert [(j.step, j.reason, j.missing) for j in closed] == [
        (1, "watermark", (1,)), (2, "watermark", (1,)), (3, "watermark", (1,)), (4, "watermark", (1,)),
        (5, "complete", ())]
    assert c.counters.get("steps_incomplete") == 4


def test_a_dead_rank_times_out_and_its_late_report_is_counted(build):
    c = Cluster(build, world=2, join_timeout_s=30.0)
    c.report(0, 0)
    c.state.expire_joins(now=time.monotonic() + 10)
    assert c.closed() == []
    c.state.expire_joins(now=time.monotonic() + 31)
    (joined,) = c.closed()
    assert joined.reason == "timeout" and joined.missing == (1,)
    c.report(0, 1)  # rank 1 was only slow: applied as usual, not joined
    assert c.counters.get("late_reports") == 1 and c.closed() == []
    assert c.counters.get("reports") == 2


def test_single_rank_runs_are_not_joined(build):
    c = Cluster(build, world=1)
    assert c.report(0, 0) == [] and c.state.runs[RUN].join is None


def test_open_steps_are_bounded(build):
    c = Cluster(build, world=2)
    closed = []
    for step in range(100):
        closed += c.report(step, 0)  # rank 1 never reports; no watermark without it
    assert len(c.state.runs[RUN].join.open) == 64
    assert [j.reason for j in closed] == ["overflow"] * 36


# ---- RankDivergence ---------------------------------------------------------------------------------------


def test_rank_divergence_names_the_rank_and_the_first_tensor(build):
    c = Cluster(build, world=4)
    bad = {"embed": 1.0, "fc1": 1.5, "fc2": 1.0, "head": 2.0}  # rank 2 disagrees on fc1 and, more, on head
    c.step(0, 4)
    c.step(1, 4, grad_of=lambda r: bad if r == 2 else 1.0)
    assert c.fired() == []  # one step is not yet an incident (window 2)
    c.step(2, 4, grad_of=lambda r: bad if r == 2 else 1.0)
    (alert,) = c.fired()
    assert (alert.rank, alert.layer, alert.tensor, alert.step) == (2, "head", "head.weight.grad", 2)
    assert alert.severity == "critical" and alert.value == pytest.approx(3.0)
    assert alert.summary.startswith("Rank 2 disagrees with its 3 peers at step 2: the sum of squares of gradient "
                                    "head.weight.grad is 4 against a median of 1 over 4 ranks")
    for step in range(3, 6):
        c.step(step, 4)
    resolved = [a for a in c.alerts if a.status == "resolved"]
    assert len(resolved) == 1 and resolved[0].rank == 2 and resolved[0].step == 5


def test_rank_divergence_with_two_ranks_names_the_higher(build):
    c = Cluster(build, world=2)
    for step in range(2):
        c.step(step, 2, grad_of=lambda r: {"fc2": 1.0 + r})
    (alert,) = c.fired()
    assert alert.rank == 1 and alert.layer == "fc2" and alert.summary.startswith("Ranks 0 and 1 disagree")


def test_nan_on_one_rank_is_a_divergence(build):
    c = Cluster(build, world=3)
    for step in range(2):
        c.step(step, 3, grad_of=lambda r: {"fc1": math.nan} if r == 1 else 1.0)
    (alert,) = c.fired()
    assert alert.rank == 1 and alert.layer == "fc1" and math.isinf(alert.value)


@pytest.mark.parametrize("case", ["losses differ", "activations differ", "sharded shards differ",
                                  "float noise below tolerance", "one odd step", "a rank missing"])
def test_rank_divergence_stays_quiet(build, case):
    sharded = ("fc1",) if case == "sharded shards differ" else ()
    c = Cluster(build, world=4, sharded=sharded)
    for step in range(10):
        for rank in range(4):
            if case == "a rank missing" and rank == 3:
                continue
            kw = {}
            if case == "losses differ":
                kw["loss"] = 0.5 + rank
            elif case == "sharded shards differ":
                kw["grad"] = {"fc1": 1.0 + rank}
            elif case == "float noise below tolerance":
                kw["grad"] = 1.0 + rank * 1e-7
            elif case == "one odd step" and step == 4 and rank == 1:
                kw["grad"] = 5.0
            report = build.report(step, run=RUN, rank=rank, **kw)
            if case == "activations differ":  # per-rank tensors (forward outputs) are never compared
                for t in report.tensors:
                    if t.tensor_id == build.tensor_id("fc2", "activation"):
                        t.sum_squares = 9.0 * (rank + 1)
            c.apply(report)
    if case == "a rank missing":
        c.state.expire_joins(now=time.monotonic() + 60)
        c.closed()
    assert c.fired() == []
    assert c.counters.get("steps_joined") >= 9


def test_rank_divergence_through_the_consumer(make_aggregator, build, publish, redis_client, run_all):
    for rank in range(2):
        publish.registration(registration(build, rank, 2))
    for step in range(3):
        for rank in range(2):
            publish.report(build.report(step, run=RUN, rank=rank, grad={"embed": 1.0 + rank}))
    agg = make_aggregator()
    run_all(agg)
    alerts = [a for _, f in redis_client.xrange(ALERTS_KEY) if b"RankDivergence" in (a := f[b"alert"])]
    assert len(alerts) == 1 and b'"layer":"embed"' in alerts[0] and b'"rank":1' in alerts[0]
    assert agg.counters.get("steps_joined") == 3
    run = agg.view().runs[0]
    assert run.joined.step == 2 and run.world_size == 2
    detail = run_detail(run, [])["joined"]
    assert detail["step"] == 2 and detail["missing_ranks"] == [] and detail["reason"] == "complete"
    assert [r["rank"] for r in detail["ranks"]] == [0, 1]
    assert detail["ranks"][1]["grad_norm"] == pytest.approx(math.sqrt(4 + 3))
    assert detail["global_grad_norm"] == pytest.approx(2.0)  # replicated: rank 0's, counted once
