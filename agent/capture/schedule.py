"""Which optimizer steps the agent captures: small schedules, a burst mode, and a parser for spec strings.

A schedule answers `due(step)` for the step counter the watcher keeps (optimizer steps, from 0). It runs
on the training thread every step, so each `due()` is O(1) arithmetic with no allocation. Schedules are
pure functions of the step, except `Burst`, which an anomaly can switch on from another thread.

Spec strings (AgentConfig.schedule, GRADWATCH_SCHEDULE) are parsed by `parse()`:

    every:10                  every 10th step (0, 10, 20, ...)
    every:10,offset:3         3, 13, 23, ...
    dense:100,every:10        every step for the first 100, then every 10th
    log:2                     0, 1, 2, 4, 8, ... (powers of the base, rounded half up, deduplicated)
    log:5/decade              5 log-spaced steps per decade: 0, 1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100, ...
    every:1000|log:2          due when any of the alternatives is due
    every:50+burst:20         every 50th, and every step for 20 steps after trigger() (at most one, last)

Every schedule carries `spec`, a canonical string that parse() turns back into the same schedule, so the
schedule in use can be reported as a run hyperparameter.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

FORMS = ("every:N[,offset:M]", "dense:K,every:N", "log:BASE", "log:N/decade")


@runtime_checkable
class Schedule(Protocol):
    """Anything with `due(step) -> bool`; `step` counts optimizer steps from 0."""

    def due(self, step: int) -> bool: ...


class _Fn:
    """A schedule made of one closure; `due` is the closure itself, so a call costs one function call."""

    __slots__ = ("due", "spec")

    def __init__(self, due: Callable[[int], bool], spec: str):
        self.due = due
        self.spec = spec

    def __repr__(self) -> str:
        return f"Schedule({self.spec!r})"


def every(n: int, offset: int = 0) -> Schedule:
    """Due at steps offset, offset + n, offset + 2n, ...; never before offset."""
    _check_int("every", n, 1)
    _check_int("offset", offset, 0)

    def due(step: int) -> bool:
        return step >= offset and (step - offset) % n == 0

    return _Fn(due, f"every:{n}" if offset == 0 else f"every:{n},offset:{offset}")


def dense_then_every(k: int, n: int) -> Schedule:
    """Due at every step below k (early training moves fastest), then at multiples of n (0, n, 2n, ...)."""
    _check_int("dense", k, 0)
    _check_int("every", n, 1)

    def due(step: int) -> bool:
        return 0 <= step < k or (step >= 0 and step % n == 0)

    return _Fn(due, f"dense:{k},every:{n}")


def log_spaced(base: float = 2.0, *, per_decade: int | None = None) -> Schedule:
    """Due at step 0 and at floor(base**i + 0.5) for i = 0, 1, 2, ...: 0, 1, 2, 4, 8, ... for base 2.

    per_decade=N instead spaces N steps per factor of ten (base 10**(1/N)); where several powers round
    to the same step it is due once. The check is O(1): a logarithm finds the one power that could land
    on `step`, and it is compared with the same rounding that defines the sequence.
    """
    if per_decade is not None:
        if base != 2.0:
            raise ValueError("log_spaced: give base or per_decade, not both")
        _check_int("per_decade", per_decade, 1)
        base = 10.0 ** (1.0 / per_decade)
        spec = f"log:{per_decade}/decade"
    else:
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not (math.isfinite(base) and base > 1):
            raise ValueError(f"log_spaced: base must be a finite number > 1, got {base!r}")
        base = float(base)
        spec = f"log:{base:g}" if float(f"{base:g}") == base else f"log:{base!r}"
    log_base = math.log(base)

    def due(step: int) -> bool:
        if step <= 1:
            return step >= 0
        # The first power with floor(base**i + 0.5) >= step is ceil(log_base(step - 0.5)), give or take
        # floating-point error; checking it and its neighbours covers that error exactly.
        i = max(0, math.ceil(math.log(step - 0.5) / log_base) - 1)
        return (math.floor(base ** i + 0.5) == step or math.floor(base ** (i + 1) + 0.5) == step
                or math.floor(base ** (i + 2) + 0.5) == step)

    return _Fn(due, spec)


def any_of(*schedules: Schedule) -> Schedule:
    """Due when at least one of the schedules is due (checked in order, stopping at the first)."""
    if not schedules:
        raise ValueError("any_of needs at least one schedule")
    if len(schedules) == 1:
        return schedules[0]

    def due(step: int) -> bool:
        for schedule in schedules:
            if schedule.due(step):
                return True
        return False

    return _Fn(due, "|".join(_spec_of(s) for s in schedules))


class Burst:
    """Due where `schedule` is, and at every step of a burst of `length` steps after each trigger().

    trigger() may be called from any thread: the agent's reader thread calls it when it sees a
    non-finite value or a norm jump, a step or two after the step itself (it reads after the
    device->host copy). The burst starts at the next due() call after trigger() returns and covers that
    step and the `length - 1` after it; a trigger during a burst extends it to `length` steps from that
    call, so an anomaly that persists keeps every step captured until `length` steps after it stops.

    The training thread takes no lock: trigger() bumps a counter under a lock (so triggers from several
    threads are all counted) and due() compares it with the last value it saw, a plain attribute read.
    """

    def __init__(self, schedule: Schedule, length: int):
        _check_int("burst", length, 1)
        if isinstance(schedule, Burst):
            raise ValueError("a Burst cannot wrap another Burst")
        self.schedule = schedule
        self.length = length
        self.spec = f"{_spec_of(schedule)}+burst:{length}"
        self.last_trigger_step: int | None = None  # the step the last anomaly was seen at, for reports
        self._lock = threading.Lock()
        self._triggers = 0  # written only under _lock
        self._seen = 0      # training thread only
        self._until = 0     # training thread only: steps below it are in the current burst

    def trigger(self, step: int) -> None:
        """Ask for a burst because of an anomaly seen at `step`; safe from any thread, never blocks long."""
        with self._lock:
            self._triggers += 1
            self.last_trigger_step = step

    @property
    def triggers(self) -> int:
        """How many times trigger() was called."""
        return self._triggers

    def in_burst(self, step: int) -> bool:
        """Whether `step` falls in the burst that due() last started (training thread)."""
        return step < self._until

    def due(self, step: int) -> bool:
        triggers = self._triggers
        if triggers != self._seen:
            self._seen = triggers
            self._until = max(self._until, step + self.length)
        return step < self._until or self.schedule.due(step)

    def __repr__(self) -> str:
        return f"Burst({self.spec!r})"


def parse(spec: str) -> Schedule:
    """Build a schedule from a spec string such as "dense:100,every:10" or "every:50+burst:20".

    Alternatives joined by "|" are combined with any_of(); a trailing "+burst:L" wraps the result in
    Burst(..., L). Raises ValueError naming the bad part and the accepted forms.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty schedule spec {spec!r}; {_expected()}")
    body, *bursts = (part.strip() for part in spec.split("+"))
    if len(bursts) > 1:
        raise ValueError(f"schedule {spec!r}: at most one +burst:L, at the end; {_expected()}")
    alternatives = [_parse_term(spec, term.strip()) for term in body.split("|")]
    schedule = any_of(*alternatives)
    if bursts:
        name, colon, value = bursts[0].partition(":")
        if name.strip() != "burst" or not colon:
            raise ValueError(f"schedule {spec!r}: after '+' expected burst:L, got {bursts[0]!r}")
        schedule = Burst(schedule, _parse_int(spec, "burst", value, 1))
    return schedule


def _parse_term(spec: str, term: str) -> Schedule:
    fields: dict[str, str] = {}
    for part in term.split(","):
        name, colon, value = (s.strip() for s in part.partition(":"))
        if not colon or not name or not value:
            raise ValueError(f"schedule {spec!r}: {part.strip()!r} is not name:value; {_expected()}")
        if name in fields:
            raise ValueError(f"schedule {spec!r}: {name!r} given twice in {term!r}")
        fields[name] = value
    keys = set(fields)

    def number(name: str, minimum: int) -> int:
        return _parse_int(spec, name, fields.get(name, "0"), minimum)

    if keys == {"every"} or keys == {"every", "offset"}:
        return every(number("every", 1), number("offset", 0))
    if keys == {"dense", "every"}:
        return dense_then_every(number("dense", 0), number("every", 1))
    if keys == {"dense"}:
        raise ValueError(f"schedule {spec!r}: dense:K needs the rate after it, e.g. dense:{fields['dense']},every:10")
    if keys == {"log"}:
        value = fields["log"]
        if value.endswith("/decade"):
            return log_spaced(per_decade=_parse_int(spec, "log N/decade", value.removesuffix("/decade").strip(), 1))
        try:
            base = float(value)
        except ValueError:
            base = math.nan
        if not (math.isfinite(base) and base > 1):
            raise ValueError(f"schedule {spec!r}: log base must be a number > 1 (or N/decade), got {value!r}")
        return log_spaced(base)
    raise ValueError(f"schedule {spec!r}: unknown form {term!r}; {_expected()}")


def _parse_int(spec: str, name: str, text: str, minimum: int) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < minimum:
        raise ValueError(f"schedule {spec!r}: {name} must be an integer >= {minimum}, got {text!r}")
    return int(text)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _spec_of(schedule: Schedule) -> str:
    return getattr(schedule, "spec", None) or f"<{type(schedule).__name__}>"


def _expected() -> str:
    return f"expected {' or '.join(FORMS)}, alternatives joined by '|', optionally ending in +burst:L"
