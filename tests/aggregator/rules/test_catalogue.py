"""The rules file: the example loads and equals the defaults, overrides apply, mistakes are named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gradwatch.aggregator.__main__ import run
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.rules.catalogue import CATALOGUE, RuleEngine, load_rules
from gradwatch.settings import ConfigError

EXAMPLE = Path(__file__).parents[3] / "aggregator" / "rules" / "example.toml"


def rules_file(tmp_path, text: str) -> str:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return str(path)


def test_example_file_lists_every_rule_with_its_defaults():
    defaults = load_rules(AggregatorConfig())
    example = load_rules(AggregatorConfig(rules=str(EXAMPLE)).validate())
    assert list(example) == [rule.name for rule in CATALOGUE]
    assert example == defaults
    text = EXAMPLE.read_text()
    for rule in CATALOGUE:
        assert f"[{rule.name}]" in text
        for key in rule.defaults(AggregatorConfig()):
            assert f"\n{key} = " in text, (rule.name, key)


def test_defaults_enable_every_rule():
    assert [r.name for r in RuleEngine(AggregatorConfig()).rules] == [rule.name for rule in CATALOGUE]


def test_overrides_apply(tmp_path, monkeypatch):
    path = rules_file(tmp_path, """
[LossSpike]
ratio = 5          # an integer is a valid number
severity = "critical"
cooldown_steps = 0

[DeadReLU]
enabled = false

[UnchangedTensor]
layers = { exclude = ["backbone.*"] }
""")
    monkeypatch.setenv("GRADWATCH_AGGREGATOR_RULES", path)
    config = AggregatorConfig.from_env().validate()
    settings = load_rules(config)
    spike = settings["LossSpike"]
    assert (spike.params["ratio"], spike.severity, spike.cooldown_steps, spike.params["window"]) == (5.0, "critical",
                                                                                                     0, 50)
    assert settings["UnchangedTensor"].exclude == ("backbone.*",) and settings["UnchangedTensor"].include == ("*",)
    engine = RuleEngine(config)
    assert "DeadReLU" not in [r.name for r in engine.rules]
    (rule,) = [r for r in engine.rules if r.name == "UnchangedTensor"]
    assert not rule.layers("backbone.layer1") and rule.layers("head")


def test_exploding_environment_settings_are_the_defaults_of_its_table():
    settings = load_rules(AggregatorConfig(exploding_ratio=20.0))
    assert settings["ExplodingGradient"].params["ratio"] == 20.0


@pytest.mark.parametrize(("text", "message"), [
    ("[LossSpikes]\nratio = 3\n", "unknown rule LossSpikes; the rules are NonFinite"),
    ("[LossSpike]\nration = 3\n", "[LossSpike] unknown key ration; expected one of enabled"),
    ("[LossSpike]\nlayers = {include = ['x']}\n", "[LossSpike] unknown key layers"),
    ("[LossSpike]\nratio = 'high'\n", "[LossSpike] ratio: expected a number, not 'high'"),
    ("[LossSpike]\nratio = 0.5\n", "[LossSpike] ratio: expected a factor > 1"),
    ("[LossSpike]\nwindow = 0\n", "[LossSpike] window: expected an integer >= 1"),
    ("[LossSpike]\nwindow = 2.5\n", "[LossSpike] window: expected an integer"),
    ("[DeadReLU]\nenabled = 1\n", "[DeadReLU] enabled: expected true or false"),
    ("[DeadReLU]\nseverity = 'page'\n", "[DeadReLU] severity: expected one of info, warning, critical"),
    ("[DeadReLU]\nmin_zero_fraction = 2.0\n", "[DeadReLU] min_zero_fraction: expected a fraction in (0, 1]"),
    ("[DeadReLU]\nlayers = {only = ['x']}\n", "[DeadReLU] layers: expected {include"),
    ("[AllZero]\nkinds = ['weights']\n", "[AllZero] kinds: expected tensor kinds among parameter"),
    ("[TensorVariance]\nmin_std = 10.0\nmax_std = 1.0\n", "expected 0 <= min_std < max_std"),
    ("[StalledTraining]\nresolve_after_steps = 0\n", "resolve_after_steps: expected a number >= 1"),
    ("DeadReLU = 3\n", "DeadReLU: expected a table [DeadReLU]"),
    ("[DeadReLU\n", "cannot read it"),
])
def test_mistakes_are_start_up_errors_that_name_them(tmp_path, text, message):
    path = rules_file(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        AggregatorConfig(rules=path).validate()
    assert message in str(e.value)
    assert f"invalid rules file {path} (--rules, GRADWATCH_AGGREGATOR_RULES)" in str(e.value)


def test_missing_file_is_a_start_up_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        AggregatorConfig(rules=str(tmp_path / "nope.toml")).validate()


def test_invalid_rules_file_exits_2(tmp_path, capsys):
    config = dataclasses.replace(AggregatorConfig(), rules=rules_file(tmp_path, "[Nope]\n"))
    assert run(config) == 2
    assert "unknown rule Nope" in capsys.readouterr().err


def test_severity_and_hysteresis_overrides_reach_the_alert(tmp_path, scenario):
    config = AggregatorConfig(keep_firing_s=0, rules=rules_file(tmp_path, """
[LossSpike]
severity = "critical"
resolve_after_steps = 2
"""))
    loss = lambda s: 10.0 if s == 60 else 2.0  # noqa: E731
    assert scenario(80, loss=loss, config=config, rule="LossSpike") == [(60, "firing", "LossSpike", "(loss)"),
                                                                         (62, "resolved", "LossSpike", "(loss)")]
    assert scenario.alerts[0].severity == "critical"


def test_layer_patterns_narrow_what_a_rule_reads(tmp_path, scenario):
    config = AggregatorConfig(keep_firing_s=0, rules=rules_file(tmp_path, """
[UnchangedTensor]
layers = { exclude = ["fc1"] }

[VanishingGradient]
layers = { include = ["fc*"], exclude = ["fc2"] }
"""))
    frozen = dict(sum=1.25, sum_squares=16.0, min=-0.6, max=0.6)
    tiny = dict(sum=0.0, sum_squares=256e-20, min=-1e-9, max=1e-9)

    def tensors(step, layer, kind):
        if step >= 20 and kind == "parameter" and layer in ("fc1", "fc2"):
            return frozen
        if step >= 20 and kind == "gradient" and layer in ("embed", "fc2", "head"):
            return tiny
        return None
    assert scenario(40, tensors, config=config) == [(25, "firing", "UnchangedTensor", "fc2")]
