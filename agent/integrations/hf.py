"""Hugging Face Trainer callback: `Trainer(..., callbacks=[GradwatchCallback(run="my-run")])`.

Optional: importing this module needs `transformers` (and the Trainer needs `accelerate`): the `integrations`
extra; gradwatch itself depends on neither.

The Trainer calls `optimizer.step()` after backward, so the watcher's optimizer hooks are the capture window
as in a plain loop; the callback unwraps accelerate's optimizer wrapper so the hooks sit on the real optimizer
(a step that accelerate's GradScaler skips then makes no report). The Trainer clips gradients before that step:
with `max_grad_norm` > 0 the gradient statistics are the clipped ones the update uses, and the Trainer's own
pre-clipping norm travels as the scalar `grad_norm` of logging steps.

The loss of every optimizer step: the Trainer's logs come only every `logging_steps` (500 by default), average
over those steps, and with `logging_nan_inf_filter` (on by default) put the average of earlier losses where a
NaN or Inf was. So the callback takes the loss itself: it wraps the Trainer's `training_step` for the length of
`train()`, and adds up what each micro-batch returns (on the device, no host read), as the Trainer adds it to
its own total: the step's loss, unfiltered. The callback API hands no Trainer to a callback; the one whose
callback handler holds this callback is found on the call stack at `on_train_begin` (without it, the loss
comes from the Trainer's logs, as before). The same wrapper passes each micro-batch to `observe_inputs`, its
integer `labels` (one per example) counted as classes.

Steps are numbered as the Trainer numbers them (`state.global_step` after the step: the first is 1, and a
step GradScaler skipped is counted, without a report), so gradwatch's steps are the Trainer's logged steps;
evaluation metrics become an evaluation report at the step they were computed at (`eval_loss` as its loss,
the others without their `eval_` prefix). Hyperparameters: the main TrainingArguments as plain values (an enum
as its value: "linear", not "SchedulerType.LINEAR").
"""

from __future__ import annotations

import functools
import logging
import sys

import transformers
from transformers import TrainerCallback

import gradwatch
from gradwatch.agent.integrations.batches import class_labels
from gradwatch.agent.integrations.hyperparameters import plain
from gradwatch.names import EVAL, LOSS

log = logging.getLogger("gradwatch.agent")

HYPERPARAMETERS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim",
                   "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm",
                   "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "seed",
                   "fp16", "bf16", "label_smoothing_factor", "gradient_checkpointing")
TRAINER_FRAMES = 16  # how far up the stack on_train_begin looks for its Trainer (it is 2 or 3 frames up)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def hyperparameters(args, state) -> dict:
    """The TrainingArguments worth comparing runs by, with the step count and batch size the Trainer derived."""
    chosen = {k: getattr(args, k) for k in HYPERPARAMETERS if hasattr(args, k)}
    chosen["max_steps"] = state.max_steps
    chosen["world_size"] = args.world_size
    chosen["total_train_batch_size"] = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
    return plain(chosen)


def find_trainer(callback: TrainerCallback):
    """The Trainer whose callbacks include `callback`, from the frames calling it; None if none is."""
    frame = sys._getframe(1)
    for _ in range(TRAINER_FRAMES):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, transformers.Trainer) and any(c is callback for c in owner.callback_handler.callbacks):
            return owner
        frame = frame.f_back
    return None


class GradwatchCallback(TrainerCallback):
    def __init__(self, run: str | None = None, *, observe_inputs: bool = True, **watch_kwargs):
        """`watch_kwargs` go to gradwatch.watch() (collector, select, schedule, config, labels, hyperparameters:
        added to the Trainer's)."""
        self.run = run
        self.observe_inputs = observe_inputs
        self.watch_kwargs = watch_kwargs
        self.watcher = None
        self._trainer = None
        self._own_step = None
        self._loss = None  # the step in progress: the sum of its micro-batches' losses (a device tensor)
        self._done: dict | None = None  # the step just made, waiting for its log's grad_norm

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._end()  # a train() that raised left its watcher open
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        kwargs = dict(self.watch_kwargs)
        params = {**hyperparameters(args, state), **plain(kwargs.pop("hyperparameters", None))}
        self.watcher = gradwatch.watch(model, optimizer, run=self.run, hyperparameters=params, **kwargs)
        self._trainer = find_trainer(self)
        if self._trainer is None:
            log.warning("gradwatch: the Hugging Face callback found no Trainer calling it; the loss comes from "
                        "the Trainer's logs (every logging_steps, NaN filtered) and inputs are not observed")
        else:
            self._own_step = self._trainer.__dict__.get("training_step")  # a patch of the user's own, if any
            self._trainer.training_step = self._wrap(self._trainer.training_step)

    def _wrap(self, training_step):
        @functools.wraps(training_step)
        def watched(model, inputs, *args, **kwargs):
            if self.watcher is not None and self.observe_inputs:
                self.watcher.observe_inputs(inputs, labels=class_labels(inputs))
            loss = training_step(model, inputs, *args, **kwargs)
            self._add(loss)
            return loss

        watched.gradwatch_wrapped = training_step
        return watched

    def _add(self, loss) -> None:
        try:
            self._loss = loss if self._loss is None else self._loss + loss
        except Exception:  # not a tensor (a custom training_step): no loss then, training goes on
            self._loss = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.watcher is None:
            return
        self._flush()
        self._done = {LOSS: self._loss} if self._loss is not None else {}
        self._loss = None
        if not control.should_log:
            self._flush()  # else on_log brings the step's grad_norm

    def _flush(self) -> None:
        if self._done is not None:
            self.watcher.step(**self._done)
            self._done = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.watcher is None or self._done is None or not logs or "loss" not in logs:
            return  # evaluation logs come through on_evaluate, the final summary is no step
        if _number(logs.get("grad_norm")):
            self._done["grad_norm"] = logs["grad_norm"]
        if self._trainer is None and _number(logs["loss"]):  # no loss of our own: the log's (an average, filtered)
            self._done[LOSS] = logs["loss"]
        self._flush()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.watcher is not None:
            self._flush()
            # The Trainer counts a step that GradScaler skipped, the watcher does not: follow the Trainer.
            self.watcher.number_steps_from(state.global_step + 1)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.watcher is None:
            return
        self._flush()
        if metrics:
            scalars = {(LOSS if k == "eval_loss" else k.removeprefix("eval_")): v
                       for k, v in metrics.items() if _number(v)}
            self.watcher.step(phase=EVAL, **scalars)

    def on_train_end(self, args, state, control, **kwargs):
        self._end()

    def _end(self) -> None:
        trainer, self._trainer = self._trainer, None
        if trainer is not None and hasattr(trainer.__dict__.get("training_step"), "gradwatch_wrapped"):
            if self._own_step is None:
                del trainer.training_step  # the class's method again
            else:
                trainer.training_step = self._own_step
        if self.watcher is not None:
            self._flush()
            self.watcher.close()
            self.watcher = None
        self._loss = self._done = None
