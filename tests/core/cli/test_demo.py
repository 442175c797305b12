"""`gradwatch demo`'s alert lines and summary: each alert says where it points (NonFinite: the layer, the pass
where the NaN/Inf started, the tensor, the rank and the step). The whole demo runs in tests/scenarios/e2e."""

from __future__ import annotations

import io
from types import SimpleNamespace

from gradwatch.cli.demo import DemoResult, alert_line, print_summary

NONFINITE = {"rule": "NonFinite", "status": "firing", "severity": "critical", "step": 202, "rank": 0, "layer": "fc1",
             "tensor": "fc1:output", "summary": "NaN/Inf at step 202 started in layer fc1 in the forward pass: its "
                                                "output fc1:output is the first module output holding NaN/Inf"}
EXPLODING = {"rule": "ExplodingGradient", "status": "firing", "severity": "critical", "step": 201, "rank": 0,
             "layer": "fc1", "tensor": "", "summary": "Gradient norm of layer fc1 is 1.4e+10 at step 201"}


def test_a_nonfinite_line_names_layer_pass_tensor_rank_and_step():
    assert alert_line(NONFINITE) == ("  >>> ALERT [critical] NonFinite at layer fc1 in the forward pass (fc1:output), "
                                     f"rank 0, step 202: {NONFINITE['summary']}")
    assert alert_line(EXPLODING).startswith("  >>> ALERT [critical] ExplodingGradient at layer fc1, rank 0, step 201: ")
    assert alert_line({**NONFINITE, "status": "resolved"}).startswith("  >>> resolved [critical] NonFinite at ")


def test_the_summary_lists_where_each_alert_points():
    out = io.StringIO()
    counters = SimpleNamespace(exported=215, dropped=0, skipped_busy=0, internal_errors=0)
    assert print_summary(DemoResult("demo-1", 215, [EXPLODING, NONFINITE], counters), out)
    text = out.getvalue()
    assert "  alert ExplodingGradient (critical): layer fc1, rank 0, step 201\n" in text
    assert "  alert NonFinite (critical): layer fc1 in the forward pass (fc1:output), rank 0, step 202\n" in text
    assert "OK: the blow-up was caught" in text
