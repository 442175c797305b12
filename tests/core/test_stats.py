"""gradwatch.stats.moments: the one derivation of finite count, mean and variance from a summary's sums."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from gradwatch.stats import Stats, moments, summary_moments
from gradwatch.v1 import report_pb2

NAN, INF = math.nan, math.inf
C32 = float(np.float32(123.456))  # a constant float32 tensor holds this


@functools.cache
def float64_sums(value: float, n: int) -> tuple[float, float]:
    """Sum and sum of squares of n copies of `value`, accumulated one by one in float64 as a single lane
    of the agent's kernel does: E[x^2] - mean^2 comes out as rounding, here far above a few ulps."""
    x = np.full(n, value, dtype=np.float64)
    return float(np.cumsum(x)[-1]), float(np.cumsum(x * x)[-1])


S32, Q32 = float64_sums(C32, 10**6)
S10, Q10 = float64_sums(0.1, 10)
C_NEG = float(np.float32(-2.7))
S_NEG, Q_NEG = float64_sums(C_NEG, 10**6)  # E[x^2] - mean^2 about -1.5e-10: below zero by rounding

# (count, nan, inf, sum, sum of squares, min, max) -> (finite count, mean, variance)
MOMENTS = [
    pytest.param((4, 0, 0, 10.0, 30.0, 1.0, 4.0), (4, 2.5, 1.25), id="1,2,3,4"),
    pytest.param((10**6, 0, 0, 1e6, 1e6, 1.0, 1.0), (10**6, 1.0, 0.0), id="1e6 ones"),
    pytest.param((10**6, 0, 0, S32, Q32, C32, C32), (10**6, pytest.approx(C32), 0.0),
                 id="1e6 x 123.456f, rounded float64 sums: constant by its extremes"),
    pytest.param((10, 0, 0, S10, Q10, -INF, INF), (10, pytest.approx(0.1), 0.0),
                 id="10 x 0.1, extremes unknown: zeroed within a few ulps"),
    pytest.param((0, 0, 0, 0.0, 0.0, INF, -INF), (0, NAN, NAN), id="empty"),
    pytest.param((3, 2, 1, 0.0, 0.0, INF, -INF), (0, NAN, NAN), id="only NaN and Inf"),
    pytest.param((4, 1, 1, 4.0, 10.0, 1.0, 3.0), (2, 2.0, 1.0), id="NaN and Inf present: over the finite two"),
    pytest.param((4, 0, 0, NAN, NAN, 1.0, 1.0), (4, NAN, NAN), id="NaN sums stay NaN, equal extremes or not"),
    pytest.param((2, 0, 0, 0.0, INF, -1e200, 1e200), (2, 0.0, INF), id="overflowed squares: Inf, not 0"),
    pytest.param((2, 0, 0, INF, 1.0, 1.0, 2.0), (2, INF, NAN), id="Inf sum beside finite squares: NaN"),
    pytest.param((10**6, 0, 0, S_NEG, Q_NEG, -INF, INF), (10**6, pytest.approx(C_NEG), 0.0),
                 id="rounding below zero, extremes unknown: 0, never negative"),
]


def same(got: float, want) -> bool:
    return math.isnan(got) if isinstance(want, float) and math.isnan(want) else got == want


@pytest.mark.parametrize(("args", "expected"), MOMENTS)
def test_moments(args, expected):
    got = moments(*args)
    assert all(same(g, w) for g, w in zip(got, expected, strict=True)), got


def test_rounded_sums_of_a_constant_are_not_within_a_few_ulps():
    """Why the extremes decide: without them this constant tensor would show a std of about 2.6e-4."""
    n, _, var = moments(10**6, 0, 0, S32, Q32)
    assert n == 10**6 and var > 1e4 * math.ulp(Q32 / n)


def test_summary_and_stats_use_moments():
    s = report_pb2.TensorSummary(count=10**6, sum=S32, sum_squares=Q32, min=C32, max=C32)
    assert summary_moments(s)[2] == 0.0
    stats = Stats.from_proto(s)
    assert stats.std == 0.0 and stats.mean == pytest.approx(C32)
    assert math.isnan(Stats().mean) and math.isnan(Stats().std)
