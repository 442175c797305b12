"""views.mean_std_skew: the input statistics the query API and the live view show, from gradwatch.stats.moments."""

from __future__ import annotations

import math

import pytest

from gradwatch.aggregator.http.views import mean_std_skew
from gradwatch.v1.report_pb2 import TensorSummary
from tests.aggregator.rules.test_tensors import rounded_constant

CONSTANT = rounded_constant(123.456)

SUMMARIES = [
    pytest.param(TensorSummary(count=4, sum=10.0, sum_squares=30.0, sum_cubes=100.0, min=1.0, max=4.0),
                 (2.5, math.sqrt(1.25), 0.0), id="1,2,3,4: symmetric"),
    pytest.param(TensorSummary(**CONSTANT, sum_cubes=CONSTANT["count"] * CONSTANT["min"] ** 3),
                 (pytest.approx(CONSTANT["min"]), 0.0, None), id="constant, rounded sums: std 0, no skew"),
    pytest.param(TensorSummary(count=3, nan_count=2, inf_count=1, min=math.inf, max=-math.inf),
                 (None, None, None), id="no finite value"),
]


@pytest.mark.parametrize(("summary", "expected"), SUMMARIES)
def test_mean_std_skew(summary, expected):
    assert mean_std_skew(summary) == expected
