"""One picture of a multi-rank step (aggregator/merge.py): summaries merge by partition into the summary of
the whole tensor, every per-layer figure of a multi-rank run comes from joined, merged steps (never one
rank's shard, never a mix of steps), rules judge the merge, and NaN/Inf read as NaN/Inf, never 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.http.api import run_detail
from gradwatch.aggregator.http.metrics import AggregatorCollector, AggregatorView
from gradwatch.aggregator.http.views import history_rows
from gradwatch.aggregator.merge import add, merge_tensors
from gradwatch.aggregator.report import TensorMeta
from gradwatch.aggregator.state import State
from gradwatch.stats import HIST_BUCKETS, HIST_MIN_EXPONENT
from gradwatch.v1 import report_pb2, run_pb2
from tests.aggregator.test_join import RUN, Cluster

SHARDED, REPLICATED, PER_RANK = run_pb2.PARTITION_SHARDED, run_pb2.PARTITION_REPLICATED, run_pb2.PARTITION_PER_RANK


def summary(x: np.ndarray, tensor_id: int = 1) -> report_pb2.TensorSummary:
    """What the agent sends for x, computed here with numpy: statistics over the finite values, NaN/Inf counted."""
    finite = x[np.isfinite(x)].astype(np.float64)  # the agent accumulates in float64
    nonzero = np.abs(finite[finite != 0])
    buckets = np.clip(np.floor(np.log2(nonzero)).astype(int) - HIST_MIN_EXPONENT, 0, HIST_BUCKETS - 1)
    counts = np.bincount(buckets, minlength=HIST_BUCKETS)
    used = np.flatnonzero(counts)
    s = report_pb2.TensorSummary(
        tensor_id=tensor_id, count=x.size, nan_count=int(np.isnan(x).sum()), inf_count=int(np.isinf(x).sum()),
        zero_count=int((x == 0).sum()), sum=float(finite.sum()), sum_squares=float((finite ** 2).sum()),
        min=float(finite.min()) if finite.size else math.inf, max=float(finite.max()) if finite.size else -math.inf,
        sum_cubes=float((finite ** 3).sum()))
    if used.size:
        s.histogram_offset = int(used[0])
        s.histogram.extend(int(c) for c in counts[used[0]:used[-1] + 1])
    return s


def fields(s: report_pb2.TensorSummary) -> dict:
    return {f: getattr(s, f) for f in ("count", "nan_count", "inf_count", "zero_count", "min", "max",
                                        "histogram_offset")} | {"histogram": list(s.histogram)}


@pytest.mark.parametrize("special", [False, True])
def test_shards_add_up_to_the_whole_tensor(special):
    rng = np.random.default_rng(0)
    whole = (rng.standard_normal(1000) * np.exp(rng.uniform(-20, 20, 1000))).astype(np.float32)
    whole[::97] = 0.0
    if special:
        whole[5], whole[600] = np.nan, -np.inf
    shards = np.array_split(whole, [0, 333, 334, 990])  # an empty shard and a one-element shard among them
    merged = add([summary(s) for s in shards])
    expected = summary(whole)
    assert fields(merged) == fields(expected)
    for f in ("sum", "sum_squares", "sum_cubes"):
        assert getattr(merged, f) == pytest.approx(getattr(expected, f), rel=1e-12, abs=1e-30)


def test_merge_by_partition_counts_replicas_once_and_adds_shards_and_ranks():
    x = np.arange(1, 9, dtype=np.float64)
    param, act = run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_ACTIVATION
    meta = {p: TensorMeta.of(f"t{p}", param, "l", 0, partition=p) for p in (SHARDED, REPLICATED)}
    out = TensorMeta.of("l:output", act, "l", 0, partition=PER_RANK)  # each rank's micro-batch
    ranks = [{param: [(meta[SHARDED], summary(x[:4])), (meta[REPLICATED], summary(x))], act: [(out, summary(x[:2]))]},
             {param: [(meta[SHARDED], summary(x[4:])), (meta[REPLICATED], summary(x))], act: [(out, summary(x[2:]))]}]
    merged = merge_tensors(ranks)
    got = {m.partition: s for m, s in merged[param]}
    got[PER_RANK] = merged[act][0][1]
    assert got[SHARDED].sum_squares == got[PER_RANK].sum_squares == got[REPLICATED].sum_squares == (x ** 2).sum()
    assert got[SHARDED].count == got[REPLICATED].count == got[PER_RANK].count == 8
    assert got[REPLICATED] is ranks[0][param][1][1]  # the lowest rank's, once
    whole = summary(x)  # the merge reads as the whole tensor's summary, histogram included
    for m in (got[SHARDED], got[PER_RANK]):
        assert (list(m.histogram), m.histogram_offset) == (list(whole.histogram), whole.histogram_offset)
        assert m.HasField("sum_cubes") and m.sum_cubes == whole.sum_cubes


def test_hsdp_copies_are_left_out_and_a_per_rank_parameter_is_not_added():
    """HSDP on a (replica 2, shard 2) mesh: ranks 0 and 1 (replica coordinate 0) register their shards SHARDED,
    ranks 2 and 3 hold copies of them, registered PER_RANK. The parameter is the two shards, once; a PER_RANK
    parameter elsewhere (a Partial placement's pending sum) is the lowest rank's, never a sum of ranks."""
    x = np.arange(1, 9, dtype=np.float64)
    param = run_pb2.TENSOR_KIND_PARAMETER

    def meta(name, partition):
        return TensorMeta.of(name, param, "l", 0, partition=partition)

    halves = (x[:4], x[4:], x[:4], x[4:])
    ranks = [{param: [(meta("w", SHARDED if r < 2 else PER_RANK), summary(h)),
                      (meta("partial", PER_RANK), summary(x * (r + 1)))]} for r, h in enumerate(halves)]
    got = {m.name: s for m, s in merge_tensors(ranks)[param]}
    assert got["w"].count == 8 and got["w"].sum_squares == (x ** 2).sum()
    assert got["partial"] is ranks[0][param][1][1]


def test_layer_figures_of_a_sharded_run_are_the_merge_of_a_joined_step(build):
    c = Cluster(build, world=2, sharded=("fc1", "fc2"))
    c.step(0, 2, grad_of=lambda r: {"fc1": 3.0 + r, "fc2": 1.0})
    c.report(1, 0, grad={"fc1": 6.0, "fc2": 1.0}, param={"fc1": 5.0})
    layers = {name: (g, p) for name, g, p, _ in c.state.views()[0].layers}
    # Step 1 has not joined: the layers still show step 0, merged (sqrt(3² + 4²)), not rank 0's new shard.
    assert layers["fc1"][0] == pytest.approx(5.0)
    c.report(1, 1, grad={"fc1": 8.0, "fc2": 1.0}, param={"fc1": 12.0})
    view = c.state.views()[0]
    layers = {name: (g, p) for name, g, p, _ in view.layers}
    assert layers["fc1"] == (pytest.approx(10.0), pytest.approx(13.0))   # shards add: sqrt(6² + 8²), sqrt(5² + 12²)
    assert layers["fc2"][0] == pytest.approx(math.sqrt(2))
    assert layers["head"] == (pytest.approx(1.0), pytest.approx(1.0))  # replicated: counted once, not sqrt(2)
    rows = history_rows(c.state.runs[RUN])
    assert [r["step"] for r in rows] == [0, 1]  # one row per joined step, none per rank's report
    assert rows[1]["layers"]["fc1"] == pytest.approx(10.0) and rows[1]["param_norms"]["fc1"] == pytest.approx(13.0)
    detail = {row["layer"]: row for row in run_detail(view, [])["layers"]}
    assert detail["fc1"]["grad_norm"] == pytest.approx(10.0)
    # The tensors behind the heatmap, histograms and health are the merged ones too.
    grads = {m.layer: s for m, s in view.tensors[run_pb2.TENSOR_KIND_GRADIENT]}
    assert grads["fc1"].sum_squares == pytest.approx(100.0) and grads["fc1"].count == 512
    activations = {m.layer: s for m, s in view.tensors[run_pb2.TENSOR_KIND_ACTIVATION]}
    assert activations["fc1"].count == 512  # per-rank activations: the union of the ranks' batches


def test_rules_judge_the_merged_step_not_a_shard(build):
    # Two shards of norm 0.8 each: neither exceeds the limit of 1, the layer (norm 1.13) does, once.
    c = Cluster(build, world=2, sharded=("fc1",), exploding_abs_limit=1.0)
    c.step(0, 2, grad_of=lambda r: {"fc1": 0.8, "embed": 0.1, "fc2": 0.1, "head": 0.1})
    fired = c.fired("ExplodingGradient")
    assert len(fired) == 1 and fired[0].layer == "fc1"
    assert fired[0].value == pytest.approx(math.sqrt(2 * 0.64))


def test_mean_loss_over_ranks_and_nan_loss_stays_nan(build):
    c = Cluster(build, world=2)
    c.report(0, 0, loss=1.0)
    c.report(0, 1, loss=3.0)
    assert c.state.views()[0].loss == pytest.approx(2.0)
    c.report(1, 0, loss=float("nan"))
    c.report(1, 1, loss=3.0)
    assert math.isnan(c.state.views()[0].loss)


def exposition(state: State) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(AggregatorCollector(lambda: AggregatorView(state.views(), [], {}, {}, 0)))
    from prometheus_client import generate_latest

    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name in ("gradwatch_layer_grad_norm", "gradwatch_run_grad_norm"):
                out[(sample.name, sample.labels.get("layer", ""))] = sample.value
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_nan_and_inf_are_never_shown_as_zero(build, world):
    c = Cluster(build, world=world)
    # The agent sums finite values only: a gradient full of NaN arrives with sum_squares 0.
    c.step(0, world, grad_of=lambda r: {"fc1": 0.0}, nonfinite={("fc1", "gradient"): 256})
    view = c.state.views()[0]
    layers = {name: g for name, g, _, _ in view.layers}
    assert math.isnan(layers["fc1"]) and layers["embed"] == pytest.approx(1.0)
    assert math.isnan(view.grad_norm)
    detail = {row["layer"]: row for row in run_detail(view, [])["layers"]}
    assert detail["fc1"]["grad_norm"] == "NaN" and detail["embed"]["grad_norm"] == 1.0
    shown = exposition(c.state)
    assert math.isnan(shown[("gradwatch_layer_grad_norm", "fc1")])
    assert math.isnan(shown[("gradwatch_run_grad_norm", "")])
    assert history_rows(c.state.runs[RUN])[-1]["layers"]["fc1"] != history_rows(c.state.runs[RUN])[-1]["layers"]["fc1"]
    # Inf without NaN: +Inf.
    report = build.report(1, run=RUN, rank=0)
    for s in report.tensors:
        if s.tensor_id == build.tensor_id("fc2", "gradient"):
            s.inf_count, s.sum_squares = 3, 0.0
    c.apply(report)
    for rank in range(1, world):
        other = build.report(1, run=RUN, rank=rank)
        for s in other.tensors:
            if s.tensor_id == build.tensor_id("fc2", "gradient"):
                s.inf_count, s.sum_squares = 3, 0.0
        c.apply(other)
    layers = {name: g for name, g, _, _ in c.state.views()[0].layers}
    assert layers["fc2"] == math.inf and exposition(c.state)[("gradwatch_layer_grad_norm", "fc2")] == math.inf


def test_a_single_rank_run_is_not_merged(build):
    state = State(AggregatorConfig(), Counters())
    state.register("solo", build.registration(run="solo"))
    state.apply("solo", build.report(0, run="solo", grad=2.0))
    assert {n: g for n, g, _, _ in state.views()[0].layers}["fc1"] == pytest.approx(2.0)
    assert state.take_closed() == []


def test_shard_checksums_add_up_to_the_whole_tensors():
    """The replica checksum (the wrapping sum of the elements' bits as signed integers) of a sharded tensor
    is the sum of its shards' modulo 2^64; a shard without one (an older agent) leaves the merge without."""
    x = np.random.default_rng(1).standard_normal(100).astype(np.float32)
    x[3] = -0.0

    def checksum(a: np.ndarray) -> int:
        return int(a.view(np.int32).astype(np.int64).sum()) % (1 << 64)

    parts = [summary(part) for part in np.array_split(x, 3)]
    for s, part in zip(parts, np.array_split(x, 3), strict=True):
        s.checksum = checksum(part)
    assert add(parts).checksum == checksum(x)
    parts[1].ClearField("checksum")
    assert not add(parts).HasField("checksum")
