"""Dashboards as code: the committed JSON is what core/cli/dashboards.py generates (drift check), every
query is valid PromQL that names only metrics gradwatch exports or its recording rules define, and
every template variable it uses is defined."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gradwatch.aggregator.http.metrics import AggregatorCollector
from gradwatch.cli import grafana
from gradwatch.collector.telemetry import CollectorMetrics

SAMPLE = {"datasource": "prometheus", "run": "demo", "layer": ".*"}


@pytest.fixture(scope="module")
def models() -> dict[str, dict]:
    return grafana.dashboards()


def exported_metric_names(kit) -> set[str]:
    names = set()
    for family in AggregatorCollector(lambda: None).describe():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
        if family.type == "gaugehistogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_gcount", "_gsum"))
    registry = CollectorRegistry()
    CollectorMetrics(registry)
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
        if family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    rules = yaml.safe_load(kit.RULES.read_text())["groups"]
    names.update(rule["record"] for group in rules for rule in group["rules"] if "record" in rule)
    return names


def test_committed_json_matches_the_generator(tmp_path):
    written = grafana.generate(tmp_path)
    assert {p.name for p in written} == {f"{uid}.json" for uid in ("gradwatch-run-overview", "gradwatch-layers",
                                                                  "gradwatch-activations", "gradwatch-histograms",
                                                                  "gradwatch-runs-compared", "gradwatch-ingest")}
    assert grafana.drift(tmp_path) == []
    stale = grafana.drift()
    assert stale == [], f"deploy/grafana/dashboards is out of date ({stale}): run `gradwatch grafana generate`"


def test_drift_is_detected(tmp_path):
    grafana.generate(tmp_path)
    path = tmp_path / "gradwatch-layers.json"
    path.write_text(path.read_text().replace("Gradient norm per layer", "Edited by hand"))
    (tmp_path / "old-dashboard.json").write_text("{}")
    assert grafana.drift(tmp_path) == ["gradwatch-layers.json", "old-dashboard.json"]
    proc = subprocess.run([sys.executable, "-m", "gradwatch", "grafana", "generate", "--check", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "gradwatch-layers.json" in proc.stdout


def test_generated_files_cover_the_prometheus_rule_too(kit):
    proc = subprocess.run([sys.executable, str(kit.DEPLOY / "generate.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_queries_use_exported_metrics_only(kit, models):
    known = exported_metric_names(kit)
    for name, model in models.items():
        for where, expr in grafana.expressions(model):
            used = set(re.findall(r"\bgradwatch[a-z0-9_:]*", grafana.substitute(expr, SAMPLE)))
            assert used, f"{name} {where}: no gradwatch metric in {expr!r}"
            assert used <= known, f"{name} {where}: {sorted(used - known)} not exported"


def test_queries_are_valid_promql(kit, models, tmp_path):
    """promtool parses each query, as a recording rule."""
    promtool = kit.tool("promtool", "Debian's prometheus package")
    rules = [{"record": f"check:q{i}", "expr": grafana.substitute(expr, SAMPLE)}
             for i, (_, expr) in enumerate(e for m in models.values() for e in grafana.expressions(m))]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}))
    proc = kit.run([promtool, "check", "rules", str(tmp_path / "queries.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboards_have_variables_ids_and_alert_annotations(models):
    for name, model in models.items():
        variables = {v["name"] for v in model["templating"]["list"]}
        assert {"datasource", "run"} <= variables
        text = json.dumps(model)
        used = set(re.findall(r"\$\{?(\w+)", text)) - {"__rate_interval", "__all"}  # Grafana built-ins
        assert used <= variables, f"{name}: undefined variables {used - variables}"
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids)), name
        (annotation,) = model["annotations"]["list"]
        assert annotation["expr"].startswith("gradwatch_alert_firing") and annotation["titleFormat"] == "{{rule}}"
        for panel in model["panels"]:
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == "${datasource}"
    assert "layer" in {v["name"] for v in models["gradwatch-layers.json"]["templating"]["list"]}


def test_substitute_replaces_grafana_variables():
    assert grafana.substitute('rate(x{run=~"$run"}[$__rate_interval]) ${layer}', {"run": "a|b", "layer": "l"}) == \
        'rate(x{run=~"a|b"}[1m]) l'
    with pytest.raises(KeyError):
        grafana.substitute("x{run=~\"$unknown\"}", {})
