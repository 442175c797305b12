"""Forward hooks on leaf modules: the forward execution order, and activation statistics on due steps.

The execution order of the first forward pass is what lets the aggregator name the first layer where
a NaN appeared. Activation statistics are summarized into the shared device buffer inside the hook
(device work only: no host sync), for training forward passes (grad enabled) of due steps; with
gradient accumulation the last micro-batch's activations are the ones reported.

Activation gradients (the gradient with respect to a module's output) come from a tensor hook that the
forward hook puts on the output on due steps; it summarizes the gradient when backward reaches it, on
the device, and returns nothing, so the gradient flows on unchanged. A tensor hook rather than a full
backward hook: those wrap the output in a custom autograd function, which breaks in-place ops after the
module (ReLU(inplace=True)) and is one more node in every backward pass, due or not.

Watched ReLU and ReLU6 modules also count, per unit, the training forward passes it fired in, on every
step (agent/capture/units.py): their `<module>:units` tensors give the aggregator the dead-unit fraction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from gradwatch.agent.capture.origin import leaf_modules
from gradwatch.agent.capture.slots import TensorSlot
from gradwatch.agent.capture.units import UnitActivity, is_rectifier
from gradwatch.agent.stats.summarize import Summarizer
from gradwatch.names import OUTPUT_GRAD_SUFFIX, OUTPUT_SUFFIX, UNITS_SUFFIX
from gradwatch.v1 import run_pb2

# Under torch.compile the hooks run eagerly at a graph break of their own: tracing them would compile the
# summarizer into the model's graphs and recompile whenever a step's due-ness changes.
_eager = getattr(getattr(torch, "compiler", None), "disable", lambda fn: fn)


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    if isinstance(output, dict):
        return next((o for o in output.values() if isinstance(o, torch.Tensor)), None)
    return None


class ActivationHooks:
    def __init__(self, model: torch.nn.Module, start_id: int, capture: list[tuple[str, torch.nn.Module]],
                 outputs: bool = True, gradients: bool = False, max_units: int = 0):
        """Order hooks on every leaf module; statistics of the `capture` modules' outputs (`outputs`) and of
        the gradients with respect to them (`gradients`); with `outputs` and `max_units` > 0, unit activity
        of the rectifiers among them. Slots: every output, then every gradient, then every rectifier's units."""
        kinds = [(run_pb2.TENSOR_KIND_ACTIVATION, OUTPUT_SUFFIX)] if outputs else []
        if gradients:
            kinds.append((run_pb2.TENSOR_KIND_ACTIVATION_GRADIENT, OUTPUT_GRAD_SUFFIX))
        self.slots = [
            TensorSlot(id=start_id + len(capture) * k + i, name=path + suffix, kind=kind, module_path=path, order=i,
                       shape=(), dtype="", numel=0, partition=run_pb2.PARTITION_PER_RANK)
            for k, (kind, suffix) in enumerate(kinds) for i, (path, _) in enumerate(capture)
        ]
        # Positions in self.slots of each captured module's output and gradient slots (None: not watched).
        self._output_at = [i if outputs else None for i in range(len(capture))]
        self._grad_at = [len(capture) * outputs + i if gradients else None for i in range(len(capture))]
        self._grad_hooks = [self._grad_hook(i) for i in range(len(capture))]
        # Rectifiers' unit counters, and the positions of their slots in self.slots.
        self._units: list[tuple[UnitActivity, int] | None] = [None] * len(capture)
        if outputs and max_units > 0:
            for i, (path, module) in enumerate(capture):
                if is_rectifier(module):
                    self._units[i] = (UnitActivity(max_units), len(self.slots))
                    self.slots.append(TensorSlot(
                        id=start_id + len(self.slots), name=path + UNITS_SUFFIX, kind=run_pb2.TENSOR_KIND_ACTIVATION,
                        module_path=path, order=i, shape=(), dtype="float32", numel=0,
                        partition=run_pb2.PARTITION_PER_RANK))
        slot_of = {path: i for i, (path, _) in enumerate(capture)}
        leaves = leaf_modules(model)  # with nn.MultiheadAttention, whose own child never runs
        self.exec_order: dict[str, int] = {}
        self.present: dict[int, TensorSlot] = {}  # this step's activation rows, with their element counts
        self.errors = 0  # exceptions swallowed in hooks; the watcher moves them into its counters
        self._summarizer: Summarizer | None = None
        self._due: Callable[[], bool] = lambda: False
        self._capture_handles = [m.register_forward_hook(self._hook(path, slot_of[path])) for path, m in capture]
        # Leaves that are not captured are hooked only until the first step has shown the order.
        self._order_handles = [m.register_forward_hook(self._hook(path, None))
                               for path, m in leaves if path not in slot_of]

    def bind(self, summarizer: Summarizer, due: Callable[[], bool]) -> None:
        self._summarizer = summarizer
        self._due = due

    def _hook(self, path: str, index: int | None):
        @_eager
        def hook(module, inputs, output):
            try:
                if path not in self.exec_order:
                    self.exec_order[path] = len(self.exec_order)
                if index is None or not torch.is_grad_enabled():
                    return
                units, due = self._units[index], self._due()
                if units is None and not due:
                    return
                t = _first_tensor(output)
                if t is None or not t.is_floating_point() or t.is_sparse or self._summarizer is None:
                    return
                if units is not None:  # every training forward pass, due or not: the window between reports
                    units[0].observe(t)
                if not due:
                    return
                if self._output_at[index] is not None:
                    slot = self.slots[self._output_at[index]]
                    self._summarizer.summarize(slot.id, t)
                    self.present[slot.id] = dataclasses.replace(slot, numel=t.numel(), shape=tuple(t.shape))
                if self._grad_at[index] is not None and t.requires_grad:
                    t.register_hook(self._grad_hooks[index])
            except Exception:  # never break the forward pass; the watcher counts it at capture
                self.errors += 1

        return hook

    def _grad_hook(self, index: int):
        @_eager
        def hook(grad: torch.Tensor) -> None:
            # Runs inside backward (on CUDA, on autograd's device thread): device work only, returns None
            # so the gradient is left as it is.
            try:
                if grad is None or grad.is_sparse or self._summarizer is None:
                    return
                slot = self.slots[self._grad_at[index]]
                self._summarizer.summarize(slot.id, grad)
                self.present[slot.id] = dataclasses.replace(slot, numel=grad.numel(), shape=tuple(grad.shape))
            except Exception:  # never break the backward pass; the watcher counts it at capture
                self.errors += 1

        return hook

    def take_present(self) -> list[TensorSlot]:
        """This step's rows; and the unit counts of the window that ends here, summarized, then cleared."""
        slots = list(self.present.values())
        self.present.clear()
        for entry in self._units:
            if entry is not None and self._summarizer is not None:
                slot = self.slots[entry[1]]
                n = entry[0].take(self._summarizer.summarize, slot.id)
                if n:
                    slots.append(dataclasses.replace(slot, numel=n, shape=(n,)))
        return slots

    def stop_order_tracking(self) -> None:
        """The order is known: drop the hooks that were only there to learn it (off the forward pass)."""
        for h in self._order_handles:
            h.remove()
        self._order_handles = []

    def remove(self) -> None:
        self.stop_order_tracking()
        for h in self._capture_handles:
            h.remove()
        self._capture_handles = []
