"""Hyperparameters as a run registration carries them: flat names, plain values (bool, int, float, str).

Frameworks hand over richer things: enums (`SchedulerType.LINEAR`, which is a `str` and would travel as its
repr), nested configs, numpy scalars, 0-dim tensors, paths, lists. `plain()` flattens mappings with dots
("optimizer.lr"), sends an enum as its value, a number-like as the number, `None` not at all and anything
else as its text; at most MAX_HYPERPARAMETERS of them, the rest left out and told once in the log.
"""

from __future__ import annotations

import enum
import logging
import numbers
from collections.abc import Iterator, Mapping

log = logging.getLogger("gradwatch.agent")

MAX_HYPERPARAMETERS = 256  # a whole config dumped into hparams must not make every registration huge
Plain = bool | int | float | str


def plain(*sources: Mapping[str, object] | None) -> dict[str, Plain]:
    """The sources merged in order (a later one wins a name), flattened to plain values."""
    out: dict[str, Plain] = {}
    left_out = 0
    for source in sources:
        for key, value in _flatten(source or {}, ""):
            if key in out or len(out) < MAX_HYPERPARAMETERS:
                out[key] = value
            else:
                left_out += 1
    if left_out:
        log.warning("gradwatch: %d hyperparameters past the first %d are not registered", left_out,
                    MAX_HYPERPARAMETERS)
    return out


def value_of(value: object) -> Plain | None:
    """One value as a registration carries it; None for no value."""
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):  # numpy integers too
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1:
        return value_of(value.item())  # sync: once, at registration, before the first step
    return str(value)


def _flatten(mapping: Mapping, prefix: str) -> Iterator[tuple[str, Plain]]:
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, name + ".")
        elif (v := value_of(value)) is not None:
            yield name, v
