"""Reserved names of the agent -> aggregator contract: the scalar keys and tensor names that carry a meaning.

The wire (proto/gradwatch/v1) carries scalars as a map and tensors by name. These are the names the agent
gives a meaning and the aggregator reads back; both spell them only through this module.

  name                           what                         written by (agent/)      read by (aggregator/)
  loss                           scalar: the step's loss      export/encode.py sends   StepReport.loss, not a
                                                              it as StepReport.loss    scalar
  lr/<group>                     scalar: a group's learning   capture/step.py; the     state.py, http/metrics.py:
                                 rate                         watcher sends them as    no user curve or series
                                                              learning_rates
  labels/<class>                 scalar: labels of a class    capture/inputs.py        rules/data.py
                                 since the last report                                 (ClassImbalance); state.py,
                                                                                       http/metrics.py, http/api.py
                                                                                       leave them out
  labels_overflow                scalar: labels at or above   capture/inputs.py        a user scalar like any other
                                 max_classes
  gradcheck/passed,              evaluation scalars of a      gradcheck.py             rules/debug.py
  gradcheck/max_relative_error,  gradient check                                        (GradientCheckFailed),
  gradcheck/<tensor>                                                                   state.py (kept until the
                                                                                       next check)
  inputs.<key>, inputs.<key>[c]  INPUT tensors of module      capture/inputs.py        http/views.py, rules/data.py
                                 (inputs): a batch tensor,                             (a channel marks a float)
                                 its channel c
  <module>:units                 ACTIVATION tensor: per-unit  capture/activations.py,  state.py (its own kind:
                                 activity counts              capture/units.py         dead units, not outputs)
  <module>:output,               a module's output and the    capture/activations.py,  rules/nonfinite.py
  <module>:output.grad           gradient with respect to it  capture/origin.py        (NonFiniteOrigin.observed)
  (loss)                         NonFiniteOrigin.module when  capture/origin.py        rules/nonfinite.py
                                 the loss's own gradient was
                                 already non-finite
  train, eval                    a report's phase             watcher.step(phase=)     the JSON API's `phase`
"""

from __future__ import annotations

import re

# A report's phase by name: what watcher.step(phase=...) accepts and the aggregator's JSON shows (the wire
# carries report_pb2.Phase).
TRAIN = "train"
EVAL = "eval"

# The scalar the agent sends as StepReport.loss rather than in the scalar map.
LOSS = "loss"

# Learning rates of the optimizer's parameter groups: scalars lr/0 .. lr/{n-1} between capture and encoding,
# then StepReport.learning_rates.
LR_PREFIX = "lr/"


def lr_scalar(group: int) -> str:
    return f"{LR_PREFIX}{group}"


# Class counts of the labels observed since the previous report.
LABELS_PREFIX = "labels/"
LABELS_OVERFLOW = "labels_overflow"


def label_scalar(label: int) -> str:
    return f"{LABELS_PREFIX}{label}"


# Scalars with a meaning of their own (their own series, or none): never a user scalar's curve or series.
NOT_USER_PREFIXES = (LABELS_PREFIX, LR_PREFIX)

# A gradient check's result, sent as an evaluation report: its verdict, its worst error, each tensor's error.
GRADCHECK_PREFIX = "gradcheck/"
GRADCHECK_PASSED = f"{GRADCHECK_PREFIX}passed"
GRADCHECK_MAX_RELATIVE_ERROR = f"{GRADCHECK_PREFIX}max_relative_error"
GRADCHECK_SUMMARY = (GRADCHECK_PASSED, GRADCHECK_MAX_RELATIVE_ERROR)


def gradcheck_scalar(tensor: str) -> str:
    return f"{GRADCHECK_PREFIX}{tensor}"


# Input batches: INPUT tensors of the pseudo-module (inputs), one per batch key and, for floating-point
# tensors, one per channel.
INPUTS_MODULE = "(inputs)"
INPUTS_PREFIX = "inputs."
_CHANNEL = re.compile(r"^(.*)\[(\d+)\]$")


def input_name(key: str) -> str:
    return f"{INPUTS_PREFIX}{key}"


def channel_name(name: str, channel: int) -> str:
    return f"{name}[{channel}]"


def split_channel(name: str) -> tuple[str, int | None]:
    """(the whole tensor's name, the channel) of a per-channel input name; (name, None) for any other."""
    m = _CHANNEL.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


# Per-unit activity counts of a rectifier module: an ACTIVATION tensor "<module>:units".
UNITS_SUFFIX = ":units"

# A module's output and the gradient with respect to it: ACTIVATION and ACTIVATION_GRADIENT tensor names, and
# what a NonFiniteOrigin observed.
OUTPUT_SUFFIX = ":output"
OUTPUT_GRAD_SUFFIX = ":output.grad"

# The NonFiniteOrigin module of a backward pass whose first gradient checked (the model output's, from the
# loss) was non-finite already.
LOSS_MODULE = "(loss)"
