"""The mergeable tensor statistics shared by agent and aggregator: bucket layout, merge, derived values.

A summary is (count, nan, inf, zero, sum, sum of squares, min, max, log2-magnitude histogram) over the
finite values of a tensor. Two summaries of disjoint data merge exactly, so shards, ranks and steps
combine in the aggregator without collectives on the training ranks.
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
        return self.count - self.nan - self.inf

    @property
    def norm(self) -> float:
        """L2 norm of the finite values."""
        return math.sqrt(max(self.sum_squares, 0.0))

    @property
    def mean(self) -> float:
        n = self.finite_count
        return self.sum / n if n else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation of the finite values."""
        n = self.finite_count
        if not n:
            return math.nan
        return math.sqrt(max(self.sum_squares / n - (self.sum / n) ** 2, 0.0))

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.finite_count else math.nan
