"""gradwatch.logs.DedupLog: the one de-duplicated error log of agent, collector and aggregator."""

from __future__ import annotations

import logging
import math

import pytest

from gradwatch.logs import DedupLog


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logger(caplog):
    caplog.set_level(logging.DEBUG, logger="gradwatch.test.logs")
    return logging.getLogger("gradwatch.test.logs")


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gradwatch.test.logs"]


def test_first_per_key_then_once_per_interval_with_the_repeats_counted(logger, caplog):
    clock = Clock()
    errors = DedupLog(logger, 10.0, clock=clock)
    assert errors.log(logging.WARNING, "a", "redis down: %s", "x")
    assert not errors.log(logging.WARNING, "a", "redis down: %s", "y")
    assert errors.log(logging.WARNING, "b", "other")  # another key is not held back
    clock.now += 9.9
    assert not errors.log(logging.WARNING, "a", "redis down: %s", "z")
    clock.now += 0.1
    assert errors.log(logging.WARNING, "a", "redis down: %s", "w")
    assert lines(caplog) == ["redis down: x", "other", "redis down: w (2 similar messages suppressed)"]


def test_suffix_and_level_as_given(logger, caplog):
    clock = Clock()
    errors = DedupLog(logger, 10.0, suffix=" (%d more since the last message)", clock=clock)
    errors.log(logging.ERROR, "k", "failed")
    errors.log(logging.ERROR, "k", "failed")
    clock.now += 10
    errors.log(logging.ERROR, "k", "failed")
    assert lines(caplog) == ["failed", "failed (1 more since the last message)"]
    assert {r.levelno for r in caplog.records} == {logging.ERROR}


def test_infinite_interval_logs_each_key_once(logger, caplog):
    clock = Clock()
    errors = DedupLog(logger, math.inf, clock=clock)
    for _ in range(3):
        errors.log(logging.WARNING, "pop", "cannot pop")
        clock.now += 1e9
    assert lines(caplog) == ["cannot pop"]


def test_one_key_remembered_logs_whenever_the_error_changes(logger, caplog):
    """The agent's form: a repeated error is said once, again only after a different one."""
    errors = DedupLog(logger, math.inf, max_keys=1, suffix=None)
    for message in ("a", "a", "b", "b", "a"):
        errors.log(logging.WARNING, message, "gradwatch: %s (counting further failures silently)", message)
    assert lines(caplog) == [f"gradwatch: {m} (counting further failures silently)" for m in ("a", "b", "a")]


def test_keys_are_bounded(logger, caplog):
    errors = DedupLog(logger, math.inf, max_keys=3)
    for key in ("a", "b", "c", "a", "d", "a"):
        errors.log(logging.WARNING, key, key)
    # "d" made room by forgetting a, b and c: "a" is logged again, once.
    assert lines(caplog) == ["a", "b", "c", "d", "a"]
