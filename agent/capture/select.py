"""Which tensors of a model to watch: name patterns, module types, kinds, a tensor budget, and presets.

Runs once, at watch(): it only walks `named_modules()` and `named_parameters()` and never touches
tensor data. This module imports torch for annotations only; a model is all it needs of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import TYPE_CHECKING

from gradwatch.settings import ConfigError
from gradwatch.v1 import run_pb2

if TYPE_CHECKING:
    import torch

_PATTERN_FIELDS = ("include", "exclude", "module_types")
_KIND_FIELDS = ("parameters", "gradients", "activations", "activation_gradients", "updates", "optimizer_state",
                "histogram")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Skipped:
    """What a selection left out, for a log line or counters.

    `filtered_*` were refused by include/exclude/module types; `over_budget_*` matched but did not fit
    `max_tensors`, and `over_budget_tensors` is how many tensors they would have added.
    """

    filtered_parameters: int = 0
    filtered_modules: int = 0
    over_budget_parameters: int = 0
    over_budget_modules: int = 0
    over_budget_tensors: int = 0


@dataclass(frozen=True)
class Selected:
    """The outcome of `Selection.apply(model)`, in module registration order."""

    parameters: list[tuple[str, torch.nn.Parameter, str]]  # (name, parameter, owning module path; "" = root)
    modules: list[tuple[str, torch.nn.Module]]             # (module path, module): activation hook targets
    tensors: int                                           # tensors these produce per captured step
    skipped: Skipped


@dataclass(frozen=True)
class Selection:
    """Which parameters and modules to watch, and which kinds of tensor to capture for them.

    Patterns are `fnmatch` globs, case-sensitive, where `*` also crosses dots (`encoder.*` is a whole
    subtree). A parameter matches a pattern when its full name (`encoder.0.weight`) or its owning module's
    path (`encoder.0`) does; a module matches by its path. Tied parameters are seen once, under the name
    `named_parameters()` gives them (the first registration). `module_types` holds class-name globs matched
    against the owning module's class and its base classes below `nn.Module`, so a `LoRALinear(nn.Linear)`
    matches "Linear"; empty means every type.

    `max_tensors` caps the tensors captured per step. Modules are walked in registration order, each one's
    own parameters before the module itself, and the watched set is the longest prefix that fits: later
    layers are dropped whole and counted in `Skipped`. A prefix rather than "the largest layers" because it
    is the same set on every rank (sharded shapes differ between ranks), predictable from the model's code,
    and easy to steer with `exclude`.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    module_types: tuple[str, ...] = ()
    parameters: bool = True             # parameter values
    gradients: bool = True              # parameter gradients
    activations: bool = False           # module outputs (forward hooks)
    activation_gradients: bool = False  # gradients w.r.t. module outputs (backward hooks)
    updates: bool = False               # what the optimizer step changed in each parameter
    optimizer_state: bool = False       # the optimizer's state tensors of each parameter (Adam's moments)
    histogram: bool = True              # log2-magnitude histograms on top of the scalar statistics
    leaf_modules_only: bool = True      # activation hooks on modules without children only
    max_tensors: int | None = None      # None: no budget
    origin: bool = True                 # the always-on NaN/Inf origin check of every leaf module (capture/origin.py)

    def __post_init__(self):
        for name in _PATTERN_FIELDS:
            value = getattr(self, name)
            # A bare string would otherwise be iterated character by character.
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(p, str) and p for p in value):
                raise ConfigError(f"{name} must be non-empty strings, got {value!r}")
            object.__setattr__(self, name, value)
        if self.max_tensors is not None and (isinstance(self.max_tensors, bool) or self.max_tensors < 1):
            raise ConfigError(f"max_tensors must be None or >= 1, got {self.max_tensors!r}")

    @property
    def kinds(self) -> frozenset[int]:
        """The `run_pb2.TensorKind` values this selection captures."""
        flags = ((self.parameters, run_pb2.TENSOR_KIND_PARAMETER), (self.gradients, run_pb2.TENSOR_KIND_GRADIENT),
                 (self.activations, run_pb2.TENSOR_KIND_ACTIVATION),
                 (self.activation_gradients, run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT),
                 (self.updates, run_pb2.TENSOR_KIND_UPDATE),
                 (self.optimizer_state, run_pb2.TENSOR_KIND_OPTIMIZER_STATE))
        return frozenset(kind for on, kind in flags if on)

    @classmethod
    def preset(cls, name: str, **overrides) -> Selection:
        """The preset called `name` (see `PRESETS`), with some fields replaced."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid presets, cheapest first: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def replace(self, **changes) -> Selection:
        """A copy with some fields changed; unknown field names are refused with the valid ones listed."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ConfigError(f"unknown selection field(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def parse(cls, spec: str) -> Selection:
        """A selection from a string such as `"preset:business,exclude:*.bias,types:Linear|Conv2d"`.

        Comma-separated `key:value` items; `|` separates several values. Keys: `preset`, `include`,
        `exclude`, `types`, `max_tensors`, and the on/off switches `parameters`, `gradients`, `activations`,
        `activation_gradients`, `updates`, `optimizer_state`, `histogram`, `leaf_modules_only`, `origin` (1/0,
        true/false, yes/no, on/off). `origin:off` turns off the NaN/Inf origin check, which include, exclude
        and types do not narrow: it checks every leaf module.
        A bare preset name is short for `preset:NAME`. The preset applies first wherever it is written;
        an empty spec gives `Selection()`.
        """
        items: dict[str, str] = {}
        for raw in spec.split(","):
            item = raw.strip()
            if not item:
                continue
            key, sep, value = item.partition(":")
            key, value = key.strip(), value.strip()
            if not sep:
                key, value = "preset", key
            if key not in _PARSE_KEYS:
                raise ConfigError(f"unknown selection key {key!r} in {spec!r}; valid keys: {', '.join(_PARSE_KEYS)}")
            if key in items:
                raise ConfigError(f"selection key {key!r} given twice in {spec!r}")
            items[key] = value
        base = cls.preset(items.pop("preset")) if "preset" in items else cls()
        return base.replace(**{_PARSE_KEYS[k]: _parse_value(k, v) for k, v in items.items()})

    def apply(self, model: torch.nn.Module) -> Selected:
        """The parameters and modules of `model` to watch, what that costs in tensors, and what was left out."""
        # Optimizer state counts as two tensors per parameter (Adam's moments), the most the agent watches.
        param_cost = self.parameters + self.gradients + self.updates + 2 * self.optimizer_state
        module_cost = self.activations + self.activation_gradients
        owned: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
        if param_cost:
            for name, param in model.named_parameters():  # deduplicates tied parameters
                owned.setdefault(name.rpartition(".")[0], []).append((name, param))
        params: list[tuple[str, torch.nn.Parameter, str]] = []
        modules: list[tuple[str, torch.nn.Module]] = []
        counts = {f.name: 0 for f in dataclasses.fields(Skipped)}
        spent, full = 0, False
        for path, module in model.named_modules():
            candidates: list[tuple[str, tuple, int]] = []  # (what, entry, tensors it costs)
            for name, param in owned.get(path, ()):
                if self._refusal((name, path), module):
                    counts["filtered_parameters"] += 1
                else:
                    candidates.append(("parameters", (name, param, path), param_cost))
            if module_cost and (not self.leaf_modules_only or next(module.children(), None) is None):
                if self._refusal((path,), module):
                    counts["filtered_modules"] += 1
                else:
                    candidates.append(("modules", (path, module), module_cost))
            for what, entry, cost in candidates:
                # Once one item does not fit, nothing after it is taken: the watched set is a prefix.
                full = full or (self.max_tensors is not None and spent + cost > self.max_tensors)
                if full:
                    counts[f"over_budget_{what}"] += 1
                    counts["over_budget_tensors"] += cost
                    continue
                spent += cost
                (params if what == "parameters" else modules).append(entry)
        return Selected(parameters=params, modules=modules, tensors=spent, skipped=Skipped(**counts))

    def parameters_of(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, str]]:
        """(name, parameter, owning module path) for each watched parameter; see `apply`."""
        return self.apply(model).parameters

    def modules_of(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """(module path, module) for each module whose activations are watched; see `apply`."""
        return self.apply(model).modules

    def _refusal(self, names: tuple[str, ...], module: torch.nn.Module) -> str | None:
        """Why `names` (a parameter's name and module path, or a module's path) is left out; None if kept."""
        if not _any_match(names, self.include):
            return "include"
        if _any_match(names, self.exclude):
            return "exclude"
        if self.module_types and not _any_match(_class_names(module), self.module_types):
            return "module_types"
        return None


def _any_match(names: Iterable[str], patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for name in names for pattern in patterns)


def _class_names(module: object) -> tuple[str, ...]:
    """The module's class name and those of its bases, stopping at torch's `Module`."""
    names = []
    for cls in type(module).__mro__:
        if cls.__name__ == "Module" and cls.__module__.startswith("torch."):
            break
        names.append(cls.__name__)
    return tuple(names)


def _parse_value(key: str, value: str) -> object:
    if key in ("include", "exclude", "types"):
        return tuple(v.strip() for v in value.split("|"))
    if key == "max_tensors":
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"max_tensors must be an integer, got {value!r}") from None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{key} must be one of {'/'.join(_TRUE + _FALSE)}, got {value!r}")


# parse() key -> Selection field ("types" is the short spelling of module_types).
_PARSE_KEYS = {"preset": "preset", "include": "include", "exclude": "exclude", "types": "module_types",
               "max_tensors": "max_tensors", **{k: k for k in (*_KIND_FIELDS, "leaf_modules_only", "origin")}}

# Least to most expensive (as cockpit's "economy" | "business" | "full"); each captures a superset of the
# one before it. Per step, economy costs two tensors per parameter, business adds one per leaf module and
# the histograms, full adds an activation gradient per leaf module, and per parameter an update (and a
# device copy of the parameter on captured steps, within updates_max_bytes) and the optimizer state.
PRESETS: MappingProxyType[str, Selection] = MappingProxyType({
    "economy": Selection(parameters=True, gradients=True, histogram=False),
    "business": Selection(parameters=True, gradients=True, histogram=True, activations=True),
    "full": Selection(parameters=True, gradients=True, histogram=True, activations=True,
                      activation_gradients=True, updates=True, optimizer_state=True),
})
