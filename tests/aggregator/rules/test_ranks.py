"""RankDivergence by checksum: replicas compared bitwise, the odd rank out named by majority, the first tensor
in forward order; the sum-of-squares comparison where a rank sent no checksum (agents before it)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.rules.catalogue import RuleEngine, load_rules
from gradwatch.aggregator.state import State
from gradwatch.settings import ConfigError
from gradwatch.v1 import run_pb2

RUN = "ddp"
SAME = 0x0123_4567_89AB_CDEF  # every replica's checksum unless a table says otherwise


class Ranks:
    """A State and RuleEngine fed with the reports of `world` ranks whose replicated tensors carry checksums."""

    def __init__(self, build, world: int, sharded: tuple[str, ...] = (), rules: str | None = None):
        self.build, self.world = build, world
        self.config = dataclasses.replace(AggregatorConfig(), keep_firing_s=0.0, rules=rules)
        self.counters = Counters()
        self.state = State(self.config, self.counters)
        self.engine = RuleEngine(self.config, self.counters)
        self.alerts = []
        for rank in range(world):
            reg = build.registration(run=RUN, rank=rank)
            reg.world_size = world
            for t in reg.tensors:
                if t.kind == run_pb2.TENSOR_KIND_ACTIVATION:
                    t.partition = run_pb2.PARTITION_PER_RANK
                else:
                    t.partition = (run_pb2.PARTITION_SHARDED if t.module_path in sharded
                                   else run_pb2.PARTITION_REPLICATED)
            self.state.register(RUN, reg)

    def step(self, step: int, checksums=lambda rank: {}, without=(), ranks=None, kw_of=lambda rank: {},
             activations=(), **kw):
        """checksums(rank): {(layer, kind): checksum} where a rank's copy differs; ranks in `without` send
        none (an older agent); `ranks`: those that report (all); kw_of(rank): that rank's report arguments;
        ranks in `activations` make their activations differ."""
        for rank in range(self.world) if ranks is None else ranks:
            report = self.build.report(step, run=RUN, rank=rank, **{**kw, **kw_of(rank)})
            odd = checksums(rank)
            for s in report.tensors:
                layer, slot = self.build.layers[s.tensor_id // 10], s.tensor_id % 10
                kind = {1: "parameter", 2: "gradient"}.get(slot)
                if kind is not None and rank not in without:
                    s.checksum = odd.get((layer, kind), SAME)
            for s in report.tensors if rank in activations else ():
                if s.tensor_id % 10 == 3:  # per-rank tensors are never compared, checksum or not
                    s.sum_squares, s.checksum = 9.0 * (rank + 1), rank
            self.alerts += self.engine.evaluate(self.state.apply(RUN, report))
            self.close()

    def close(self):
        for joined in self.state.take_closed():
            self.alerts += self.engine.evaluate_joined(joined)

    def fired(self):
        return [a for a in self.alerts if a.rule == "RankDivergence" and a.status == "firing"]


def test_one_odd_checksum_fires_on_the_first_step_naming_the_rank_off_the_majority(build):
    """A sign flip: the sums of squares agree, the bits do not."""
    c = Ranks(build, world=3)
    c.step(0)
    assert c.fired() == []
    c.step(1, checksums=lambda r: {("fc1", "parameter"): SAME ^ 1 << 63} if r == 1 else {})
    (alert,) = c.fired()
    assert (alert.step, alert.rank, alert.layer, alert.tensor) == (1, 1, "fc1", "fc1.weight")
    assert (alert.value, alert.threshold, alert.severity) == (1.0, 0.0, "critical")
    assert alert.summary.startswith("Rank 1 disagrees with its 2 peers at step 1: parameter fc1.weight differs "
                                    "bitwise from the copy that 2 of 3 ranks hold")
    assert "silent data corruption on rank 1 (run ddp)" in alert.summary
    for step in range(2, 5):
        c.step(step)
    resolved = [a for a in c.alerts if a.status == "resolved"]
    assert len(resolved) == 1 and resolved[0].rank == 1 and resolved[0].step == 4


@pytest.mark.parametrize(("odd", "named"), [
    ({("head", "gradient"), ("fc1", "gradient"), ("fc2", "parameter")}, "fc1.weight.grad"),  # forward order
    ({("fc2", "gradient"), ("fc2", "parameter")}, "fc2.weight"),  # one layer: the parameter first
])
def test_the_first_mismatching_tensor_in_forward_order_is_named(build, odd, named):
    c = Ranks(build, world=4)
    c.step(0, checksums=lambda r: dict.fromkeys(odd, 7) if r == 2 else {})
    (alert,) = c.fired()
    assert (alert.rank, alert.tensor) == (2, named)


def test_two_ranks_name_both_and_the_alert_the_higher(build):
    c = Ranks(build, world=2)
    c.step(0, checksums=lambda r: {("embed", "gradient"): 42} if r == 0 else {})
    (alert,) = c.fired()
    assert (alert.rank, alert.tensor, alert.value) == (1, "embed.weight.grad", 1.0)
    assert alert.summary.startswith("Ranks 0 and 1 disagree at step 0: gradient embed.weight.grad differs bitwise "
                                    "between them")
    assert "on rank 0 or rank 1 (run ddp)" in alert.summary


@pytest.mark.parametrize(("world", "odd", "rank", "start"), [
    (5, {1: 9, 3: 9}, 1, "Ranks 1 and 3 disagree with the majority at step 0: gradient fc2.weight.grad differs "
                         "bitwise from the copy that 3 of 5 ranks hold"),
    (4, {1: 9, 3: 9}, 3, "Ranks 0, 1, 2 and 3 disagree at step 0: gradient fc2.weight.grad differs bitwise among them "
                         "with no majority (the most common copy on 2 of 4 ranks)"),
    (3, {1: 8, 2: 9}, 2, "Ranks 0, 1 and 2 disagree at step 0"),
])
def test_several_odd_ranks_and_no_majority(build, world, odd, rank, start):
    c = Ranks(build, world=world)
    c.step(0, checksums=lambda r: {("fc2", "gradient"): odd[r]} if r in odd else {})
    (alert,) = c.fired()
    assert alert.rank == rank and alert.summary.startswith(start), alert.summary


@pytest.mark.parametrize("case", ["identical", "sharded tensors differ", "activations differ",
                                  "float noise in sums of squares", "a rank missing", "a kind not compared"])
def test_checksums_stay_quiet_where_replicas_agree(build, tmp_path, case):
    rules = tmp_path / "rules.toml"
    rules.write_text('[RankDivergence]\nkinds = ["gradient"]\n')
    c = Ranks(build, world=3, sharded=("fc1",) if case == "sharded tensors differ" else (),
              rules=str(rules) if case == "a kind not compared" else None)
    odd = {"sharded tensors differ": {("fc1", "gradient"): 1, ("fc1", "parameter"): 2},
           "a kind not compared": {("fc1", "parameter"): 3}}.get(case, {})
    for step in range(6):
        kw = {}
        if case == "float noise in sums of squares":  # the checksums say the bits agree
            kw["grad"] = 1.0 + 1e-9 * step
        report_ranks = range(2) if case == "a rank missing" else range(3)
        c.step(step, checksums=lambda r: odd if r == 1 else {}, ranks=report_ranks,
               activations=(1, 2) if case == "activations differ" else (), **kw)
    if case == "a rank missing":
        c.state.expire_joins(now=time.monotonic() + 60)
        c.close()
    assert c.fired() == []
    assert c.counters.get("steps_joined") >= 5


def test_checksum_window_is_configurable(build, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[RankDivergence]\nchecksum_window = 2\n")
    c = Ranks(build, world=3, rules=str(rules))
    flip = {("head", "parameter"): 1}
    c.step(0, checksums=lambda r: flip if r == 2 else {})
    assert c.fired() == []
    c.step(1, checksums=lambda r: flip if r == 2 else {})
    (alert,) = c.fired()
    assert (alert.step, alert.rank, alert.tensor) == (1, 2, "head.weight")


def test_checksum_window_below_one_is_refused(tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[RankDivergence]\nchecksum_window = 0\n")
    with pytest.raises(ConfigError, match="checksum_window: expected an integer >= 1"):
        load_rules(AggregatorConfig(rules=str(rules)))


def test_a_rank_without_checksums_falls_back_to_sums_of_squares(build):
    """An older agent on rank 2: its replicas are compared by sum of squares, with rel_tol and a window of 2."""
    c = Ranks(build, world=3)
    bigger = {"param": {"embed": 11.0, "fc1": 10.0, "fc2": 10.0, "head": 10.0}}  # 10 elsewhere, as the others
    for step in range(2):
        c.step(step, without={2}, kw_of=lambda r: bigger if r == 1 else {})
    (alert,) = c.fired()
    assert (alert.step, alert.rank, alert.tensor) == (1, 1, "embed.weight")
    assert alert.value == pytest.approx(0.21) and alert.threshold == 1e-4
    assert alert.summary.startswith("Rank 1 disagrees with its 2 peers at step 1: the sum of squares of parameter "
                                    "embed.weight is 1.2e+02 against a median of 1e+02 over 3 ranks")


def test_a_sign_flip_needs_checksums_on_every_rank(build):
    """What the sums of squares cannot see: rank 1's bits differ, its sum of squares does not; rank 2 sent no
    checksum, so the tensor is judged by sums of squares, and stays unseen."""
    c = Ranks(build, world=3)
    for step in range(4):
        c.step(step, without={2}, checksums=lambda r: {("fc1", "parameter"): 1} if r == 1 else {})
    assert c.fired() == []
    c = Ranks(build, world=3)
    c.step(0, checksums=lambda r: {("fc1", "parameter"): 1} if r == 1 else {})
    assert [a.rank for a in c.fired()] == [1]
