"""The Watcher: hooks into a model and optimizer, captures due steps, never disturbs training.

Capture window: with an optimizer, a step pre-hook summarizes gradients and parameters right before
the update (after backward, after GradScaler's unscale_, before zero_grad), and the step post-hook adds
what the update did (updates, optimizer state) and queues the one async copy of the step's statistics
to pinned host memory. Without an optimizer, the user's `watcher.step()` call is the window.
Integrations whose optimizer step runs forward and backward inside it (Lightning's closures) set
`external_window` and call `capture_window()` where the gradients are final. The window also ends the
step's NaN/Inf origin checks (agent/capture/origin.py), which run on every step: a step that is not due
goes to the reader too, and becomes a report (origins and loss) only when it found NaN/Inf. Sequence
numbers are given on the reader thread, to reports only, in submission order. Scalars passed to
`watcher.step()` later are copied straight into the same host slot; `watcher.step(phase="eval", ...)`
sends an evaluation report of scalars only. Every public entry point swallows its own errors (counted):
the agent must never raise into the training loop. The device side lives in agent/capture/step.py.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from gradwatch.agent.capture.distributed import distributed_info
from gradwatch.agent.capture.inputs import label_scalars
from gradwatch.agent.capture.origin import on_zero_grad, origins
from gradwatch.agent.capture.schedule import Burst, parse
from gradwatch.agent.capture.snapshots import SnapshotTaker
from gradwatch.agent.capture.step import Capture, CapturedStep, CheckedStep
from gradwatch.agent.capture.topology import ModelTopology, unwrapped
from gradwatch.agent.config import AgentConfig
from gradwatch.agent.export import encode
from gradwatch.agent.export.batch import ReportPipeline
from gradwatch.agent.export.counters import AgentCounters
from gradwatch.agent.export.exporter import Exporter
from gradwatch.names import EVAL, LOSS, TRAIN, lr_scalar
from gradwatch.v1 import report_pb2

log = logging.getLogger("gradwatch.agent")


@dataclass
class FinalMarker:
    """The end of the run for this rank: goes through the reader in order, after every captured step."""

    report: report_pb2.StepReport
    lost: int = 0

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
    """See gradwatch.watch(). `external_window`: set by integrations (before the first step) whose optimizer
    step runs backward inside it; they call capture_window() where the gradients are final, and a step
    counts when the optimizer's post-hook runs."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, run: str,
                 config: AgentConfig, hyperparameters: Mapping[str, object] | None = None,
                 labels: Mapping[str, str] | None = None):
        self.config = config
        self.run = run
        self.counters = AgentCounters()
        self.rank, self.world_size = distributed_info()
        self.model = model = unwrapped(model)
        self.optimizer = optimizer
        self.external_window = False
        self.selection = config.selection()
        self._topology = ModelTopology(model)  # before the hooks below: the first registration may carry it
        self._schedule = parse(config.schedule_spec())
        self._burst = self._schedule if isinstance(self._schedule, Burst) else None
        self._capture = Capture(model, optimizer, self.selection, config, self.counters, self._due,
                                lambda: self._pipeline.set_registration(self._registration()))
        self._log_selection()
        self._histogram = self.selection.histogram
        self._highest_label = -1  # reader thread: the highest class seen so far
        self._step = 0  # the optimizer step in progress (its forward, backward and update)
        self._sequence = 0  # reader thread: the last report's
        self.reported_step: int | None = None  # reader thread: the step of the last training report encoded
        self._lost = 0  # training thread: reports lost (no free host slot) since the last submission
        self._pending: CapturedStep | None = None  # captured at the optimizer step, waiting for step() scalars
        self._checked: CheckedStep | None = None  # that step's origin checks, waiting likewise
        self._opt_stepped = False
        self._held_scalars: dict[str, object] = {}  # scalars of watcher.step() calls between optimizer steps
        self._closed = False
        self._hyperparameters, self._labels = hyperparameters, labels
        self._snapshots = SnapshotTaker(model, run, self.rank, lambda: self._step)  # on-demand, from the live view
        self._pipeline = ReportPipeline(
            Exporter.from_config(config), self._encode, self._registration(), self.counters,
            queue_size=config.queue_size, batch_reports=config.batch_reports, batch_bytes=config.batch_bytes,
            export_interval_s=config.export_interval_s, queue_bytes=config.queue_bytes, snapshots=self._snapshots,
            flush_nonfinite=config.flush_nonfinite,
        )
        # Flush at interpreter exit too (bounded by shutdown_timeout_s), without keeping the watcher alive.
        ref = weakref.ref(self)
        atexit.register(lambda: (w := ref()) and w.close())
        self._hooks = []
        self._windowed = False  # a capture window opened since the optimizer's last zero_grad()
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._hooks.append(optimizer.register_step_post_hook(self._after_optimizer_step))
            if self._capture.origin is not None:  # GradScaler's skipped steps: see _on_zero_grad
                self._hooks.append(on_zero_grad(optimizer, self._on_zero_grad))

    def _on_zero_grad(self) -> None:
        """A zero_grad() with no capture window since the last one threw away the gradients of a step that was
        never made (GradScaler skipped it for a loss-scale overflow): their Inf is no origin."""
        try:
            if not self._windowed and not self._closed:
                self._capture.origin.abandon_backward()
            self._windowed = False
        except Exception:
            self._hook_error()

    @property
    def slots(self):
        """The tensor dictionary: one TensorSlot per watched tensor, id == position."""
        return self._capture.slots

    def _log_selection(self) -> None:
        s, updates = self._capture.selected.skipped, self._capture.updates
        if s.over_budget_tensors:
            log.warning("gradwatch: the tensor budget (max_tensors=%s) leaves out %d parameters and %d modules "
                        "(%d tensors); narrow the selection or raise the budget", self.selection.max_tensors,
                        s.over_budget_parameters, s.over_budget_modules, s.over_budget_tensors)
        if self.optimizer is None and (self.selection.updates or self.selection.optimizer_state):
            log.warning("gradwatch: updates and optimizer state need the optimizer passed to watch(); "
                        "watching the rest")
        if updates is not None and updates.over_budget:
            log.warning("gradwatch: updates_max_bytes (%d B) leaves out the updates of %d parameters; the copy "
                        "for the others takes %d B on captured steps", self.config.updates_max_bytes,
                        updates.over_budget, updates.copy_bytes)

    def _registration(self):
        return encode.registration(self.run, self.rank, self.world_size, self.slots, self._hyperparameters,
                                   self._labels, self._topology.graph(), time.time())

    # ---- training-thread API -------------------------------------------------------------------

    @_guarded
    def step(self, phase: str = TRAIN, **scalars) -> None:
        """Mark the end of one training step and attach scalars (loss=..., accuracy=...).

        Tensor values are copied on the device (no host sync). Without an optimizer, call it after
        backward and before zero_grad: it is the capture window. With an optimizer passed to watch(),
        call it after optimizer.step(); a call when the optimizer did not step (a micro-batch of
        gradient accumulation, or a step GradScaler skipped for overflow) reports nothing and keeps its
        scalars for the next report, so steps count optimizer steps and overflow steps are no alarm.

        phase="eval": an evaluation report (PHASE_EVAL) of these scalars only, at the last optimizer
        step; it is no step, and leaves held scalars and the step being captured alone.
        """
        if self._closed:
            return
        if phase != TRAIN:
            if phase != EVAL:
                raise ValueError(f"phase must be {TRAIN!r} or {EVAL!r}, got {phase!r}")
            self._send(self._capture.evaluation(max(self._step - 1, 0)), scalars)
            return
        if self.optimizer is not None:
            if not self._opt_stepped:
                # Detached: holding a loss must not keep its autograd graph alive until the next report.
                self._held_scalars.update(
                    {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in scalars.items()})
                return
            self._submit(self._pending, {**self._held_scalars, **scalars})
            return
        self._checked = self._capture.close_origin(self._step)
        captured = self._begin() if self._due() else None
        if captured is not None:
            self._capture.finish(captured, updated=False)
        self._step += 1
        self._submit(captured, scalars)

    @_guarded
    def observe_inputs(self, batch: object, labels: object = None) -> None:
        """Statistics of a training batch (a tensor, or a dict/tuple/list of them) on due steps, as INPUT
        tensors `inputs.<key>` and `inputs.<key>[c]` per channel; and, on every call, counts of the
        integer class `labels`, reported as scalars `labels/<class>` over the batches since the last report.
        Call it once per batch (or micro-batch) of training data. No host sync."""
        if not self._closed:
            self._capture.inputs.observe(batch, labels, self._due())

    @_guarded
    def capture_window(self) -> None:
        """With `external_window`: the gradients of the coming optimizer step are final (Lightning calls it
        from on_before_optimizer_step). The step counts when the optimizer's post-hook runs; a window whose
        optimizer step never comes (GradScaler skipped it) is given up at the next one."""
        if not self._closed and self.external_window:
            self._open_window()

    def number_steps_from(self, step: int) -> None:
        """Give the coming optimizer step the number `step` and count on from there. Between steps only (before
        the optimizer step, or after it and its step() call): integrations follow their trainer's numbering
        (the Hugging Face Trainer's first step is 1, it counts the steps GradScaler skipped, a resumed run goes
        on from its checkpoint's step)."""
        self._step = int(step)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        try:
            if self._closed or self.external_window:
                return
            self._open_window()
            self._step += 1
            self._opt_stepped = True
        except Exception:
            self._hook_error()

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        try:
            if self._closed:
                return
            if self.external_window:
                self._step += 1
                self._opt_stepped = True
            if self._pending is not None and not self._pending.copied:
                self._capture.finish(self._pending, updated=True)
        except Exception:
            self._hook_error()

    def _hook_error(self) -> None:
        self.counters.internal_errors += 1
        if self.counters.internal_errors == 1:
            log.exception("gradwatch: internal error in an optimizer hook (training continues)")

    def _due(self) -> bool:
        return self._schedule.due(self._step)

    def _open_window(self) -> None:
        if self._opt_stepped:  # the user does not call watcher.step(): every optimizer step is a step
            self._submit(self._pending, self._held_scalars)
        else:  # an external window whose optimizer step never came: given up, its checks too
            if self._pending is not None:
                self._capture.drop(self._pending)
            self._pending = self._checked = None
        self._checked = self._capture.close_origin(self._step)
        self._windowed = True
        self._pending = self._begin() if self._due() else None

    def _begin(self) -> CapturedStep | None:
        self._snapshots.on_logged_step(self._step)  # requested snapshots: device work and async copies only
        captured = self._capture.begin(self._step)
        if captured is None:
            self._lost += 1  # no host slot free: a report lost, and the sequence gap shows it
        return captured

    def _submit(self, captured: CapturedStep | None, scalars: Mapping[str, object]) -> None:
        checked, self._checked = self._checked, None
        if captured is not None:
            if not captured.copied:
                self._capture.finish(captured, updated=False)
            captured.origin = checked.origin if checked is not None else None
            self._send(captured, scalars)
        elif checked is not None:
            self._send(checked, scalars)
        self._pending = None
        self._opt_stepped = False
        self._held_scalars = {}

    def _send(self, item: CapturedStep | CheckedStep, scalars: Mapping[str, object]) -> None:
        item.attach(scalars)
        item.lost, self._lost = self._lost, 0
        if isinstance(item, CapturedStep):
            self.counters.captured += 1
        if item.host.is_pinned():
            item.event = torch.cuda.Event()
            item.event.record()
        self._pipeline.submit(item)

    def _settle(self) -> None:
        """Flush or close: submit the step waiting for scalars; give up a window whose step never came."""
        if self._pending is None and self._checked is None:
            return
        if self._opt_stepped:
            self._submit(self._pending, self._held_scalars)
        else:
            if self._pending is not None:
                self._capture.drop(self._pending)
            self._pending = self._checked = None

    # ---- reader thread -------------------------------------------------------------------------

    def _encode(self, item: CapturedStep | CheckedStep | FinalMarker) -> report_pb2.StepReport | None:
        """The item's report with its sequence number, or None (a checked step that found nothing)."""
        self._sequence += item.lost
        try:
            report = self._report(item)
        except Exception:
            self._sequence += isinstance(item, CapturedStep)  # a report lost: the gap shows it
            raise
        if report is not None:
            self._sequence += 1
            report.sequence = self._sequence
            if report.phase == report_pb2.PHASE_TRAIN and not report.final:
                self.reported_step = report.step
        return report

    def _report(self, item: CapturedStep | CheckedStep | FinalMarker) -> report_pb2.StepReport | None:
        if isinstance(item, FinalMarker):
            return item.report
        item.wait()
        found = origins(item.origin, self._capture.activations.exec_order) if item.origin is not None else []
        if isinstance(item, CheckedStep):
            loss = item.origin.read_loss()
            if not found and (loss is None or math.isfinite(loss)):
                return None
            self.counters.unscheduled += 1
            report = encode.step_report(self.run, self.rank, item.step, 0, item.capture_time,
                                        report_pb2.PHASE_TRAIN, None, [], False,
                                        {} if loss is None else {LOSS: loss}, [])
        else:
            report = self._captured_report(item)
        report.nonfinite_origins.extend(found)
        if self._burst is not None and report.phase == report_pb2.PHASE_TRAIN and (
                found or any(t.nan_count or t.inf_count for t in report.tensors)
                or (report.HasField("loss") and not math.isfinite(report.loss))):
            self._burst.trigger(report.step)  # capture every step for a while, from the next due() on
        return report

    def _captured_report(self, captured: CapturedStep) -> report_pb2.StepReport:
        rows = captured.host.numpy()  # sync: reader thread, after the copy's event completed
        scalars = {}
        if captured.label_row is not None:
            scalars, self._highest_label = label_scalars(rows[captured.label_row : -1].reshape(-1),
                                                         self._capture.inputs.max_classes, self._highest_label)
        scalars.update(captured.scalars)
        for i, name in enumerate(captured.tensor_scalars):
            scalars[name] = float(rows[-1][i])
        lrs = [scalars.pop(lr_scalar(i), math.nan) for i in range(captured.lr_groups)]
        return encode.step_report(self.run, self.rank, captured.step, 0, captured.capture_time, captured.phase,
                                  rows, captured.present, self._histogram, scalars, lrs)

    # ---- lifecycle -----------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything captured so far was exported (or dropped); False on timeout."""
        self._settle()
        return self._pipeline.force_flush(self.config.shutdown_timeout_s if timeout is None else timeout)

    def close(self, timeout: float | None = None) -> None:
        """Remove the hooks, flush what is queued, stop the threads: returns within `timeout` seconds
        (default `shutdown_timeout_s`) whether or not the collector answers; reports not delivered by then
        are dropped, counted, and told in one warning line. Idempotent."""
        if self._closed:
            return
        try:
            self._settle()
            final = report_pb2.StepReport(run_id=self.run, rank=self.rank, step=max(self._step - 1, 0),
                                          phase=report_pb2.PHASE_TRAIN, final=True)
            final.capture_time.GetCurrentTime()
            self._pipeline.submit(FinalMarker(final, self._lost))
            self._closed = True
            for h in self._hooks:
                h.remove()
            self._capture.remove_hooks()
            self._snapshots.close()
            self._topology.close()
            self._pipeline.shutdown(self.config.shutdown_timeout_s if timeout is None else timeout)
        except Exception:
            self.counters.internal_errors += 1
            log.exception("gradwatch: error while closing (training continues)")

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
