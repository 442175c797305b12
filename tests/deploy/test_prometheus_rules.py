"""deploy/prometheus: promtool checks the configuration and the rules, and runs the rule unit tests
(every alert firing and not firing); a deliberately broken copy of the rules must fail them; the lag alert fires on
what a real aggregator behind a real Redis backlog exposes."""

from __future__ import annotations

import shutil
import time

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.aggregator.backlog import BacklogMeter
from gradwatch.aggregator.http.metrics import AggregatorCollector
from gradwatch.streams import FIELD_REGISTRATION, FIELD_REPORT, RUNS_KEY, reports_key


def promtool(kit) -> str:
    return kit.tool("promtool", "Debian's prometheus package")


def test_rules_are_valid(kit):
    proc = kit.run([promtool(kit), "check", "rules", str(kit.RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_prometheus_config_is_valid(kit, tmp_path):
    """promtool also checks that the scrape jobs' credentials files exist: stand-ins take the place of the read
    tokens the compose stack mounts, and the rule files are named from here."""
    config = yaml.safe_load((kit.DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(kit.DEPLOY / "prometheus" / pattern) for pattern in config["rule_files"]]
    for job in config["scrape_configs"]:
        if "authorization" in job:
            stand_in = tmp_path / job["authorization"]["credentials_file"].rpartition("/")[2]
            stand_in.write_text("token")
            job["authorization"]["credentials_file"] = str(stand_in)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = kit.run([promtool(kit), "check", "config", str(tmp_path / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_unit_tests_pass(kit):
    proc = kit.run([promtool(kit), "test", "rules", "gradwatch.test.yml"], cwd=kit.DEPLOY / "prometheus" / "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rule_unit_tests_catch_a_broken_rule(kit, tmp_path):
    """The unit tests bite: an ExplodingGradient rule that never fires fails them."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    original = kit.RULES.read_text()
    broken = original.replace('(gradwatch_alert_firing{rule="ExplodingGradient"}) > 0',
                              '(gradwatch_alert_firing{rule="ExplodingGradient"}) > 1')
    assert broken != original
    (tmp_path / "rules" / kit.RULES.name).write_text(broken)
    shutil.copy(kit.DEPLOY / "prometheus" / "tests" / "gradwatch.test.yml", tmp_path / "tests")
    proc = kit.run([promtool(kit), "test", "rules", "gradwatch.test.yml"], cwd=tmp_path / "tests")
    assert proc.returncode != 0
    assert "ExplodingGradient" in proc.stdout + proc.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing(kit):
    alerts = {rule["alert"] for group in yaml.safe_load(kit.RULES.read_text())["groups"] for rule in group["rules"]
              if "alert" in rule}
    tests = yaml.safe_load((kit.DEPLOY / "prometheus" / "tests" / "gradwatch.test.yml").read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    assert alerts == {c["alertname"] for c in cases if c["exp_alerts"]} == {c["alertname"] for c in cases
                                                                               if not c["exp_alerts"]}
    assert {"ExplodingGradient", "NonFinite", "StalledTraining", "GradwatchIngestRefusals",
            "GradwatchAggregatorLag"} <= alerts


def humanize_duration(seconds: int) -> str:
    """Prometheus' humanizeDuration for whole seconds under a day."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m {secs}s" if hours else f"{minutes}m {secs}s" if minutes else f"{secs}s"


def test_lag_alert_fires_on_what_an_aggregator_behind_a_real_backlog_exposes(kit, tmp_path, make_aggregator, build,
                                                                              redis_client):
    """An aggregator behind a real Redis stream: 31 entries the collector wrote two minutes ago, read 5 per batch.
    What its /metrics says after one batch, held over the next scrapes (it reads nothing more of them), fires
    GradwatchAggregatorLag under promtool after 2 minutes; what it says once it caught up resolves it."""
    run, key = "lagging", reports_key("lagging")
    start_ms = int((time.time() - 120) * 1000)
    redis_client.xadd(key, {FIELD_REGISTRATION: build.registration(run=run).SerializeToString()}, id=f"{start_ms}-0")
    for step in range(30):
        redis_client.xadd(key, {FIELD_REPORT: build.report(step, run=run).SerializeToString()},
                          id=f"{start_ms + 1 + step}-0")
    redis_client.zadd(RUNS_KEY, {run: time.time()})
    agg = make_aggregator(read_count=5)
    meter = BacklogMeter(agg.client, agg.counters)
    registry = CollectorRegistry()
    registry.register(AggregatorCollector(agg.view, agg.config, meter.read))

    def lag() -> float:
        meter.update({key: run})
        text = generate_latest(registry).decode()
        (value,) = [s.value for family in text_string_to_metric_families(text) for s in family.samples
                    if s.name == "gradwatch_run_backlog_seconds" and s.labels == {"run": run}]
        return value

    agg.run_once()
    behind = int(lag())
    while agg.run_once():
        pass
    caught_up = lag()
    assert behind >= 119 and caught_up == 0

    labels = f'run="{run}",job="gradwatch-aggregator",instance="agg:4772"'
    expected = {"alertname": "GradwatchAggregatorLag", "severity": "warning", "source": "prometheus", "run": run,
                "job": "gradwatch-aggregator", "instance": "agg:4772"}
    rule = next(r for group in yaml.safe_load(kit.RULES.read_text())["groups"] for r in group["rules"]
                if r.get("alert") == "GradwatchAggregatorLag")
    description = " ".join(rule["annotations"]["description"].replace("{{ $labels.instance }}", "agg:4772")
                           .replace("{{ $labels.run }}", run).split())
    tests = {"rule_files": [str(kit.RULES)], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        # 16 scrapes behind (the age growing 15 s a scrape), then caught up
        "input_series": [{"series": f"gradwatch_run_backlog_seconds{{{labels}}}",
                          "values": f"{behind}+15x16 {caught_up:.0f}x12"}],
        "alert_rule_test": [
            {"eval_time": "1m45s", "alertname": "GradwatchAggregatorLag", "exp_alerts": []},
            {"eval_time": "3m", "alertname": "GradwatchAggregatorLag", "exp_alerts": [{
                "exp_labels": expected,
                "exp_annotations": {"summary": f"The aggregator is {humanize_duration(behind + 180)} behind run {run}",
                                    "description": description}}]},
            {"eval_time": "6m", "alertname": "GradwatchAggregatorLag", "exp_alerts": []},
        ]}]}
    (tmp_path / "lag.test.yml").write_text(yaml.safe_dump(tests, width=1000))
    proc = kit.run([promtool(kit), "test", "rules", "lag.test.yml"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
