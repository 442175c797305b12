"""Environment overrides for component configs, in one place: a bad value is logged, then ignored."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("gradwatch.config")


def env(name: str, default: T, parse: Callable[[str], T] | None = None) -> T:
    """Value of environment variable `name` parsed like `default`; `default` when unset or invalid."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if parse is None:
        parse = _parser_for(default)
    try:
        return parse(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a valid %s; using %r", name, raw, type(default).__name__, default)
        return default


def _parser_for(default: object) -> Callable[[str], object]:
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


class ConfigError(ValueError):
    """A configuration value is invalid; raised by validate() at start-up."""
