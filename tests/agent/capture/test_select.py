"""Selection on small real models: patterns, module types, tied weights, presets, budget, parse() (tables)."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import pytest
import torch
from torch import nn

from gradwatch.agent.capture.select import PRESETS, Selection, Skipped
from gradwatch.settings import ConfigError
from gradwatch.v1 import run_pb2


class LoRALinear(nn.Linear):
    """A subclass, as adapter libraries write them: should still match the type "Linear"."""


def sequential() -> nn.Module:
    """conv(w,b) act flat fc(w,b) head(w,b): 6 parameters, 5 leaf modules."""
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 2, 3)), ("act", nn.ReLU()), ("flat", nn.Flatten()),
        ("fc", nn.Linear(8, 4)), ("head", LoRALinear(4, 2)),
    ]))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({
            "enc": nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4, bias=False)),
            "dec": nn.ModuleDict({"proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}),
        })
        self.scale = nn.Parameter(torch.ones(1))  # owned by the root module


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def names(selection: Selection, model: nn.Module) -> list[str]:
    return [name for name, _, _ in selection.parameters_of(model)]


SEQ_ALL = ["conv.weight", "conv.bias", "fc.weight", "fc.bias", "head.weight", "head.bias"]
NESTED_ALL = ["scale", "blocks.enc.0.weight", "blocks.enc.0.bias", "blocks.enc.2.weight",
              "blocks.dec.proj.weight", "blocks.dec.proj.bias", "blocks.dec.norm.weight", "blocks.dec.norm.bias"]


@pytest.mark.parametrize(("model", "selection", "expected"), [
    (sequential, Selection(), SEQ_ALL),
    (sequential, Selection(exclude=("*.bias",)), ["conv.weight", "fc.weight", "head.weight"]),
    (sequential, Selection(include=("fc*", "head.bias")), ["fc.weight", "fc.bias", "head.bias"]),
    (sequential, Selection(include="fc"), ["fc.weight", "fc.bias"]),  # module path; a bare str is one pattern
    (sequential, Selection(include=("FC*",)), []),  # case-sensitive on every platform
    (sequential, Selection(module_types=("Linear",)), ["fc.weight", "fc.bias", "head.weight", "head.bias"]),
    (sequential, Selection(module_types=("LoRALinear",)), ["head.weight", "head.bias"]),
    (sequential, Selection(module_types=("Conv*",)), ["conv.weight", "conv.bias"]),
    (sequential, Selection(module_types=("Linear",), exclude=("head",)), ["fc.weight", "fc.bias"]),
    (Nested, Selection(), NESTED_ALL),
    (Nested, Selection(include=("blocks.dec.*",)), NESTED_ALL[4:]),
    (Nested, Selection(exclude=("blocks.enc.*",)), ["scale", *NESTED_ALL[4:]]),
    (Nested, Selection(include=("blocks.*",), exclude=("*norm*",)), NESTED_ALL[1:6]),
    (Nested, Selection(module_types=("Nested",)), ["scale"]),
    (Nested, Selection(module_types=("LayerNorm", "Linear")), NESTED_ALL[1:]),
    (Nested, Selection(parameters=False, gradients=False), []),
])
def test_parameters_honour_patterns_and_types(model, selection, expected):
    assert names(selection, model()) == expected


def test_parameters_carry_the_owning_module_path():
    model = Nested()
    paths = {name: path for name, _, path in Selection().parameters_of(model)}
    assert paths["blocks.dec.proj.weight"] == "blocks.dec.proj"
    assert paths["scale"] == ""  # the root module
    params = dict(model.named_parameters())
    assert all(param is params[name] for name, param, _ in Selection().parameters_of(model))


def test_tied_weights_appear_once_under_their_first_name():
    model = Tied()
    selected = Selection().parameters_of(model)
    assert [name for name, _, _ in selected] == ["embed.weight", "body.weight", "body.bias"]
    assert len({id(p) for _, p, _ in selected}) == len(selected)
    # The alias is not a second name to match: the shared tensor is watched as embed.weight or not at all.
    assert names(Selection(include=("head*",)), model) == []


@pytest.mark.parametrize(("model", "selection", "expected"), [
    (sequential, PRESETS["business"], ["conv", "act", "flat", "fc", "head"]),
    (sequential, PRESETS["business"].replace(module_types=("Linear", "ReLU")), ["act", "fc", "head"]),
    (sequential, PRESETS["business"].replace(exclude=("flat", "act")), ["conv", "fc", "head"]),
    (sequential, PRESETS["business"].replace(leaf_modules_only=False), ["", "conv", "act", "flat", "fc", "head"]),
    (sequential, PRESETS["economy"], []),  # no activation kind asked for
    (Nested, PRESETS["full"], ["blocks.enc.0", "blocks.enc.1", "blocks.enc.2", "blocks.dec.proj", "blocks.dec.norm"]),
    (Nested, PRESETS["full"].replace(include=("blocks.dec.*",)), ["blocks.dec.proj", "blocks.dec.norm"]),
    (Tied, PRESETS["business"], ["embed", "body", "head"]),
])
def test_modules_for_activation_hooks(model, selection, expected):
    assert [path for path, _ in selection.modules_of(model())] == expected


def test_filtered_items_are_counted():
    selected = PRESETS["business"].replace(exclude=("*.bias", "act")).apply(sequential())
    assert selected.skipped == Skipped(filtered_parameters=3, filtered_modules=1)
    assert selected.tensors == 3 * 2 + 4  # weights x (parameter, gradient) + four activations


def test_presets_are_ordered_by_cost_each_a_superset_of_the_one_before():
    assert list(PRESETS) == ["economy", "business", "full"]
    presets = list(PRESETS.values())
    for cheaper, dearer in zip(presets, presets[1:], strict=False):
        assert cheaper.kinds < dearer.kinds
        assert dearer.histogram >= cheaper.histogram
        assert dearer.apply(Nested()).tensors > cheaper.apply(Nested()).tensors
    assert PRESETS["economy"].kinds == {run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_GRADIENT}
    assert not PRESETS["economy"].histogram
    assert PRESETS["full"].kinds == {
        run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_ACTIVATION,
        run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT, run_pb2.TENSOR_KIND_UPDATE, run_pb2.TENSOR_KIND_OPTIMIZER_STATE}
    # Updates (a device copy of each parameter on captured steps) and optimizer state only in full.
    assert not ({run_pb2.TENSOR_KIND_UPDATE, run_pb2.TENSOR_KIND_OPTIMIZER_STATE} & PRESETS["business"].kinds)


def test_preset_with_overrides():
    selection = Selection.preset("business", exclude=("*.bias",), max_tensors=10)
    assert (selection.activations, selection.exclude, selection.max_tensors) == (True, ("*.bias",), 10)
    assert PRESETS["business"].exclude == ()  # presets are values, never changed by a caller


# Registration order of the sequential model, with each item's cost under business (parameter 2, module 1):
# conv.weight 2, conv.bias 4, conv 5, act 6, flat 7, fc.weight 9, fc.bias 11, fc 12, head.weight 14, ...
@pytest.mark.parametrize(("selection", "params", "modules", "skipped"), [
    (PRESETS["economy"].replace(max_tensors=12), SEQ_ALL, [], Skipped()),  # exactly fits
    (PRESETS["economy"].replace(max_tensors=5), SEQ_ALL[:2], [],
     Skipped(over_budget_parameters=4, over_budget_tensors=8)),
    (PRESETS["business"].replace(max_tensors=7), SEQ_ALL[:2], ["conv", "act", "flat"],
     Skipped(over_budget_parameters=4, over_budget_modules=2, over_budget_tensors=10)),
    # Parameters cost 3 and modules 1: conv.bias does not fit in 5, and the conv module (which would)
    # is not taken either, so the watched set stays a prefix of the model.
    (Selection(updates=True, activations=True, max_tensors=5), SEQ_ALL[:1], [],
     Skipped(over_budget_parameters=5, over_budget_modules=5, over_budget_tensors=20)),
    # Optimizer state counts two tensors per parameter (Adam's moments): 4 per parameter here.
    (Selection(optimizer_state=True, max_tensors=8), SEQ_ALL[:2], [],
     Skipped(over_budget_parameters=4, over_budget_tensors=16)),
    (PRESETS["business"].replace(max_tensors=1), [], [],
     Skipped(over_budget_parameters=6, over_budget_modules=5, over_budget_tensors=17)),
    # Filtered items cost nothing and are counted as filtered, not over budget.
    (PRESETS["economy"].replace(exclude=("conv",), max_tensors=4), ["fc.weight", "fc.bias"], [],
     Skipped(filtered_parameters=2, over_budget_parameters=2, over_budget_tensors=4)),
])
def test_budget_keeps_the_longest_prefix_that_fits(selection, params, modules, skipped):
    selected = selection.apply(sequential())
    assert [name for name, _, _ in selected.parameters] == params
    assert [path for path, _ in selected.modules] == modules
    assert selected.skipped == skipped
    assert selected.tensors <= selection.max_tensors


def test_selection_never_touches_tensor_data():
    with torch.device("meta"):  # no storage at all: reading a value would fail
        model = Nested()
    assert len(PRESETS["full"].apply(model).parameters) == len(NESTED_ALL)


@pytest.mark.parametrize(("spec", "expected"), [
    ("", Selection()),
    ("  ", Selection()),
    ("business", PRESETS["business"]),
    ("preset:business,exclude:*.bias,types:Linear|Conv2d",
     PRESETS["business"].replace(exclude=("*.bias",), module_types=("Linear", "Conv2d"))),
    ("exclude:*.bias, preset:full", PRESETS["full"].replace(exclude=("*.bias",))),  # preset applies first
    ("include:encoder.*|head.*,histogram:off,max_tensors:100",
     Selection(include=("encoder.*", "head.*"), histogram=False, max_tensors=100)),
    ("economy,activations:yes,leaf_modules_only:0", PRESETS["economy"].replace(activations=True,
                                                                                leaf_modules_only=False)),
    ("parameters:false,gradients:TRUE,updates:on", Selection(parameters=False, updates=True)),
    ("optimizer_state:on", Selection(optimizer_state=True)),
])
def test_parse_valid(spec, expected):
    assert Selection.parse(spec) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("preset:first", "valid presets, cheapest first: economy, business, full"),
    ("first", "unknown preset 'first'"),
    ("colour:red", "valid keys: preset, include, exclude, types, max_tensors, parameters"),
    ("module_types:Linear", "unknown selection key 'module_types'"),
    ("max_tensors:many", "max_tensors must be an integer"),
    ("max_tensors:0", "max_tensors must be None or >= 1"),
    ("histogram:maybe", "histogram must be one of 1/true/yes/on/0/false/no/off"),
    ("include:a,include:b", "'include' given twice"),
    ("exclude:", "exclude must be non-empty strings"),
    ("types:Linear||Conv2d", "module_types must be non-empty strings"),
])
def test_parse_invalid(spec, message):
    with pytest.raises(ConfigError) as info:  # a ValueError
        Selection.parse(spec)
    assert message in str(info.value)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: Selection.preset("full", colour="red"), "unknown selection field(s) colour; valid: include"),
    (lambda: Selection(max_tensors=-1), "max_tensors must be None or >= 1"),
    (lambda: Selection(max_tensors=True), "max_tensors must be None or >= 1"),
    (lambda: Selection(include=("",)), "include must be non-empty strings"),
])
def test_constructor_refusals(call, message):
    with pytest.raises(ConfigError) as info:
        call()
    assert message in str(info.value)


def test_selection_is_a_frozen_value():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["economy"].histogram = True
