"""The mergeable tensor statistics shared by agent and aggregator: bucket layout, merge, derived values.

A summary is (count, nan, inf, zero, sum, sum of squares, min, max, log2-magnitude histogram) over the
finite values of a tensor. Two summaries of disjoint data merge exactly, so shards, ranks and steps
combine in the aggregator without collectives on the training ranks. `moments` is the one derivation of
the finite count, mean and variance from them (rules, layer health, the query API).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Fixed log2-magnitude buckets (wire contract, see proto/gradwatch/v1/report.proto): bucket i counts
# finite non-zero x with floor(log2|x|) == i + HIST_MIN_EXPONENT, clamped into [0, HIST_BUCKETS).
HIST_MIN_EXPONENT = -40
HIST_BUCKETS = 64


def bucket_lower_bound(i: int) -> float:
    """Smallest |x| counted by bucket i (0 for the underflow bucket)."""
    return 0.0 if i == 0 else math.ldexp(1.0, i + HIST_MIN_EXPONENT)


# E[x^2] - mean^2 within this many ulps of E[x^2] (or below zero) is rounding, not spread.
ROUNDING_ULPS = 8


def moments(count: int, nan: int, inf: int, total: float, squares: float,
            lo: float = -math.inf, hi: float = math.inf) -> tuple[int, float, float]:
    """(finite count, mean, population variance) of a summary's finite values, from its raw sums.

    No finite value: (0, NaN, NaN). NaN or overflowed sums give a NaN or Inf mean and variance, never 0.
    The variance of a constant tensor is 0. Its float64 sums round (E[x^2] - mean^2 comes out of either
    sign, up to ~1e-11 E[x^2] at 4M elements), so the variance is zeroed when the smallest and largest
    finite values `lo`, `hi` are equal (a summary holds them in float32: a spread under one float32 ulp,
    a variance at the sums' rounding level), and whenever it is within ROUNDING_ULPS ulps of E[x^2] or
    negative (lo and hi unknown: -Inf and Inf)."""
    n = count - nan - inf
    if n <= 0:
        return 0, math.nan, math.nan
    mean = total / n
    mean_square = squares / n
    var = mean_square - mean * mean
    if math.isfinite(var):
        if lo == hi or var <= ROUNDING_ULPS * math.ulp(mean_square):
            var = 0.0
    elif var < 0:
        var = math.nan  # -Inf: sums no data set has (an overflowed sum beside finite squares)
    return n, mean, var


def summary_moments(s) -> tuple[int, float, float]:
    """`moments` of a report_pb2.TensorSummary."""
    return moments(s.count, s.nan_count, s.inf_count, s.sum, s.sum_squares, s.min, s.max)


@dataclass
class Stats:
    """A decoded, mergeable summary. `hist` is dense (HIST_BUCKETS counts) or None."""

    count: int = 0
    nan: int = 0
    inf: int = 0
    zero: int = 0
    sum: float = 0.0
    sum_squares: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    hist: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_proto(cls, s) -> Stats:
        hist = None
        if len(s.histogram):
            hist = np.zeros(HIST_BUCKETS, dtype=np.int64)
            lo = min(s.histogram_offset, HIST_BUCKETS)
            counts = np.asarray(s.histogram, dtype=np.int64)[: HIST_BUCKETS - lo]
            hist[lo : lo + len(counts)] = counts
        return cls(s.count, s.nan_count, s.inf_count, s.zero_count, s.sum, s.sum_squares, s.min, s.max, hist)

    def merge(self, other: Stats) -> Stats:
        """Statistics of the union of the two (disjoint) data sets."""
        if self.hist is None or other.hist is None:
            hist = self.hist if other.hist is None else other.hist
            hist = None if hist is None else hist.copy()
        else:
            hist = self.hist + other.hist
        return Stats(
            self.count + other.count,
            self.nan + other.nan,
            self.inf + other.inf,
            self.zero + other.zero,
            self.sum + other.sum,
            self.sum_squares + other.sum_squares,
            min(self.min, other.min),
            max(self.max, other.max),
            hist,
        )

    @property
    def nonfinite(self) -> int:
        return self.nan + self.inf

    @property
    def finite_count(self) -> int:
        return self.moments()[0]

    @property
    def norm(self) -> float:
        """L2 norm of the finite values."""
        return math.sqrt(max(self.sum_squares, 0.0))

    def moments(self) -> tuple[int, float, float]:
        """(finite count, mean, population variance): see `moments`."""
        return moments(self.count, self.nan, self.inf, self.sum, self.sum_squares, self.min, self.max)

    @property
    def mean(self) -> float:
        return self.moments()[1]

    @property
    def std(self) -> float:
        """Population standard deviation of the finite values."""
        return math.sqrt(self.moments()[2])

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.finite_count else math.nan
