"""The stream loop against a real Redis: state to metrics, acks, redelivery, duplicates, dead letters."""

from __future__ import annotations

import json
import math
import time

import pytest

from gradwatch.aggregator.ingest.leases import applied_key, lease_key
from gradwatch.aggregator.service import Aggregator
from gradwatch.cli.redis_server import free_port
from gradwatch.streams import AGGREGATOR_GROUP, ALERTS_KEY, FIELD_REPORT, dead_letter_key, reports_key

RUN = "demo"


def sample(agg: Aggregator, name: str, **labels) -> float | None:
    return agg.registry.get_sample_value(name, labels)


def pending(client, run: str = RUN) -> int:
    return client.xpending(reports_key(run), AGGREGATOR_GROUP)["pending"]


def alerts_in_stream(client) -> list[dict]:
    return [json.loads(fields[b"alert"]) for _, fields in client.xrange(ALERTS_KEY)]


def test_reports_become_metrics_and_are_acked(make_aggregator, build, publish, redis_client, run_all):
    publish.registration(build.registration())
    for step in range(3):
        publish.report(build.report(step, grad={"fc2": 3.0 + step}, param=2.0, loss=2.0 - step, lr=0.01))
    agg = make_aggregator()
    assert run_all(agg) == 4

    assert sample(agg, "gradwatch_layer_grad_norm", run=RUN, layer="fc2") == pytest.approx(5.0)
    assert sample(agg, "gradwatch_layer_grad_norm", run=RUN, layer="fc1") == pytest.approx(1.0)
    assert sample(agg, "gradwatch_layer_param_norm", run=RUN, layer="head") == pytest.approx(2.0)
    assert sample(agg, "gradwatch_layer_nonfinite_values", run=RUN, layer="fc2", kind="gradient") == 0
    assert sample(agg, "gradwatch_run_loss", run=RUN) == pytest.approx(0.0)
    assert sample(agg, "gradwatch_run_step", run=RUN) == 2
    assert sample(agg, "gradwatch_run_learning_rate", run=RUN) == pytest.approx(0.01)
    assert sample(agg, "gradwatch_run_grad_norm", run=RUN) == pytest.approx(math.sqrt(25 + 3))
    assert sample(agg, "gradwatch_run_steps_per_second", run=RUN) == pytest.approx(10.0)
    assert sample(agg, "gradwatch_run_last_report_timestamp_seconds", run=RUN) == pytest.approx(1_700_000_000.2)
    assert sample(agg, "gradwatch_aggregator_reports_total") == 3
    assert sample(agg, "gradwatch_aggregator_registrations_total") == 1
    assert sample(agg, "gradwatch_aggregator_alerts_total", rule="NonFinite") == 0
    assert pending(redis_client) == 0


def test_same_report_twice_is_applied_once(make_aggregator, build, publish, redis_client, run_all):
    publish.registration(build.registration())
    bad = build.report(7, nonfinite={("fc1", "gradient"): 2})
    publish.report(bad)
    publish.report(bad)  # the collector retried a write whose reply was lost
    agg = make_aggregator()
    run_all(agg)
    assert sample(agg, "gradwatch_aggregator_reports_total") == 1
    assert sample(agg, "gradwatch_aggregator_duplicates_total") == 1
    assert sample(agg, "gradwatch_aggregator_alerts_total", rule="NonFinite") == 1
    assert len(alerts_in_stream(redis_client)) == 1
    assert pending(redis_client) == 0


def test_entries_of_a_dead_consumer_are_claimed_and_processed_once(make_aggregator, build, publish, redis_client,
                                                                  run_all):
    publish.registration(build.registration())
    for step in range(5):
        publish.report(build.report(step, grad=2.0))
    key = reports_key(RUN)
    redis_client.xgroup_create(key, AGGREGATOR_GROUP, id="0", mkstream=True)
    read = redis_client.xreadgroup(AGGREGATOR_GROUP, "crashed", {key: ">"}, count=100)
    assert len(read[0][1]) == 6 and pending(redis_client) == 6  # read, never acked: the consumer died
    redis_client.set(lease_key(RUN), "crashed", px=300)  # ... holding the run's lease

    agg = make_aggregator()
    assert run_all(agg) == 0  # the lease is not ours until it expires
    time.sleep(0.35)
    assert run_all(agg) == 6  # taken over: what "crashed" left pending is claimed at once
    assert redis_client.get(lease_key(RUN)) == agg.config.consumer.encode()
    assert sample(agg, "gradwatch_aggregator_claimed_total") == 6
    assert sample(agg, "gradwatch_aggregator_reports_total") == 5
    assert sample(agg, "gradwatch_layer_grad_norm", run=RUN, layer="fc1") == pytest.approx(2.0)
    assert pending(redis_client) == 0
    assert run_all(agg) == 0
    assert sample(agg, "gradwatch_aggregator_reports_total") == 5


def test_malformed_entries_go_to_the_dead_letter_stream(make_aggregator, build, publish, redis_client, run_all):
    publish.registration(build.registration())
    publish.raw(RUN, {FIELD_REPORT: b"\xff\xff\xff not protobuf"})
    publish.raw(RUN, {b"unexpected": b"1"})
    publish.raw(RUN, {FIELD_REPORT: build.report(0, run="other").SerializeToString()})
    publish.report(build.report(1))
    agg = make_aggregator()
    assert run_all(agg) == 5
    assert sample(agg, "gradwatch_aggregator_decode_errors_total") == 3
    assert sample(agg, "gradwatch_aggregator_reports_total") == 1  # the loop went on past them
    dead = redis_client.xrange(dead_letter_key(RUN))
    assert len(dead) == 3
    assert dead[0][1][FIELD_REPORT] == b"\xff\xff\xff not protobuf"
    assert b"DecodeError" in dead[0][1][b"dead_error"] and dead[0][1][b"dead_stream"] == reports_key(RUN).encode()
    assert b"other" in dead[2][1][b"dead_error"]
    assert pending(redis_client) == 0


def test_alert_fires_once_and_resolves_in_stream_and_metrics(make_aggregator, build, publish, redis_client, run_all):
    publish.registration(build.registration())
    agg = make_aggregator(keep_firing_s=0)
    for step in range(3):
        publish.report(build.report(step, nonfinite={("fc1", "gradient"): 4, ("head", "gradient"): 1}))
    run_all(agg)
    assert sample(agg, "gradwatch_alert_firing", run=RUN, rule="NonFinite", layer="head") == 1
    assert sample(agg, "gradwatch_layer_nonfinite_values", run=RUN, layer="fc1", kind="gradient") == 4
    (alert,) = alerts_in_stream(redis_client)
    assert {k: alert[k] for k in ("rule", "status", "run", "step", "rank", "layer", "tensor", "severity")} == {
        "rule": "NonFinite", "status": "firing", "run": RUN, "step": 0, "rank": 0, "layer": "head",
        "tensor": "head.weight.grad", "severity": "critical"}
    assert alert["summary"].startswith("NaN/Inf at step 0 started in layer head")
    assert alert["value"] == 1 and alert["threshold"] == 0 and alert["starts_at"] and alert["ends_at"] is None

    for step in range(3, 8):
        publish.report(build.report(step))
    run_all(agg)
    alerts = alerts_in_stream(redis_client)
    assert [a["status"] for a in alerts] == ["firing", "resolved"]
    assert alerts[1]["step"] == 7 and alerts[1]["ends_at"]
    assert sample(agg, "gradwatch_alert_firing", run=RUN, rule="NonFinite", layer="head") is None
    assert sample(agg, "gradwatch_aggregator_alerts_total", rule="NonFinite") == 1


def test_missing_dictionary_is_fetched_from_the_registrations_hash(make_aggregator, build, publish, run_all):
    publish.registration(build.registration(), stream=False)  # the "g" entry was trimmed away
    publish.report(build.report(0, grad={"fc2": 4.0}))
    agg = make_aggregator()
    run_all(agg)
    assert sample(agg, "gradwatch_layer_grad_norm", run=RUN, layer="fc2") == pytest.approx(4.0)
    assert sample(agg, "gradwatch_aggregator_unregistered_reports_total") == 0


def test_without_any_dictionary_scalars_and_tensor_ids_still_work(make_aggregator, build, publish, redis_client,
                                                                  run_all):
    publish.report(build.report(0, loss=1.5, nonfinite={("fc1", "gradient"): 1}))
    agg = make_aggregator()
    run_all(agg)
    assert sample(agg, "gradwatch_run_loss", run=RUN) == 1.5
    assert sample(agg, "gradwatch_aggregator_unregistered_reports_total") == 1
    assert sample(agg, "gradwatch_layer_nonfinite_values", run=RUN, layer="tensor_12", kind="unspecified") == 1
    (alert,) = alerts_in_stream(redis_client)
    assert alert["layer"] == "tensor_12"


def test_layer_series_budget(make_aggregator, build, publish, run_all):
    publish.registration(build.registration())
    publish.report(build.report(0))
    agg = make_aggregator(max_layer_series=2)
    run_all(agg)
    layers = [layer for layer in ("embed", "fc1", "fc2", "head")
              if sample(agg, "gradwatch_layer_grad_norm", run=RUN, layer=layer) is not None]
    assert len(layers) == 2
    assert sample(agg, "gradwatch_aggregator_series_dropped_total") == 2
    assert sample(agg, "gradwatch_aggregator_layer_series") == 2


def test_restarted_agent_numbers_from_one_again(make_aggregator, build, publish, run_all):
    publish.registration(build.registration())
    for step in range(3):
        publish.report(build.report(step, seq=step + 1))
    publish.registration(build.registration(start_s=1_700_000_500.0))
    for step in range(3, 5):
        publish.report(build.report(step, seq=step - 2))
    agg = make_aggregator()
    run_all(agg)
    assert sample(agg, "gradwatch_aggregator_reports_total") == 5
    assert sample(agg, "gradwatch_aggregator_duplicates_total") == 0


def test_quiet_runs_expire(make_aggregator, build, publish, run_all):
    publish.registration(build.registration())
    publish.report(build.report(0))
    agg = make_aggregator(run_expiry_s=0.3)
    run_all(agg)
    assert sample(agg, "gradwatch_run_step", run=RUN) == 0
    time.sleep(0.4)
    run_all(agg)
    assert sample(agg, "gradwatch_run_step", run=RUN) is None
    assert sample(agg, "gradwatch_aggregator_runs_expired_total") == 1
    assert sample(agg, "gradwatch_aggregator_layer_series") == 0


def test_redis_down_is_counted_not_raised(make_aggregator):
    agg = make_aggregator(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert agg.run_once() == 0
    assert sample(agg, "gradwatch_aggregator_redis_errors_total") == 1


def test_deleted_stream_recreates_its_group(make_aggregator, build, publish, redis_client, run_all):
    publish.registration(build.registration())
    agg = make_aggregator()
    run_all(agg)
    redis_client.delete(reports_key(RUN))
    publish.report(build.report(0))  # recreates the stream, without the group
    run_all(agg)
    run_all(agg)
    assert sample(agg, "gradwatch_aggregator_reports_total") == 1


def test_background_thread_processes_until_stopped(make_aggregator, build, publish):
    agg = make_aggregator().start()
    publish.registration(build.registration())
    publish.report(build.report(0))
    deadline = time.monotonic() + 5
    while sample(agg, "gradwatch_aggregator_reports_total") != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sample(agg, "gradwatch_aggregator_reports_total") == 1
    agg.stop(2.0)
    agg.stop(2.0)  # idempotent
    assert not agg._thread.is_alive()


def test_claimed_entries_trimmed_from_the_stream_are_acked(make_aggregator, build, publish, redis_client, run_all):
    for step in range(4):
        publish.report(build.report(step))
    key = reports_key(RUN)
    redis_client.xgroup_create(key, AGGREGATOR_GROUP, id="0", mkstream=True)
    redis_client.xreadgroup(AGGREGATOR_GROUP, "crashed", {key: ">"}, count=100)
    redis_client.xtrim(key, maxlen=1, approximate=False)  # MAXLEN ~ trimmed three of them meanwhile
    agg = make_aggregator(claim_idle_ms=10)
    time.sleep(0.05)
    run_all(agg)
    assert sample(agg, "gradwatch_aggregator_reports_total") == 1
    assert pending(redis_client) == 0


def test_stalled_run_is_alerted_by_the_loop_at_the_discovery_interval(make_aggregator, build, publish, redis_client,
                                                                      run_all, tmp_path):
    rules = tmp_path / "rules.toml"
    rules.write_text("[StalledTraining]\nthreshold_s = 0.3\n")
    publish.registration(build.registration())
    agg = make_aggregator(keep_firing_s=0, rules=str(rules))
    publish.report(build.report(0))
    run_all(agg)
    assert alerts_in_stream(redis_client) == []
    time.sleep(0.5)
    agg.run_once()
    (alert,) = alerts_in_stream(redis_client)
    assert (alert["rule"], alert["status"], alert["run"], alert["layer"]) == ("StalledTraining", "firing", RUN, "(run)")
    assert sample(agg, "gradwatch_alert_firing", run=RUN, rule="StalledTraining", layer="(run)") == 1
    publish.report(build.report(1))
    run_all(agg)
    assert [a["status"] for a in alerts_in_stream(redis_client)] == ["firing", "resolved"]


def test_a_failed_commit_is_retried_alone_and_counts_nothing_twice(make_aggregator, build, publish, redis_client,
                                                                   run_all):
    # One round trip commits several runs (on a cluster, several nodes); when one run's commit fails (its node
    # down) the others took effect: the retry must run only the failed one, or their totals would count twice.
    for run in ("good", "bad"):
        publish.registration(build.registration(run=run))
        publish.report(build.report(0, run=run))
    agg = make_aggregator()
    save = agg.history_store.save

    def save_then_break(run, rows):  # after discovery read the applied hash, before the commit writes it
        save(run, rows)
        if run == "bad" and not redis_client.exists(applied_key("bad")):
            redis_client.set(applied_key("bad"), "not a hash")  # the bad run's commit now fails, the good one's not

    agg.history_store.save = save_then_break
    agg.committer._backoff = lambda: redis_client.delete(applied_key("bad"))  # the node is back before the retry
    assert run_all(agg) == 4
    for run in ("good", "bad"):
        assert int(redis_client.hget(applied_key(run), "reports")) == 1 and pending(redis_client, run) == 0
    assert int(redis_client.hget(applied_key("good"), "acked")) == 2
    assert sample(agg, "gradwatch_aggregator_redis_errors_total") == 1
