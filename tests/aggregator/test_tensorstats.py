"""Per-tensor figures (aggregator/tensorstats.py) against numpy over the same values: NaN and Inf propagate into
mean, std and norm and never read 0; finite moments, the optimizer's view of a parameter, and a tensor's
histograms over steps as one matrix, merged exactly over steps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch.aggregator.merge import Merged
from gradwatch.aggregator.report import TensorMeta
from gradwatch.aggregator.tensorstats import figures, histogram_matrix, layer_figures, optimizer_rows, tensor_rows
from gradwatch.v1 import run_pb2
from tests.fixtures.aggregator import summary_of

RNG = np.random.default_rng(7)
PARAMETER, UPDATE, STATE = (run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_UPDATE,
                            run_pb2.TENSOR_KIND_OPTIMIZER_STATE)
ACTIVATION = run_pb2.TENSOR_KIND_ACTIVATION


def same(got, want, rel=1e-9):
    if want is None or got is None:
        return got is want
    if math.isnan(want):
        return math.isnan(got)
    return got == pytest.approx(want, rel=rel, abs=1e-12)


DATA = {
    "normal": RNG.normal(0.3, 2.0, 4096).astype(np.float32),
    "constant": np.full(1000, 0.1, np.float32),
    "zeros": np.zeros(64, np.float32),
    "offset mean": (1e3 + RNG.normal(0, 1e-2, 10_000)).astype(np.float32),
    "one NaN": np.concatenate([RNG.normal(0, 1, 100), [np.nan]]).astype(np.float32),
    "one Inf": np.concatenate([RNG.normal(0, 1, 100), [np.inf]]).astype(np.float32),
    "all NaN": np.full(8, np.nan, np.float32),
    "empty": np.zeros(0, np.float32),
}


@pytest.mark.parametrize("name", list(DATA))
def test_figures_equal_numpy(name):
    x = DATA[name].astype(np.float64)
    f = figures(summary_of(1, x))
    finite = x[np.isfinite(x)]
    with np.errstate(all="ignore"):
        want = {"mean": float(np.mean(x)) if x.size else None, "std": float(np.std(x)) if x.size else None,
                "finite_mean": float(np.mean(finite)) if finite.size else None,
                "finite_std": float(np.std(finite)) if finite.size else None,
                "norm": float(np.sqrt(np.sum(np.square(x)))) if x.size else 0.0,
                "min": float(finite.min()) if finite.size else None,
                "max": float(finite.max()) if finite.size else None}
    if np.isinf(x).any():
        want["mean"] = math.nan  # an Inf's sign is not sent: NaN, not the +Inf numpy would say here
    # E[x^2] - mean^2 keeps about 16 - 2 log10(|mean| / std) digits: 6 for a mean 1e5 stds away.
    rel = 1e-5 if name == "offset mean" else 1e-9
    for key, value in want.items():
        assert same(f[key], value, rel if "std" in key else 1e-9), (key, f[key], value)
    assert (f["count"], f["nan"], f["inf"]) == (x.size, int(np.isnan(x).sum()), int(np.isinf(x).sum()))
    assert f["zero_fraction"] == (pytest.approx(float(np.mean(x == 0))) if x.size else None)


def test_a_nan_is_never_read_as_zero():
    f = figures(summary_of(1, DATA["all NaN"]))
    assert math.isnan(f["mean"]) and math.isnan(f["std"]) and math.isnan(f["norm"])
    assert f["finite_mean"] is None and f["min"] is None and f["zero_fraction"] == 0.0


def test_merged_ranks_equal_the_concatenated_data():
    """Two ranks' parts of a per-rank activation, merged as the join merges them: numpy's figures of the union."""
    a, b = RNG.normal(1.0, 3.0, 3000), RNG.normal(-2.0, 0.5, 1000)
    merged = figures(Merged([summary_of(1, a), summary_of(1, b)]))
    whole = np.concatenate([a, b])
    assert merged["mean"] == pytest.approx(whole.mean(), rel=1e-12)
    assert merged["std"] == pytest.approx(whole.std(), rel=1e-9)
    assert merged["norm"] == pytest.approx(np.linalg.norm(whole), rel=1e-12)
    assert merged["min"] == pytest.approx(whole.min(), rel=1e-6)
    assert merged["max"] == pytest.approx(whole.max(), rel=1e-6)
    poisoned = figures(Merged([summary_of(1, a), summary_of(1, [np.nan, 1.0])]))
    assert math.isnan(poisoned["mean"]) and math.isnan(poisoned["std"]) and poisoned["nan"] == 1


def meta(name: str, kind: int, layer: str, order: int) -> TensorMeta:
    return TensorMeta.of(name, kind, layer, order)


def test_tensor_rows_filter_and_order():
    tensors = {ACTIVATION: [(meta("fc2:output", ACTIVATION, "fc2", 1), summary_of(1, [1.0])),
                            (meta("fc1:output", ACTIVATION, "fc1", 0), summary_of(2, [2.0]))],
               PARAMETER: [(meta("fc1.weight", PARAMETER, "fc1", 0), summary_of(3, [3.0]))]}
    assert [(r["name"], r["kind"]) for r in tensor_rows(tensors)] == [
        ("fc1:output", "activation"), ("fc1.weight", "parameter"), ("fc2:output", "activation")]
    assert [r["name"] for r in tensor_rows(tensors, {ACTIVATION}, {"fc2"})] == ["fc2:output"]
    (row,) = tensor_rows(tensors, {PARAMETER}, histograms=True)
    assert row["histogram"] == {"offset": 41, "counts": [1]}  # 3 = 1.5 * 2^1: bucket 1 + 40


def test_optimizer_rows_pair_state_and_update_with_their_parameter():
    w, m, v = RNG.normal(0, 0.1, 512), RNG.normal(0, 1e-3, 512), RNG.uniform(1e-7, 1e-6, 512)
    dw = RNG.normal(0, 1e-4, 512)
    tensors = {PARAMETER: [(meta("fc1.weight", PARAMETER, "fc1", 0), summary_of(1, w))],
               STATE: [(meta("fc1.weight.exp_avg", STATE, "fc1", 0), summary_of(2, m)),
                       (meta("fc1.weight.exp_avg_sq", STATE, "fc1", 0), summary_of(3, v)),
                       (meta("fc2.weight.momentum_buffer", STATE, "fc2", 1), summary_of(4, m))],
               UPDATE: [(meta("fc1.weight", UPDATE, "fc1", 0), summary_of(5, dw))]}
    fc1, fc2 = optimizer_rows(tensors, learning_rate=1e-3)
    assert fc1["parameter"] == "fc1.weight" and fc1["param_norm"] == pytest.approx(np.linalg.norm(w))
    assert fc1["states"]["exp_avg"]["norm"] == pytest.approx(np.linalg.norm(m))
    assert fc1["states"]["exp_avg_sq"]["norm"] == pytest.approx(np.linalg.norm(v))
    update = fc1["update"]
    assert update["ratio"] == pytest.approx(np.linalg.norm(dw) / np.linalg.norm(w))
    assert update["rms"] == pytest.approx(np.sqrt(np.mean(dw ** 2)))
    assert update["absmax"] == pytest.approx(np.abs(dw).max(), rel=1e-6)
    assert update["histogram"] == {"offset": summary_of(5, dw).histogram_offset,
                                   "counts": list(summary_of(5, dw).histogram)}
    estimate = 1e-3 * np.sqrt(np.mean(m ** 2)) / (np.sqrt(np.mean(v)) + 1e-8)
    assert fc1["adam_step_estimate"] == pytest.approx(estimate)
    # SGD's momentum for a parameter not watched itself: listed, no norm of its own, no Adam estimate.
    assert (fc2["parameter"], list(fc2["states"]), fc2["param_norm"], fc2["update"], fc2["adam_step_estimate"]) == (
        "fc2.weight", ["momentum_buffer"], None, None, None)
    assert [r["parameter"] for r in optimizer_rows(tensors, 1e-3, {"fc2"})] == ["fc2.weight"]


def test_adam_estimate_propagates_nan():
    tensors = {STATE: [(meta("w.exp_avg", STATE, "l", 0), summary_of(2, [np.nan, 1.0])),
                       (meta("w.exp_avg_sq", STATE, "l", 0), summary_of(3, [1.0, 1.0]))]}
    (row,) = optimizer_rows(tensors, learning_rate=1e-3)
    assert math.isnan(row["adam_step_estimate"])


def frames_of(steps: dict[int, np.ndarray], name: str = "fc1.weight") -> list[tuple[int, dict]]:
    return [(step, {PARAMETER: [(meta(name, PARAMETER, "fc1", 0), summary_of(1, x))]}) for step, x in steps.items()]


def test_histogram_matrix_normalizes_each_step_and_merges_steps_into_columns():
    data = {step: RNG.normal(0, 2.0 ** -step, 1000) for step in range(10)}
    data[9][:10] = 0.0
    data[9][10:15] = np.nan
    frames = frames_of(data)
    full = histogram_matrix(frames, "fc1.weight", PARAMETER)
    assert full["steps"] == list(range(10)) and full["last_steps"] == list(range(10))
    for row in full["values"]:
        assert sum(row) == pytest.approx(1.0)
    assert full["zero_fraction"][9] == pytest.approx(0.01) and full["nonfinite_fraction"][9] == pytest.approx(0.005)
    # Column 0 of 3: steps 0-3 together, exactly the histogram of their concatenated values.
    three = histogram_matrix(frames, "fc1.weight", PARAMETER, columns=3)
    assert (three["steps"], three["last_steps"]) == ([0, 4, 8], [3, 7, 9])
    union = summary_of(1, np.concatenate([data[s] for s in range(4)]))
    counts = np.zeros(64)
    counts[union.histogram_offset:union.histogram_offset + len(union.histogram)] = union.histogram
    want = counts / counts.sum()
    got = np.zeros(64)
    got[three["offset"]:three["offset"] + len(three["values"][0])] = three["values"][0]
    assert np.allclose(got, want)
    assert three["counts"] == [4000, 4000, 2000]
    assert histogram_matrix(frames, "fc1.weight", PARAMETER, first=8)["steps"] == [8, 9]
    assert histogram_matrix(frames, "nope", PARAMETER) == {
        "tensor": "nope", "kind": "parameter", "offset": 0, "steps": [], "last_steps": [], "values": [], "counts": [],
        "zero_fraction": [], "nonfinite_fraction": []}


def test_layer_figures_take_a_layers_tensors_as_one():
    w, b = RNG.normal(0, 1, 256), RNG.normal(1, 0.1, 16)
    m, v = RNG.normal(0, 1e-3, 272), RNG.uniform(0, 1e-6, 272)
    tensors = {PARAMETER: [(meta("fc1.weight", PARAMETER, "fc1", 0), summary_of(1, w)),
                           (meta("fc1.bias", PARAMETER, "fc1", 0), summary_of(2, b)),
                           (meta("fc2.weight", PARAMETER, "fc2", 1), summary_of(3, w))],
               STATE: [(meta("fc1.weight.exp_avg", STATE, "fc1", 0), summary_of(4, m[:256])),
                       (meta("fc1.bias.exp_avg", STATE, "fc1", 0), summary_of(5, m[256:])),
                       (meta("fc1.weight.exp_avg_sq", STATE, "fc1", 0), summary_of(6, v))]}
    got = layer_figures(tensors, {PARAMETER, STATE}, {"fc1"})
    assert set(got) == {("fc1", "parameter", ""), ("fc1", "optimizer_state", "exp_avg"),
                        ("fc1", "optimizer_state", "exp_avg_sq")}
    both = np.concatenate([w, b])
    assert got[("fc1", "parameter", "")]["std"] == pytest.approx(both.std(), rel=1e-9)
    assert got[("fc1", "parameter", "")]["norm"] == pytest.approx(np.linalg.norm(both))
    assert got[("fc1", "optimizer_state", "exp_avg")]["norm"] == pytest.approx(np.linalg.norm(m))
