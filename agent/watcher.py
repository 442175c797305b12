"""The Watcher: hooks into a model and optimizer, captures due steps, never disturbs training.

Capture window: with an optimizer, a step pre-hook summarizes gradients and parameters right before
the update (after backward, after GradScaler's unscale_, before zero_grad). Without one, the user's
`watcher.step()` call is the window. The statistics are copied to pinned host memory at capture time
(one async copy); scalars passed to `watcher.step()` later are copied straight into the same host slot.
Every public entry point swallows its own errors (counted): the agent must never raise into the
training loop.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from gradwatch.agent import encode
from gradwatch.agent.activations import ActivationHooks
from gradwatch.agent.batch import AgentCounters, ReportPipeline
from gradwatch.agent.config import AgentConfig
from gradwatch.agent.exporter import Exporter
from gradwatch.agent.schedule import Burst, parse
from gradwatch.agent.slots import build_slots, distributed_info
from gradwatch.agent.summarize import NCOLS, Summarizer
from gradwatch.v1 import report_pb2

log = logging.getLogger("gradwatch.agent")


@dataclass
class CapturedStep:
    """One logged step between the training thread and the reader thread."""

    step: int
    sequence: int
    capture_time: float
    host: torch.Tensor
    event: object | None
    present: list
    scalars: dict = field(default_factory=dict)        # Python floats
    tensor_scalars: list = field(default_factory=list)  # names of scalar-row slots, in slot order
    release: object = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # sync: reader thread waits for the async device->host copy


@dataclass
class FinalMarker:
    """The end of the run for this rank: goes through the reader in order, after every captured step."""

    report: report_pb2.StepReport

    def release(self) -> None:
        pass


def _guarded(method):
    """Count and log (once) any internal error instead of raising into the training loop."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self.counters.internal_errors += 1
            if self.counters.internal_errors == 1:
                log.exception("gradwatch: internal error in %s (training continues)", method.__name__)
            return None

    return wrapper


class Watcher:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, run: str,
                 config: AgentConfig, hyperparameters: Mapping[str, object] | None = None,
                 labels: Mapping[str, str] | None = None):
        self.config = config
        self.run = run
        self.counters = AgentCounters()
        self.rank, self.world_size = distributed_info()
        self.model = model
        self.optimizer = optimizer
        self.selection = config.selection()
        selected = self.selection.apply(model)
        self._log_selection(selected)
        param_slots, self._sources = build_slots(selected.parameters, self.selection.parameters,
                                                 self.selection.gradients)
        self._activations = ActivationHooks(model, len(param_slots),
                                            selected.modules if self.selection.activations else [])
        self.slots = param_slots + self._activations.slots
        self._schedule = parse(config.schedule_spec())
        self._burst = self._schedule if isinstance(self._schedule, Burst) else None
        self._histogram = self.selection.histogram
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._summarizer = Summarizer(len(self.slots), device, self._histogram, config.chunk_elements)
        self._activations.bind(self._summarizer, self._due)
        pin = device.type == "cuda"
        self._free_slots = [torch.empty((len(self.slots) + 1, NCOLS), dtype=torch.float64, pin_memory=pin)
                            for _ in range(config.host_slots)]
        self._slot_lock = threading.Lock()
        self._step = 0  # the optimizer step in progress (its forward, backward and update)
        self._sequence = 0
        self._pending: CapturedStep | None = None  # captured at the optimizer step, waiting for step() scalars
        self._opt_stepped = False
        self._held_scalars: dict[str, object] = {}  # scalars of watcher.step() calls between optimizer steps
        self._closed = False
        self._hyperparameters, self._labels = hyperparameters, labels
        self._order_known = False
        self._pipeline = ReportPipeline(
            Exporter.from_config(config), self._encode, self._registration(), self.counters,
            queue_size=config.queue_size, batch_reports=config.batch_reports, batch_bytes=config.batch_bytes,
            export_interval_s=config.export_interval_s, queue_bytes=config.queue_bytes,
        )
        # Flush at interpreter exit too (bounded by shutdown_timeout_s), without keeping the watcher alive.
        ref = weakref.ref(self)
        atexit.register(lambda: (w := ref()) and w.close())
        self._hooks = []
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._before_optimizer_step))

    def _log_selection(self, selected) -> None:
        s = selected.skipped
        if s.over_budget_tensors:
            log.warning("gradwatch: the tensor budget (max_tensors=%s) leaves out %d parameters and %d modules "
                        "(%d tensors); narrow the selection or raise the budget", self.selection.max_tensors,
                        s.over_budget_parameters, s.over_budget_modules, s.over_budget_tensors)
        if self.selection.activation_gradients or self.selection.updates:
            log.warning("gradwatch: activation gradients and updates are not captured yet; watching the rest")

    def _registration(self):
        return encode.registration(self.run, self.rank, self.world_size, self.slots, self._hyperparameters,
                                   self._labels, None, time.time())

    # ---- training-thread API -------------------------------------------------------------------

    @_guarded
    def step(self, **scalars) -> None:
        """Mark the end of one training step and attach scalars (loss=..., accuracy=...).

        Tensor values are copied on the device (no host sync). Without an optimizer, call it after
        backward and before zero_grad: it is the capture window. With an optimizer passed to watch(),
        call it after optimizer.step(); a call when the optimizer did not step (a micro-batch of
        gradient accumulation, or a step GradScaler skipped for overflow) reports nothing and keeps its
        scalars for the next report, so steps count optimizer steps and overflow steps are no alarm.
        """
        if self._closed:
            return
        if self.optimizer is not None:
            if not self._opt_stepped:
                # Detached: holding a loss must not keep its autograd graph alive until the next report.
                self._held_scalars.update(
                    {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in scalars.items()})
                return
            self._submit(self._pending, {**self._held_scalars, **scalars})
            return
        captured = self._capture() if self._due() else None
        self._step += 1
        self._submit(captured, scalars)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        try:
            if self._closed:
                return
            if self._opt_stepped:  # the user does not call watcher.step(): every optimizer step is a step
                self._submit(self._pending, self._held_scalars)
            self._pending = self._capture() if self._due() else None
            self._step += 1
            self._opt_stepped = True
        except Exception:
            self.counters.internal_errors += 1
            if self.counters.internal_errors == 1:
                log.exception("gradwatch: internal error in the optimizer hook (training continues)")

    def _due(self) -> bool:
        return self._schedule.due(self._step)

    def _capture(self) -> CapturedStep | None:
        """Queue the statistics of the step in progress and their copy into a free host slot."""
        with self._slot_lock:
            host = self._free_slots.pop() if self._free_slots else None
        self._sequence += 1
        present = self._activations.take_present()  # summarized by the forward hooks of this step
        if self._activations.errors:  # hook errors are swallowed in the forward pass, counted here
            self.counters.internal_errors += self._activations.errors
            self._activations.errors = 0
        if host is None:
            self.counters.skipped_busy += 1
            return None
        # Parameters and gradients: the slots before the activation slots, one per source.
        for slot, source in zip(self.slots[: len(self._sources)], self._sources, strict=True):
            tensor = source()
            if tensor is None or tensor.is_sparse:
                continue  # unused parameters have no gradient this step
            self._summarizer.summarize(slot.id, tensor)
            present.append(slot)
        if not self._order_known:
            self._learn_order()
        # One async copy; the last host row stays for scalars, which step() copies in later.
        host[: len(self.slots)].copy_(self._summarizer.buffer, non_blocking=True)
        captured = CapturedStep(self._step, self._sequence, time.time(), host, None, present,
                                release=lambda h=host: self._release(h))
        if self.optimizer is not None:  # the learning rate this update used, not the scheduler's next one
            self._attach_scalars(captured, {f"lr/{i}": g.get("lr", float("nan"))
                                            for i, g in enumerate(self.optimizer.param_groups)})
        self.counters.captured += 1
        return captured

    def _learn_order(self) -> None:
        """After the first forward pass: tensors of a module take its forward execution order, so the
        aggregator can tell which layer came first; the registration is rebuilt before it is sent."""
        order = self._activations.exec_order
        self._order_known = True
        self._activations.stop_order_tracking()
        if not order:
            return
        late = len(order)  # modules that did not run (or are containers) come after those that did
        self.slots = [dataclasses.replace(s, order=order.get(s.module_path, late + s.order)) for s in self.slots]
        self._activations.slots = [s for s in self.slots if s.id >= len(self._sources)]
        self._pipeline.set_registration(self._registration())

    def _submit(self, captured: CapturedStep | None, scalars: Mapping[str, object]) -> None:
        if captured is not None:
            self._attach_scalars(captured, scalars)
            if captured.host.is_pinned():
                captured.event = torch.cuda.Event()
                captured.event.record()
            self._pipeline.submit(captured)
        self._pending = None
        self._opt_stepped = False
        self._held_scalars = {}

    def _attach_scalars(self, captured: CapturedStep, scalars: Mapping[str, object]) -> None:
        scalar_row = captured.host[len(self.slots)]
        for name, value in scalars.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 or len(captured.tensor_scalars) >= NCOLS:
                    continue
                # Straight into the pinned host slot: async, ordered after the step's kernels.
                scalar_row[len(captured.tensor_scalars)].copy_(value.detach().reshape(()), non_blocking=True)
                captured.tensor_scalars.append(name)
            elif isinstance(value, (int, float)):
                captured.scalars[name] = float(value)

    def _release(self, host: torch.Tensor) -> None:
        with self._slot_lock:
            self._free_slots.append(host)

    # ---- reader thread -------------------------------------------------------------------------

    def _encode(self, captured: CapturedStep | FinalMarker) -> report_pb2.StepReport:
        if isinstance(captured, FinalMarker):
            return captured.report
        captured.wait()
        rows = captured.host.numpy()  # sync: reader thread, after the copy's event completed
        scalars = dict(captured.scalars)
        scalar_row = rows[len(self.slots)]
        for i, name in enumerate(captured.tensor_scalars):
            scalars[name] = float(scalar_row[i])
        lrs = [scalars.pop(f"lr/{i}") for i in range(len(self.optimizer.param_groups))] if self.optimizer else []
        report = encode.step_report(self.run, self.rank, captured.step, captured.sequence, captured.capture_time,
                                    report_pb2.PHASE_TRAIN, rows, captured.present, self._histogram, scalars, lrs)
        if self._burst is not None and (
                any(t.nan_count or t.inf_count for t in report.tensors)
                or (report.HasField("loss") and not math.isfinite(report.loss))):
            self._burst.trigger(captured.step)  # capture every step for a while, from the next due() on
        return report

    # ---- lifecycle -----------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything captured so far was exported (or dropped); False on timeout."""
        if self._pending is not None:
            self._submit(self._pending, self._held_scalars)
        return self._pipeline.force_flush(self.config.shutdown_timeout_s if timeout is None else timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush what is queued (within the timeout), stop the threads, remove the hooks. Idempotent."""
        if self._closed:
            return
        try:
            if self._pending is not None:
                self._submit(self._pending, self._held_scalars)
            self._sequence += 1
            final = report_pb2.StepReport(run_id=self.run, rank=self.rank, step=max(self._step - 1, 0),
                                          sequence=self._sequence, phase=report_pb2.PHASE_TRAIN, final=True)
            final.capture_time.GetCurrentTime()
            self._pipeline.submit(FinalMarker(final))
            self._closed = True
            for h in self._hooks:
                h.remove()
            self._activations.remove()
            self._pipeline.shutdown(self.config.shutdown_timeout_s if timeout is None else timeout)
        except Exception:
            self.counters.internal_errors += 1
            log.exception("gradwatch: error while closing (training continues)")

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
