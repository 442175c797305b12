"""The on-device statistics against a float64 numpy reference, and exact merges of shards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwatch.agent.encode import TensorSlot, step_report
from gradwatch.agent.summarize import NCOLS, Summarizer
from gradwatch.stats import HIST_BUCKETS, HIST_MIN_EXPONENT, Stats


def reference(x: np.ndarray) -> dict:
    x = x.astype(np.float64).ravel()
    finite = np.isfinite(x)
    f = x[finite]
    nz = f[f != 0]
    idx = np.clip(np.floor(np.log2(np.abs(nz))).astype(np.int64) - HIST_MIN_EXPONENT, 0, HIST_BUCKETS - 1)
    return dict(nan=int(np.isnan(x).sum()), inf=int(np.isinf(x).sum()), zero=int((x == 0).sum()), sum=f.sum(),
                sum_squares=(f * f).sum(), min=f.min() if f.size else math.inf, max=f.max() if f.size else -math.inf,
                hist=np.bincount(idx, minlength=HIST_BUCKETS))


def nasty(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 8)  # magnitudes over ~40 octaves
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-42, -3e-45, 3e38, -2e37, 1e-30])
    x[: len(special)] = special
    return x[torch.randperm(n, generator=g)]


def summarize(tensors, chunk=1 << 22, histogram=True):
    s = Summarizer(len(tensors), torch.device("cpu"), histogram, chunk)
    for i, t in enumerate(tensors):
        s.summarize(i, t)
    return s.buffer.numpy()


def to_stats(rows, tensors) -> list[Stats]:
    slots = [TensorSlot(i, f"t{i}", 1, "m", 0, tuple(t.shape), "float32", t.numel()) for i, t in enumerate(tensors)]
    report = step_report("r", 0, 0, 1, 0.0, 1, rows, slots, True, {}, [])
    return [Stats.from_proto(s) for s in report.tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 22, 1000])
def test_statistics_match_float64_reference(dtype, chunk):
    x = nasty(10_007, seed=1).to(dtype)
    (stats,) = to_stats(summarize([x], chunk), [x])
    ref = reference(x.double().numpy())
    assert (stats.nan, stats.inf, stats.zero) == (ref["nan"], ref["inf"], ref["zero"])
    assert stats.count == x.numel()
    assert stats.sum == pytest.approx(ref["sum"], rel=1e-9)
    assert stats.sum_squares == pytest.approx(ref["sum_squares"], rel=1e-9)
    assert stats.min == pytest.approx(np.float32(ref["min"]), rel=1e-6)
    assert stats.max == pytest.approx(np.float32(ref["max"]), rel=1e-6)
    np.testing.assert_array_equal(stats.hist, ref["hist"])


def test_all_nonfinite_and_empty_rows_merge_as_identity():
    x = torch.tensor([float("nan"), float("inf")])
    (stats,) = to_stats(summarize([x]), [x])
    assert (stats.nan, stats.inf, stats.finite_count) == (1, 1, 0)
    assert stats.min == math.inf and stats.max == -math.inf
    assert math.isnan(stats.mean)


def test_shards_merge_to_the_statistics_of_the_whole():
    whole = nasty(9_000, seed=2)
    shards = list(whole.split(2_000))  # uneven: 2000, ..., 1000
    merged = Stats()
    for s in to_stats(summarize(shards), shards):
        merged = merged.merge(s)
    (full,) = to_stats(summarize([whole]), [whole])
    assert (merged.count, merged.nan, merged.inf, merged.zero) == (full.count, full.nan, full.inf, full.zero)
    assert merged.sum == pytest.approx(full.sum, rel=1e-12)
    assert merged.sum_squares == pytest.approx(full.sum_squares, rel=1e-12)
    assert (merged.min, merged.max) == (full.min, full.max)
    np.testing.assert_array_equal(merged.hist, full.hist)


def test_histogram_can_be_disabled():
    x = torch.randn(100)
    rows = summarize([x], histogram=False)
    assert rows.shape == (1, NCOLS)  # one row per tensor; scalars live in the host slot only
    (stats,) = to_stats(rows, [x])
    assert stats.hist is None and stats.sum_squares > 0


def test_wire_size_per_summary_meets_the_design_target():
    """DESIGN.md: <= 48 B plain, <= 160 B with histogram, per tensor summary on the wire."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(768, 768, generator=g) * 0.02, torch.randn(768, generator=g) * 1e-3]
    rows = summarize(tensors)
    slots = [TensorSlot(i, f"t{i}", 1, "m", 0, tuple(t.shape), "float32", t.numel()) for i, t in enumerate(tensors)]
    with_hist = step_report("r", 0, 0, 1, 0.0, 1, rows, slots, True, {}, [])
    plain = step_report("r", 0, 0, 1, 0.0, 1, rows, slots, False, {}, [])
    per_hist = max(s.ByteSize() + 2 for s in with_hist.tensors)   # + field tag and length prefix
    per_plain = max(s.ByteSize() + 2 for s in plain.tensors)
    assert per_plain <= 48, per_plain
    assert per_hist <= 160, per_hist
