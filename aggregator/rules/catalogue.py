"""The rule catalogue, its configuration file and the engine that runs the enabled rules.

The rules file (`--rules FILE`, GRADWATCH_AGGREGATOR_RULES) is TOML with one table per rule:
`enabled`, `severity`, `layers = {include = [...], exclude = [...]}` (globs on the layer, for rules
that name layers), `resolve_after_steps`, `cooldown_steps`, `keep_firing_s`, and the rule's own
thresholds (see aggregator/rules/example.toml). Unknown rules and keys, wrong types and values out of
range are start-up errors that name them; rules and keys left out keep their defaults.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import replace

from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.config import AggregatorConfig, env_name
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.join import JoinedStep
from gradwatch.aggregator.ranges import RangeStore
from gradwatch.aggregator.report import ReportView
from gradwatch.aggregator.rules.activations import DeadReLU, SaturatedActivation
from gradwatch.aggregator.rules.base import KINDS, SEVERITIES, Rule, RuleSettings
from gradwatch.aggregator.rules.data import ClassImbalance, InputDataDrift, UnnormalizedInput
from gradwatch.aggregator.rules.debug import GradientCheckFailed
from gradwatch.aggregator.rules.gradients import ExplodingGradient, VanishingGradient
from gradwatch.aggregator.rules.loss import LossNotDecreasing, LossSpike, StalledTraining
from gradwatch.aggregator.rules.nonfinite import NonFinite
from gradwatch.aggregator.rules.pipeline import AgentDataLost, StreamDataLost
from gradwatch.aggregator.rules.ranges import OutOfRange
from gradwatch.aggregator.rules.ranks import RankDivergence
from gradwatch.aggregator.rules.stragglers import RankStalled, StragglerRank
from gradwatch.aggregator.rules.tensors import AllZero, PoorWeightInitialization, TensorVariance, UnchangedTensor
from gradwatch.aggregator.rules.training import Overfit, Overtraining, WeightUpdateRatio
from gradwatch.settings import ConfigError

# Evaluation order: the causes (NaN, explosion, bad inputs) before their consequences.
CATALOGUE: tuple[type[Rule], ...] = (
    NonFinite, GradientCheckFailed, ExplodingGradient, VanishingGradient, WeightUpdateRatio, UnnormalizedInput,
    InputDataDrift, ClassImbalance, LossSpike, LossNotDecreasing, Overfit, Overtraining, AllZero, UnchangedTensor,
    PoorWeightInitialization, TensorVariance, DeadReLU, SaturatedActivation, StalledTraining, RankDivergence,
    StragglerRank, RankStalled, StreamDataLost, AgentDataLost, OutOfRange)
BY_NAME = {rule.name: rule for rule in CATALOGUE}
COMMON = ("enabled", "severity", "layers", "resolve_after_steps", "cooldown_steps", "keep_firing_s")
# Integer thresholds that count reports or steps: at least 1.
_COUNTS = ("window", "min_history", "smoothing", "window_steps", "patience", "train_window", "reference_reports")


def load_rules(config: AggregatorConfig) -> dict[str, RuleSettings]:
    """Every rule's settings: defaults, overridden by config.rules (a TOML file) when set."""
    settings = {rule.name: RuleSettings.defaults(rule, config) for rule in CATALOGUE}
    if config.rules:
        path = config.rules
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise _bad(path, f"cannot read it: {e}") from None
        unknown = sorted(set(data) - set(BY_NAME))
        if unknown:
            raise _bad(path, f"unknown rule{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                             f"the rules are {', '.join(BY_NAME)}")
        for name, table in data.items():
            if not isinstance(table, dict):
                raise _bad(path, f"{name}: expected a table [{name}]")
            try:
                settings[name] = _apply(BY_NAME[name], settings[name], table)
            except ValueError as e:
                raise _bad(path, f"[{name}] {e}") from None
    for name, s in settings.items():
        try:
            BY_NAME[name].check(s.params)
        except ValueError as e:
            raise _bad(config.rules or "(defaults)", f"[{name}] {e}") from None
    return settings


def _apply(rule: type[Rule], base: RuleSettings, table: dict) -> RuleSettings:
    allowed = [k for k in COMMON if rule.LAYERS or k != "layers"] + list(base.params)
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; expected one of "
                         f"{', '.join(allowed)}")
    out = replace(base, params=dict(base.params))
    for key, value in table.items():
        if key == "enabled":
            out.enabled = _typed(key, value, True)
        elif key == "severity":
            if value not in SEVERITIES:
                raise ValueError(f"severity: expected one of {', '.join(SEVERITIES)}, not {value!r}")
            out.severity = value
        elif key == "layers":
            if not isinstance(value, dict) or set(value) - {"include", "exclude"}:
                raise ValueError("layers: expected {include = [globs], exclude = [globs]}")
            out.include = tuple(_typed("layers.include", value.get("include", list(out.include)), []))
            out.exclude = tuple(_typed("layers.exclude", value.get("exclude", list(out.exclude)), []))
        elif key in ("resolve_after_steps", "cooldown_steps", "keep_firing_s"):
            v = _typed(key, value, getattr(base, key))
            if v < (1 if key == "resolve_after_steps" else 0) or (isinstance(v, float) and not math.isfinite(v)):
                raise ValueError(f"{key}: expected a number >= {1 if key == 'resolve_after_steps' else 0}")
            setattr(out, key, v)
        else:
            v = out.params[key] = _typed(key, value, base.params[key])
            if key in rule.KIND_KEYS and set(v) - set(KINDS):
                raise ValueError(f"{key}: expected tensor kinds among {', '.join(KINDS)}, not {v}")
            if isinstance(v, float) and (math.isnan(v) or v < 0):
                raise ValueError(f"{key}: expected a number >= 0, not {v}")
            if isinstance(v, int) and not isinstance(v, bool) and v < (1 if key in _COUNTS else 0):
                raise ValueError(f"{key}: expected an integer >= {1 if key in _COUNTS else 0}, not {v}")
    return out


def _typed(key: str, value: object, like: object) -> object:
    """`value` checked against the type of the default `like` (an integer is a valid float)."""
    if isinstance(like, bool):
        ok = isinstance(value, bool)
    elif isinstance(like, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(like, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(like, (list, tuple)):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, type(like))
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(like), "a list of strings")
        raise ValueError(f"{key}: expected {kind}, not {value!r}")
    return value


def _bad(path: str, message: str) -> ConfigError:
    return ConfigError(f"invalid rules file {path} (--rules, {env_name('rules')}): {message}")


class RuleEngine:
    """The enabled rules of one aggregator, in evaluation order. `client`: the aggregator's Redis, where OutOfRange
    reads the ranges users marked (aggregator/ranges.py); without it that rule has no range to judge."""

    def __init__(self, config: AggregatorConfig, counters: Counters | None = None, rules: list | None = None,
                 client=None):
        if rules is None:
            settings = load_rules(config)
            rules = [rule(settings[rule.name], counters) for rule in CATALOGUE if settings[rule.name].enabled]
        self.rules = rules
        if client is not None:
            for rule in rules:
                if isinstance(rule, OutOfRange):
                    rule.read_from(RangeStore(client), counters)
        self.joined = [rule for rule in rules if getattr(rule, "JOINED", False)]

    def evaluate(self, view: ReportView) -> list[Alert]:
        out: list[Alert] = []
        for rule in self.rules:
            # An end-of-run marker is no evidence of health: it must not count towards resolving an alert.
            if view.final and not getattr(rule, "SEES_FINAL", False):
                continue
            # One rank's part of a step: the rules that judge single reports see the whole step, merged over
            # ranks, when the join closes it (evaluate_joined), never one rank's shard; a part that came after
            # its step closed (late, counted) is NonFinite's evidence only.
            if (view.joined or view.late) and not getattr(rule, "JOINED", False):
                continue
            out.extend(rule.evaluate(view))
        return out

    def evaluate_joined(self, joined: JoinedStep) -> list[Alert]:
        """On a step the join closed: cross-rank rules on the ranks' parts, every other rule on the merge."""
        out = [a for rule in self.joined for a in rule.evaluate_joined(joined)]
        if joined.merged is not None:
            single = (rule for rule in self.rules if not getattr(rule, "JOINED", False))
            out += [a for rule in single for a in rule.evaluate(joined.merged)]
        return out

    def evaluate_idle(self, now: float) -> list[Alert]:
        """Time-driven rules (StalledTraining); the consumer calls it at its discovery interval."""
        return [a for rule in self.rules for a in rule.evaluate_idle(now)]

    def lost(self, run: str, entries: int, total: int, step: int, now: float) -> list[Alert]:
        """Report-stream entries of `run` a commit found lost (aggregator/ingest/retention.py): StreamDataLost."""
        return [a for rule in self.rules if isinstance(rule, StreamDataLost)
                for a in rule.lost(run, entries, total, step, now)]

    def agent_lost(self, run: str, rank: int, reports: int, total: int, step: int, now: float) -> list[Alert]:
        """Step reports rank `rank` of `run` lost before delivery, as its next delivered report says: AgentDataLost."""
        return [a for rule in self.rules if isinstance(rule, AgentDataLost)
                for a in rule.lost(run, reports, total, step, now, f"rank {rank}")]

    def firing(self) -> list[Alert]:
        return [a for rule in self.rules for a in rule.firing()]

    def forget(self, run: str) -> None:
        for rule in self.rules:
            rule.forget(run)
