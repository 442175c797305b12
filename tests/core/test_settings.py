"""The configuration mechanism (core/settings.py) across components: one naming rule, every variable that
worked before still read, forms that agree with validate(), flags that exist, and the README's table
generated from the settings classes (drift check)."""

from __future__ import annotations

import argparse
import inspect
import math
import os
import subprocess
import sys
from dataclasses import MISSING, replace

import pytest

import gradwatch.agent
from gradwatch.agent.config import AgentConfig
from gradwatch.aggregator.__main__ import build_parser as aggregator_parser
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.cli import settings_table
from gradwatch.cli.stack import StackConfig
from gradwatch.collector.__main__ import add_arguments as collector_arguments
from gradwatch.collector.config import CollectorConfig
from gradwatch.settings import PREFIX, SHARED, ConfigError, variables

CLASSES = settings_table.settings_classes()
ALL = [v for cls in CLASSES for v in variables(cls)]
CLASS_OF = {cls.COMPONENT: cls for cls in CLASSES}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith(PREFIX) or name == "TORCHELASTIC_RUN_ID":
            monkeypatch.delenv(name)


def test_readme_table_is_generated_from_the_settings_classes():
    table = settings_table.readme_table(settings_table.README.read_text())
    assert table == settings_table.markdown(), ("README.md's configuration table is out of date: run "
                                                "python -m gradwatch.cli.settings_table")


def test_drift_is_detected(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(settings_table.README.read_text().replace("log every N-th optimizer step", "edited by hand"))
    assert settings_table.main(["--check", "--readme", str(readme)]) == 1
    assert settings_table.main(["--readme", str(readme)]) == 0
    assert settings_table.main(["--check", "--readme", str(readme)]) == 0
    assert readme.read_text() == settings_table.README.read_text()


def test_one_naming_rule():
    for v in ALL:
        rule = (f"{PREFIX}{v.field.upper()}" if v.field in SHARED
                else f"{PREFIX}{v.component.upper()}_{v.field.upper()}")
        assert v.name == rule, v
        assert v.setting.doc, f"{v.name} has no description for the README"
    canonical = {v.name for v in ALL}
    aliases = [alias for v in ALL for alias in v.setting.aliases]
    assert len(aliases) == len(set(aliases)) and not canonical & set(aliases)
    # A name read by several components is one of the shared settings, with one meaning.
    for name in canonical:
        fields = {v.field for v in ALL if v.name == name}
        assert len(fields) == 1 and (fields <= SHARED or sum(v.name == name for v in ALL) == 1), name


# Every variable that worked before the naming rule, and the field it sets (issue 15: no behaviour change).
BEFORE = {
    AgentConfig: {
        "GRADWATCH_COLLECTOR": "collector", "GRADWATCH_TOKEN": "token", "GRADWATCH_RUN": "run",
        "TORCHELASTIC_RUN_ID": "run", "GRADWATCH_EVERY": "every", "GRADWATCH_HISTOGRAM": "histogram",
        "GRADWATCH_ACTIVATIONS": "activations", "GRADWATCH_SCHEDULE": "schedule",
        "GRADWATCH_BURST_STEPS": "burst_steps", "GRADWATCH_SELECT": "select",
        "GRADWATCH_AGENT_QUEUE_SIZE": "queue_size", "GRADWATCH_AGENT_QUEUE_BYTES": "queue_bytes",
        "GRADWATCH_EXPORT_TIMEOUT_S": "export_timeout_s", "GRADWATCH_TLS": "tls", "GRADWATCH_TLS_CA": "tls_ca_file",
        "GRADWATCH_TLS_CERT": "tls_cert_file", "GRADWATCH_TLS_KEY": "tls_key_file",
        "GRADWATCH_UPDATES_MAX_BYTES": "updates_max_bytes", "GRADWATCH_LABELS_MAX_CLASSES": "labels_max_classes",
        "GRADWATCH_UNITS_MAX": "units_max", "GRADWATCH_KERNELS": "kernels",
    },
    CollectorConfig: {
        "GRADWATCH_COLLECTOR_LISTEN": "listen", "GRADWATCH_REDIS_URL": "redis_url",
        "GRADWATCH_REDIS_CLUSTER": "redis_cluster", "GRADWATCH_STREAM_MAXLEN": "stream_maxlen",
        "GRADWATCH_MAX_MESSAGE_BYTES": "max_message_bytes", "GRADWATCH_MAX_INFLIGHT_BYTES": "max_inflight_bytes",
        "GRADWATCH_COLLECTOR_RETRY_AFTER_S": "retry_after_s", "GRADWATCH_TOKEN": "token",
        "GRADWATCH_COLLECTOR_METRICS_LISTEN": "metrics_listen", "GRADWATCH_COLLECTOR_TLS_CERT": "tls_cert_file",
        "GRADWATCH_COLLECTOR_TLS_KEY": "tls_key_file", "GRADWATCH_COLLECTOR_TLS_CLIENT_CA": "tls_client_ca_file",
    },
    AggregatorConfig: {"GRADWATCH_REDIS_URL": "redis_url", "GRADWATCH_ALERTMANAGER_URL": "alertmanager_url",
                       **{f"GRADWATCH_AGGREGATOR_{v.field.upper()}": v.field for v in variables(AggregatorConfig)
                          if v.field not in ("redis_url", "alertmanager_url", "redis_cluster")}},  # the last: new
    StackConfig: {"GRADWATCH_REDIS_URL": "redis_url", "GRADWATCH_DATA_DIR": "data_dir",
                  "GRADWATCH_ALERTMANAGER_URL": "alertmanager_url", "GRADWATCH_TOKEN": "token",
                  "GRADWATCH_REDIS_SERVER": "redis_server"},
}


def sample(v, tmp_path) -> tuple[str, object]:
    """A valid value of the variable (as text) and what it parses to."""
    default = v.default
    if "readable file" in v.form.text:
        path = tmp_path / "file.pem"
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        return str(path), str(path)
    if v.form.choices:
        return v.form.choices[-1], v.form.choices[-1]
    if v.form.type is bool:
        return ("no", False) if default else ("yes", True)
    if v.form.type in (int, float):
        value = v.form.type((v.form.ge or 0) + (v.form.gt or 0) + 2)
        return str(value), value
    if "URL" in v.form.text:
        example = v.form.text.rsplit("e.g. ", 1)[1]
        return example, example
    if "host:port" in v.form.text:
        return "127.0.0.1:5555", "127.0.0.1:5555"
    if "spec" in v.form.text:
        text = "every:7" if v.field == "schedule" else "preset:business"
        return text, text
    return "a-value", "a-value"


@pytest.mark.parametrize(("cls", "name", "field"), [(cls, name, field) for cls, names in BEFORE.items()
                                                     for name, field in names.items()])
def test_every_variable_that_worked_before_still_works(monkeypatch, tmp_path, cls, name, field):
    (v,) = [v for v in variables(cls) if v.field == field]
    assert name in v.names
    text, value = sample(v, tmp_path)
    monkeypatch.setenv(name, text)
    assert getattr(cls.from_env(), field) == value


@pytest.mark.parametrize("v", ALL, ids=lambda v: v.name)
def test_every_canonical_variable_is_read(monkeypatch, tmp_path, v):
    text, value = sample(v, tmp_path)
    monkeypatch.setenv(v.name, text)
    assert getattr(CLASS_OF[v.component].from_env(), v.field) == value


# validate() refuses some values only together with another setting: those are relaxed to test the bound.
PARTNERS = {"queue_size": {"batch_reports": 1}, "queue_bytes": {"batch_bytes": 1},
            "max_inflight_bytes": {"max_message_bytes": 1}, "lease_ttl_ms": {"discover_interval_s": 0.0},
            "exploding_window": {"exploding_min_history": 1}}


def bounds(v) -> tuple[object, object]:
    """The value on the form's bound and the nearest value past it."""
    step = 1 if v.form.type is int else 1e-6
    if v.form.ge is not None:
        return v.form.type(v.form.ge), v.form.type(v.form.ge - step)
    if v.form.gt is not None:
        return v.form.type(v.form.gt + step), v.form.type(v.form.gt)
    return v.form.type(v.form.le), v.form.type(v.form.le + step)


BOUNDED = [v for v in ALL if (v.form.ge, v.form.gt, v.form.le) != (None, None, None)]


@pytest.mark.parametrize("v", BOUNDED, ids=lambda v: v.name)
def test_the_environment_accepts_what_validate_accepts(v):
    """A variable is never stricter than validate() (no behaviour change) nor laxer (fails at start either way)."""
    cls = CLASS_OF[v.component]
    inside, outside = bounds(v)
    assert v.form.accepts(inside) and not v.form.accepts(outside)
    cls(**{**PARTNERS.get(v.field, {}), v.field: inside}).validate()
    with pytest.raises(ConfigError):
        cls(**{**PARTNERS.get(v.field, {}), v.field: outside}).validate()


@pytest.mark.parametrize("v", [v for v in ALL if v.default not in (None, MISSING, "")], ids=lambda v: v.name)
def test_defaults_have_their_variables_form(v):
    assert v.form.accepts(v.default)
    if v.form.check is not None:
        v.form.check(v.default)


def test_choices_are_the_agents_kernel_modes():
    from gradwatch.agent.stats.kernels import MODES

    (kernels,) = [v for v in variables(AgentConfig) if v.field == "kernels"]
    assert kernels.form.choices == MODES
    for mode in MODES:
        AgentConfig(kernels=mode).validate()


def test_declared_flags_exist():
    collector = argparse.ArgumentParser()
    collector_arguments(collector)
    from gradwatch.cli.main import _stack_args

    up = argparse.ArgumentParser()
    _stack_args(up)
    parsers = {"collector": collector, "aggregator": aggregator_parser(), "up": up}
    keywords = inspect.signature(gradwatch.agent.watch).parameters
    for v in ALL:
        flag = v.setting.flag
        if v.component == "agent":
            assert not flag or (flag == f"watch({v.field}=)" and v.field in keywords), v
        elif flag:
            action = parsers[v.component]._option_string_actions[flag]
            assert action.dest == v.field or action.dest == flag[2:].replace("-", "_"), v


def test_gradwatch_up_stops_on_a_bad_variable():
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    proc = subprocess.run([sys.executable, "-m", "gradwatch.cli.main", "up"], capture_output=True, text=True,
                          timeout=60, env={**env, "GRADWATCH_UP_LOG_LEVEL": "LOUD"})
    assert proc.returncode == 2
    assert "gradwatch up: invalid GRADWATCH_UP_LOG_LEVEL='LOUD': expected one of DEBUG, INFO, WARNING, ERROR" in \
        proc.stderr


@pytest.mark.parametrize(("cls", "variable", "value", "expected"), [
    (StackConfig, "GRADWATCH_DATA_DIR", __file__, "directory (created if missing) (exists and is not a directory)"),
    (StackConfig, "GRADWATCH_UP_COLLECTOR_LISTEN", "localhost", "host:port"),
    (StackConfig, "GRADWATCH_REDIS_URL", "redis.example:6379", "redis://, rediss://, unix:// URL"),
    (StackConfig, "GRADWATCH_REDIS_SERVER", "/no/such/redis-server", "path of a readable file"),
    (CollectorConfig, "GRADWATCH_TOKEN", "", None),  # empty: unset, token stays None
])
def test_stack_and_shared_values(monkeypatch, cls, variable, value, expected):
    monkeypatch.setenv(variable, value)
    if expected is None:
        assert cls.from_env().token is None
        return
    with pytest.raises(ConfigError) as e:
        cls.from_env()
    assert f"invalid {variable}={value!r}" in str(e.value) and f"expected {expected}" in str(e.value)


def test_every_bad_variable_is_named_at_once(monkeypatch):
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_READ_COUNT", "many")
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_KEEP_FIRING_S", "-1")
    message = str(pytest.raises(ConfigError, AggregatorConfig.from_env).value)
    assert "GRADWATCH_AGGREGATOR_READ_COUNT='many'" in message and "GRADWATCH_AGGREGATOR_KEEP_FIRING_S='-1'" in message


def test_secrets_stay_secret(monkeypatch):
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_API_TOKEN", "s3cret")
    config = AggregatorConfig.from_env()
    assert config.api_token == "s3cret" and "s3cret" not in repr(config)
    assert "s3cret" not in repr(replace(StackConfig(), token="s3cret"))


def test_inf_where_a_number_may_be_unbounded(monkeypatch):
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_EXPLODING_ABS_LIMIT", "inf")
    assert math.isinf(AggregatorConfig.from_env().validate().exploding_abs_limit)


def test_importing_the_mechanism_imports_no_pydantic():
    code = "import sys, gradwatch.settings; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "False", out.stderr
