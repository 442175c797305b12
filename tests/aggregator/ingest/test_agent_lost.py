"""Reports an agent lost before delivery, as its next delivered report says (`dropped_reports`), against a real
Redis: counted once (a redelivered report is a duplicate, its count too), kept with the run, and raised as
AgentDataLost, which more losses extend and keep_firing_s of quiet resolves."""

from __future__ import annotations

import json
import time

from gradwatch.streams import ALERTS_KEY

RUN = "lossy"


def agent_alerts(client) -> list[dict]:
    alerts = (json.loads(fields[b"alert"]) for _, fields in client.xrange(ALERTS_KEY))
    return [a for a in alerts if a["rule"] == "AgentDataLost"]


def drain(agg, rounds: int = 50) -> None:
    for _ in range(rounds):
        if agg.run_once() == 0:
            return


def test_a_loss_the_agent_announces_is_counted_once_and_alerted(make_aggregator, build, publish, redis_client):
    publish.registration(build.registration(run=RUN, rank=1))
    agg = make_aggregator(keep_firing_s=0.3)
    for step in range(3):
        publish.report(build.report(step, run=RUN, rank=1))
    drain(agg)
    assert agent_alerts(redis_client) == [] and agg.counters.get("agent_lost") == 0

    # steps 3..8 never arrived: the agent dropped them (sequences 4..9), and says so with step 9
    report = build.report(9, run=RUN, rank=1)
    report.dropped_reports = 6
    publish.report(report)
    publish.report(report)  # redelivered: a duplicate, and so is its count
    drain(agg)
    assert agg.counters.get("agent_lost") == 6 and agg.counters.get("duplicates") == 1
    assert agg.registry.get_sample_value("gradwatch_aggregator_agent_lost_total") == 6
    (run,) = [r for r in agg.view().runs if r.run == RUN]
    assert run.reports_lost == 6
    (alert,) = agent_alerts(redis_client)
    assert (alert["status"], alert["run"], alert["value"], alert["severity"], alert["layer"]) == (
        "firing", RUN, 6, "warning", "(run)")
    assert f"Run {RUN}: rank 1 lost 6 step reports before delivering them (6 in all" in alert["summary"]

    report = build.report(12, run=RUN, rank=1)
    report.dropped_reports = 2  # two more while it fires: the same incident
    publish.report(report)
    drain(agg)
    assert agg.counters.get("agent_lost") == 8 and len(agent_alerts(redis_client)) == 1
    time.sleep(0.35)
    agg.run_once()  # keep_firing_s without a further loss resolves it
    assert [(a["status"], a["value"]) for a in agent_alerts(redis_client)] == [("firing", 6), ("resolved", 8)]
    assert [r for r in agg.view().runs if r.run == RUN][0].reports_lost == 8
