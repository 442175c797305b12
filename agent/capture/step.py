"""The device side of a watcher: the tensor dictionary, the statistics buffer, and one step's capture.

`Capture` owns the slots (one buffer row each), the hooks and observers that fill rows during a step
(activations and their gradients, inputs and labels), the update and optimizer-state captures, the
pool of host slots that the statistics are copied into, and the NaN/Inf origin check that runs on every
step (agent/capture/origin.py): a step that is not captured still hands its checks to the reader as a
`CheckedStep`, reported only when it found NaN/Inf. The Watcher decides when (`begin` at the
capture window, `finish` after the update); everything here is device work queued on the training
thread, with one async copy per captured step.

The dictionary can grow after watch(): inputs are seen at the first observe_inputs() call, optimizer
state after the optimizer's first step. New slots take the next ids; the buffer grows and host slots of
the old size are replaced when next taken. A host slot holds the statistics rows, then the class
counts, then one row for scalars.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradwatch.agent.capture.activations import ActivationHooks
from gradwatch.agent.capture.inputs import InputObserver
from gradwatch.agent.capture.origin import OriginCheck, OriginWindow
from gradwatch.agent.capture.select import Selection
from gradwatch.agent.capture.slots import TensorSlot, build_slots
from gradwatch.agent.capture.updates import OptimizerStates, Updates
from gradwatch.agent.config import AgentConfig
from gradwatch.agent.export.counters import AgentCounters
from gradwatch.agent.stats.layout import NCOLS
from gradwatch.agent.stats.summarize import Summarizer
from gradwatch.names import LOSS, lr_scalar
from gradwatch.v1 import report_pb2, run_pb2


def _nothing() -> None:
    pass


@dataclass
class CapturedStep:
    """One logged step (or evaluation) between the training thread and the reader thread."""

    step: int
    capture_time: float
    host: torch.Tensor  # statistics rows (one per slot id), then the class counts, then a row for scalars
    present: list
    phase: int = report_pb2.PHASE_TRAIN
    event: object | None = None
    copied: bool = False           # the copy of the statistics into `host` is queued
    label_row: int | None = None   # first host row of the class counts, when labels were observed
    lr_groups: int = 0             # scalars lr/0 .. lr/{n-1} are the learning rates
    scalars: dict = field(default_factory=dict)        # Python floats
    tensor_scalars: list = field(default_factory=list)  # names of scalar-row slots, in slot order
    origin: OriginWindow | None = None  # the step's NaN/Inf checks
    lost: int = 0                       # reports lost on the training thread just before this one
    release: Callable[[], None] = _nothing

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # sync: reader thread waits for the async device->host copy

    def attach(self, scalars) -> None:
        """Scalars of the step: numbers as they are, one-element tensors copied on the device (no sync)
        into the host slot's last row, ordered after the step's kernels."""
        scalar_row = self.host[-1]
        for name, value in scalars.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 or len(self.tensor_scalars) >= NCOLS:
                    continue
                scalar_row[len(self.tensor_scalars)].copy_(value.detach().reshape(()), non_blocking=True)
                self.tensor_scalars.append(name)
            elif isinstance(value, (int, float)):
                self.scalars[name] = float(value)


@dataclass
class CheckedStep:
    """A step that was not captured, with its NaN/Inf checks: the reader reports it (origins and loss)
    only when it holds an origin or a non-finite loss."""

    step: int
    capture_time: float
    origin: OriginWindow
    event: object | None = None
    lost: int = 0

    @property
    def host(self) -> torch.Tensor:
        return self.origin.host

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # sync: reader thread waits for the async device->host copy

    def attach(self, scalars) -> None:
        if LOSS in scalars:
            self.origin.attach_loss(scalars[LOSS])

    def release(self) -> None:
        pass


class Capture:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, selection: Selection,
                 config: AgentConfig, counters: AgentCounters, due: Callable[[], bool],
                 on_dictionary_change: Callable[[], None]):
        sel = selection
        self.optimizer = optimizer
        self.counters = counters
        self._changed = on_dictionary_change
        self.selected = selected = sel.apply(model)
        param_slots, self._sources = build_slots(selected.parameters, sel.parameters, sel.gradients)
        self.activations = ActivationHooks(
            model, len(param_slots), selected.modules if sel.activations or sel.activation_gradients else [],
            outputs=sel.activations, gradients=sel.activation_gradients, max_units=config.units_max)
        self.slots = param_slots + self.activations.slots
        self.updates = self.states = None
        if optimizer is not None and sel.updates:
            self.updates = Updates(selected.parameters, optimizer, len(self.slots), config.updates_max_bytes)
            self.slots += self.updates.slots
            counters.updates_over_budget = self.updates.over_budget
        if optimizer is not None and sel.optimizer_state:
            self.states = OptimizerStates(optimizer, selected.parameters)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.summarizer = Summarizer(len(self.slots), device, sel.histogram, config.chunk_elements,
                                     config.kernels)
        self.activations.bind(self.summarizer, due)
        self.origin = OriginCheck(model) if sel.origin else None
        if self.origin is not None and not self.origin.paths:  # a bare module: nothing to check, nothing to send
            self.origin.remove()
            self.origin = None
        self.inputs = InputObserver(self.summarizer, self.add_slots, config.inputs_max_channels,
                                    config.labels_max_classes)
        self.pin = device.type == "cuda"
        self.free_hosts = [self.new_host() for _ in range(config.host_slots)]
        self._host_lock = threading.Lock()
        self._order_known = False

    def begin(self, step: int) -> CapturedStep | None:
        """Queue the statistics of the step in progress (activations, activation gradients and inputs were
        summarized during it; parameters and gradients now) and take a free host slot for them. None when
        every host slot is still in flight (counted)."""
        host = self._take_host()
        present = self.activations.take_present() + self.inputs.take_present()
        if self.activations.errors:  # hook errors are swallowed in forward and backward, counted here
            self.counters.internal_errors += self.activations.errors
            self.activations.errors = 0
        if host is None:
            self.counters.skipped_busy += 1
            return None
        # Parameters and gradients: the slots before the activation slots, one per source; one kernel call.
        rows, tensors = [], []
        for slot, source in zip(self.slots[: len(self._sources)], self._sources, strict=True):
            tensor = source()
            if tensor is None or tensor.is_sparse:
                continue  # unused parameters have no gradient this step
            rows.append(slot.id)
            tensors.append(tensor)
            present.append(slot)
        self.summarizer.summarize_many(rows, tensors)
        if not self._order_known:
            self._learn_order()
        if self.updates is not None:
            self.updates.copy_parameters()
        captured = CapturedStep(step, time.time(), host, present)
        captured.release = lambda: self._release(captured.host)
        return captured

    def close_origin(self, step: int) -> CheckedStep | None:
        """The NaN/Inf checks of the step in progress, ended at its capture window (device work only)."""
        if self.origin is None:
            return None
        if self.origin.errors or self.origin.unchecked:  # swallowed in hooks, counted here
            self.counters.internal_errors += self.origin.errors
            self.counters.origin_unchecked += self.origin.unchecked
            self.origin.errors = self.origin.unchecked = 0
        return CheckedStep(step, time.time(), self.origin.close())

    def finish(self, captured: CapturedStep, updated: bool) -> None:
        """After the update (`updated`): updates and optimizer state join. Then the one async copy of the
        statistics and class counts into the host slot; its last row stays for scalars, copied in later."""
        if self.updates is not None:
            if updated:
                self.updates.summarize(self.summarizer, captured.present)
            else:
                self.updates.discard()
        if updated and self.states is not None:
            new = self.states.discover()
            if new:
                self.states.watch(self.add_slots(new))
            self.states.summarize(self.summarizer, captured.present)
        if captured.host.shape[0] != self.host_rows():  # the dictionary grew since the slot was taken
            captured.host = self.new_host()
        n = len(self.slots)
        captured.host[:n].copy_(self.summarizer.buffer, non_blocking=True)
        counts = self.inputs.label_counts
        if counts is not None:
            captured.label_row = n
            captured.host[n : n + len(counts)].copy_(counts, non_blocking=True)
            counts.zero_()  # queued after the copy: counting starts again for the next report
        if self.optimizer is not None:  # the learning rate this update used, not the scheduler's next one
            groups = self.optimizer.param_groups
            captured.attach({lr_scalar(i): g.get("lr", float("nan")) for i, g in enumerate(groups)})
            captured.lr_groups = len(groups)
        captured.copied = True

    def drop(self, captured: CapturedStep) -> None:
        """Give up a capture whose optimizer step never came."""
        if self.updates is not None:
            self.updates.discard()
        captured.release()

    def evaluation(self, step: int) -> CapturedStep:
        # A host row of its own for tensor scalars: the step being captured keeps its slot.
        host = torch.empty((1, NCOLS), dtype=torch.float64, pin_memory=self.pin)
        return CapturedStep(step, time.time(), host, [], phase=report_pb2.PHASE_EVAL, copied=True)

    # ---- the dictionary ------------------------------------------------------------------------

    def _learn_order(self) -> None:
        """After the first forward pass: tensors of a module take its forward execution order, so the
        aggregator can tell which layer came first; the registration is rebuilt before it is sent."""
        self._order_known = True
        self.activations.stop_order_tracking()
        if not self.activations.exec_order:
            return
        self.slots = [self._ordered(s) for s in self.slots]
        self.activations.slots = [self.slots[s.id] for s in self.activations.slots]
        self._changed()

    def _ordered(self, slot: TensorSlot) -> TensorSlot:
        order = self.activations.exec_order
        if not self._order_known or not order or slot.kind == run_pb2.TENSOR_KIND_INPUT:
            return slot  # inputs come before every module: order 0
        # Modules that did not run (or are containers) come after those that did.
        return dataclasses.replace(slot, order=order.get(slot.module_path, len(order) + slot.order))

    def add_slots(self, new: list[TensorSlot]) -> list[TensorSlot]:
        """Tensors found after watch() (inputs, optimizer state): ids, rows, and the registration again."""
        start = len(self.slots)
        added = [self._ordered(dataclasses.replace(s, id=start + i)) for i, s in enumerate(new)]
        self.slots = self.slots + added
        self.summarizer.grow(len(self.slots))
        self._changed()
        return added

    # ---- host slots ----------------------------------------------------------------------------

    def host_rows(self) -> int:
        return len(self.slots) + self.inputs.label_rows + 1  # statistics, class counts, scalars

    def new_host(self) -> torch.Tensor:
        return torch.empty((self.host_rows(), NCOLS), dtype=torch.float64, pin_memory=self.pin)

    def _take_host(self) -> torch.Tensor | None:
        host = self._pop_free_host()
        if host is None:
            # All slots in flight. With steps shorter than the GIL's switch interval (5 ms) the reader thread
            # may simply not have been scheduled yet: yield the GIL once, then skip if it is still behind.
            time.sleep(0)
            host = self._pop_free_host()
        if host is not None and host.shape[0] != self.host_rows():
            host = self.new_host()  # the dictionary grew: this slot is replaced, once
        return host

    def _pop_free_host(self) -> torch.Tensor | None:
        with self._host_lock:
            return self.free_hosts.pop() if self.free_hosts else None

    def _release(self, host: torch.Tensor) -> None:
        with self._host_lock:
            self.free_hosts.append(host)

    def remove_hooks(self) -> None:
        self.activations.remove()
        if self.origin is not None:
            self.origin.remove()
