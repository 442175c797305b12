"""A run's step history in Redis (aggregator/history.py): rows round-trip with NaN/Inf and evaluation steps,
writes are idempotent, and a restarted aggregator, one that took a run over, or one asked about steps
before its in-memory window serves every step of the run."""

from __future__ import annotations

import math

import pytest

from gradwatch.aggregator.history import HistoryStore
from gradwatch.aggregator.http import views
from gradwatch.aggregator.http.api import run_detail
from gradwatch.streams import history_key, history_steps_key, registrations_key

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


def rows_for(steps, nan_at=None):
    out = []
    for s in steps:
        g = math.nan if s == nan_at else float(s)
        out.append((s, 1000.0 + s, True, 1.0 / (s + 1), g, {"fc1": g, "fc2": 2.0 * s}, {}, {"fc1": 10.0 + s}))
    return out


def test_old_steps_fold_into_tiers_and_alert_windows_stay_whole(redis_client):
    """1,000 steps with a full-resolution window of 100: whole buckets before step 899 fold into 10-step buckets
    (890..899 straddles the window and stays), those
    before 0 (ten windows) would fold into 100-step ones; the 5 steps either side of a pinned alert step stay
    whole; a bucket holding a NaN reads NaN; the fold keeps min/mean/max exactly."""
    store = HistoryStore(redis_client)
    store.save(RUN, rows_for(range(1000), nan_at=123))
    store.save(RUN, [(500, 1500.0, False, 0.5, None, {}, {"accuracy": 0.5}, {})])  # an evaluation row
    store.pin(RUN, [300])
    while store.compact(RUN, latest=999, full_steps=100, window=5):
        pass
    rows = store.rows(RUN, limit=10_000)
    whole = [r for r in rows if len(r) == 8]
    tiers = [r for r in rows if len(r) == 9]
    assert [r[0] for r in whole if r[2]] == [*range(295, 306), *range(890, 1000)]
    assert [r[0] for r in whole if not r[2]] == [500]  # evaluation rows stay whole
    assert {r[8] for r in tiers} == {10}
    buckets = {r[0]: r for r in tiers}
    assert sorted(buckets) == list(range(0, 890, 10))  # 290 and 300 too: their steps outside the pin window
    b = buckets[40]  # steps 40..49: mean of fc1 = 44.5, of fc2 = 89
    assert b[5]["fc1"] == pytest.approx(44.5) and b[5]["fc2"] == pytest.approx(89.0) and b[7]["fc1"] == 54.5
    assert math.isnan(buckets[120][5]["fc1"]) and math.isnan(buckets[120][4])  # the NaN at step 123
    assert buckets[290][5]["fc1"] == pytest.approx(292.0)  # 290..294 folded, 295..299 kept whole
    store.compact(RUN, latest=999, full_steps=10, window=5)  # a later pass: older buckets fold into 100s
    while store.compact(RUN, latest=999, full_steps=10, window=5):
        pass
    rows = store.rows(RUN, limit=10_000)
    hundreds = {r[0]: r for r in rows if len(r) == 9 and r[8] == 100}
    assert 0 in hundreds and hundreds[0][5]["fc1"] == pytest.approx(49.5)  # steps 0..99 (no NaN there)
    assert math.isnan(hundreds[100][5]["fc1"])


def test_a_long_run_fits_the_stated_budget(redis_client):
    """Redis bytes per step and layer at each tier, for the README's memory budget."""
    store = HistoryStore(redis_client)
    layers = [f"blocks.{i}.fc" for i in range(200)]
    rows = [(s, float(s), True, 1.0, 1.0, dict.fromkeys(layers, 0.5 + s), {}, dict.fromkeys(layers, 3.0))
            for s in range(2000)]
    for i in range(0, len(rows), 250):
        store.save(RUN, rows[i:i + 250])

    def used(*keys):
        return sum(redis_client.memory_usage(k, samples=0) or 0 for k in keys)

    full = used(history_key(RUN), history_steps_key(RUN))
    per_full = full / (2000 * len(layers))
    while store.compact(RUN, latest=1999, full_steps=0, window=0):
        pass
    ten = used(f"{history_key(RUN)}-10", f"{history_key(RUN)}-10-steps") / (2000 * len(layers))
    assert per_full <= 64 and ten <= 64 / 10 * 1.5, (per_full, ten)


def test_the_aggregator_folds_old_steps_and_keeps_an_alerts_window(make_aggregator, build, publish, run_all):
    """history_full_steps 20: after 100 steps the aggregator folds the old ones into 10-step buckets; the
    steps within history_alert_window (3) of the NonFinite alert at step 40 stay whole; /steps serves both."""
    publish.registration(build.registration())
    for step in range(100):
        nan = {("fc1", "gradient"): 5} if step == 40 else None
        publish.report(build.report(step, grad={"fc1": 1.0 + step}, nonfinite=nan))
    agg = make_aggregator(history_full_steps=20, history_alert_window=3)
    run_all(agg)
    agg._compact_at = 0.0
    agg._compact()
    assert len(agg.history(RUN, 0, None, 1000)) == 100  # this replica's memory still holds every step whole
    rows = views.rows_of(agg.history_store.rows(RUN, limit=1000))  # what Redis keeps, and a new replica reads
    whole = [r["step"] for r in rows if "resolution" not in r]
    assert whole == [*range(37, 44), *range(70, 100)]  # the alert's window; whole buckets before 79 fold
    buckets = {r["step"]: r for r in rows if r.get("resolution") == 10}
    assert sorted(buckets) == [0, 10, 20, 30, 40, 50, 60]
    assert buckets[10]["layers"]["fc1"] == pytest.approx(15.5)  # the mean of 11..20
    assert buckets[30]["layers"]["fc1"] == pytest.approx(34.0)  # 30..36 folded (37..39 kept): mean of 31..37
    assert buckets[40]["layers"]["fc1"] == pytest.approx(47.5)  # 44..49 folded (40..43 kept)


def test_a_run_whose_setup_failed_is_set_up_at_the_next_discovery(make_aggregator, build, publish, run_all,
                                                                   monkeypatch):
    """Redis failing between winning a run's lease and reading its checkpoint and history: the run must not
    stay held but unread; the next discovery sets it up and applies its reports."""
    import redis

    publish.registration(build.registration())
    for step in range(3):
        publish.report(build.report(step))
    agg = make_aggregator()
    real = agg.history_store.rows
    calls = []

    def flaky(run, *args, **kwargs):
        calls.append(run)
        if len(calls) == 1:
            raise redis.ConnectionError("Redis restarting")
        return real(run, *args, **kwargs)

    monkeypatch.setattr(agg.history_store, "rows", flaky)
    for _ in range(3):
        try:
            agg.run_once()
        except redis.ConnectionError:
            pass
    run_all(agg)
    assert len(calls) >= 2 and [r["step"] for r in agg.history(RUN, None, None, 10)] == [0, 1, 2]


def test_runs_share_the_history_memory_budget_and_older_steps_come_from_redis(make_aggregator, build, publish,
                                                                             run_all):
    """history_memory_cells = 2,400 layer-steps: one 4-layer run keeps 600 steps in memory; three share it, 200
    each, and every one of their 300 steps is still served, the older ones from Redis. A run gone: the others
    keep more again."""
    runs = ["mem-a", "mem-b", "mem-c"]
    for run in runs:
        publish.registration(build.registration(run=run))
        for step in range(300):
            publish.report(build.report(step, run=run, grad={"fc1": 1.0 + step}))
    agg = make_aggregator(history_memory_cells=2_400)
    run_all(agg)
    assert {run: len(agg.state.runs[run].history) for run in runs} == dict.fromkeys(runs, 200)
    for run in runs:
        rows = agg.history(run, 0, None, 1000)
        assert [r["step"] for r in rows] == list(range(300))
        assert rows[10]["layers"]["fc1"] == pytest.approx(11.0)
    with agg._lock:
        agg.state.forget("mem-c")
        agg.state.forget("mem-b")
    assert agg.state.runs["mem-a"].history.maxlen == 600


def test_the_history_memory_budget_keeps_a_floor_of_steps_per_run(build):
    from gradwatch.aggregator.config import AggregatorConfig
    from gradwatch.aggregator.counters import Counters
    from gradwatch.aggregator.state import MIN_HISTORY_ROWS, State

    state = State(AggregatorConfig(history_memory_cells=10, history_reports=2_000), Counters())
    state.register("wide", build.registration(run="wide"))
    assert state.runs["wide"].history.maxlen == MIN_HISTORY_ROWS
    off = State(AggregatorConfig(history_memory_cells=0, history_reports=2_000), Counters())
    off.register("wide", build.registration(run="wide"))
    assert off.runs["wide"].history.maxlen == 2_000
