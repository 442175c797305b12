"""A run's step history in Redis (aggregator/history.py): rows round-trip with NaN/Inf and evaluation steps,
writes are idempotent, and a restarted aggregator, one that took a run over, or one asked about steps
before its in-memory window serves every step of the run."""

from __future__ import annotations

import math

import pytest

from gradwatch.aggregator.history import HistoryStore
from gradwatch.aggregator.http.api import run_detail
from gradwatch.streams import history_key, registrations_key

RUN = "demo"


def test_rows_round_trip_with_nan_inf_and_evaluation_steps(redis_client):
    store = HistoryStore(redis_client)
    rows = [(0, 10.0, True, 2.5, 3.0, {"fc1": 1.5, "head": math.nan}, {"accuracy": 0.25}, {"fc1": 4.0}),
            (0, 10.5, False, 2.75, None, {}, {"accuracy": 0.5}, {}),
            (1, 11.0, True, math.inf, math.inf, {"fc1": math.inf, "fc2": 0.0}, {}, {"fc2": 1e-3})]
    store.save(RUN, rows)
    got = HistoryStore(redis_client).rows(RUN)  # a fresh store: layer indexes come from Redis
    assert [(r[0], r[2]) for r in got] == [(0, True), (0, False), (1, True)]
    assert got[0][3] == 2.5 and got[0][5]["fc1"] == 1.5 and math.isnan(got[0][5]["head"])
    assert got[0][6] == {"accuracy": 0.25} and got[0][7] == {"fc1": 4.0}
    assert got[1][4] is None and got[1][5] == {}
    assert got[2][3] == math.inf and got[2][5] == {"fc1": math.inf, "fc2": 0.0}
    assert got[2][7]["fc2"] == 1e-3  # float64 on disk: read back exactly
    assert [r[0] for r in store.rows(RUN, first=1)] == [1] and [r[0] for r in store.rows(RUN, last=0)] == [0, 0]
    assert [r[0] for r in store.rows(RUN, limit=1)] == [1]
    store.save(RUN, rows[2:])  # written again (a takeover re-applying): overwritten, not counted twice
    assert store.count(RUN) == 3 and redis_client.hlen(history_key(RUN)) == 3


def test_two_stores_agree_on_layer_indexes(redis_client):
    a, b = HistoryStore(redis_client), HistoryStore(redis_client)
    ids_a = a.layer_ids(RUN, ["embed", "fc1"])
    ids_b = b.layer_ids(RUN, ["fc1", "head"])
    assert ids_b["fc1"] == ids_a["fc1"] and len({*ids_a.values(), ids_b["head"]}) == 3


def test_a_restarted_aggregator_serves_every_step(make_aggregator, build, publish, run_all):
    """80 steps applied, the aggregator gone, a new one on the same Redis: all 80 steps, the run's loss,
    per-layer norms and registration (layers, hyperparameters) are back without a new report."""
    reg = build.registration()
    reg.hyperparameters["lr"].number = 0.1
    publish.registration(reg)
    for step in range(80):
        publish.report(build.report(step, grad={"fc1": 1.0 + step}, loss=1.0 / (step + 1)))
    first = make_aggregator(history_reports=50)
    run_all(first)
    first.stop(2.0)

    second = make_aggregator(consumer="another", history_reports=50)
    run_all(second)
    assert len(second.state.runs[RUN].history) == 50  # the in-memory window: the latest 50 rows
    assert [r["step"] for r in second.history(RUN, None, None, 20)] == list(range(60, 80))  # from memory
    assert [r["step"] for r in second.history(RUN, None, None, 1000)] == list(range(80))  # more: from Redis
    rows = second.history(RUN, 0, None, 1000)  # before the window: read from Redis
    assert [r["step"] for r in rows] == list(range(80))
    assert rows[7]["layers"]["fc1"] == pytest.approx(8.0) and rows[7]["loss"] == pytest.approx(1 / 8)
    view = next(r for r in second.view().runs if r.run == RUN)
    assert view.step == 79 and view.loss == pytest.approx(1 / 80)
    detail = run_detail(view, [])
    assert {row["layer"]: row["grad_norm"] for row in detail["layers"]}["fc1"] == pytest.approx(80.0)
    assert detail["hyperparameters"] == {"lr": 0.1}


def test_a_run_this_replica_does_not_hold_is_read_from_redis(make_aggregator, build, publish, run_all,
                                                             redis_client):
    publish.registration(build.registration())
    for step in range(5):
        publish.report(build.report(step))
    run_all(make_aggregator())
    other = make_aggregator(consumer="idle")  # never ran: follows no run
    assert [r["step"] for r in other.history(RUN, None, None, 100)] == [0, 1, 2, 3, 4]
    assert other.history("nope", None, None, 100) is None
    assert redis_client.hget(registrations_key(RUN), "0") is not None
