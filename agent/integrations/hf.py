"""Hugging Face Trainer callback: `Trainer(..., callbacks=[GradwatchCallback(run="my-run")])`.

Optional: importing this module needs `transformers`; gradwatch itself does not depend on it.

The Trainer calls `optimizer.step()` after backward, so the watcher's optimizer hooks are the capture
window as in a plain loop; the callback unwraps accelerate's optimizer wrapper so the hooks sit on the
real optimizer (a step that accelerate's GradScaler skips is then no step). The Trainer clips gradients
before that step: with `max_grad_norm` > 0 the gradient statistics are the clipped ones the update
uses, and the Trainer's own pre-clipping norm travels as the scalar `grad_norm` of logging steps.
Training logs (`loss`, `grad_norm`) attach to the step just made, evaluation metrics become an
evaluation report (`eval_loss` as its loss, the others without their `eval_` prefix). The callback has
no access to batches: call `callback.watcher.observe_inputs` from a custom `compute_loss` to watch them.
"""

from __future__ import annotations

from transformers import TrainerCallback

import gradwatch
from gradwatch.names import EVAL, LOSS

_HYPERPARAMETERS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm",
                    "weight_decay", "num_train_epochs", "max_steps", "seed", "lr_scheduler_type", "warmup_steps")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class GradwatchCallback(TrainerCallback):
    def __init__(self, run: str | None = None, **watch_kwargs):
        """`watch_kwargs` go to gradwatch.watch() (collector, select, schedule, config, ...)."""
        self.run = run
        self.watch_kwargs = watch_kwargs
        self.watcher = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        kwargs = dict(self.watch_kwargs)
        hyperparameters = {k: v for k in _HYPERPARAMETERS
                           if isinstance(v := getattr(args, k, None), (int, float, str, bool))}
        hyperparameters.update(kwargs.pop("hyperparameters", None) or {})
        self.watcher = gradwatch.watch(model, optimizer, run=self.run, hyperparameters=hyperparameters, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.watcher is None or not logs or not _number(logs.get("loss")):
            return  # evaluation logs come through on_evaluate, the final summary is no step
        scalars = {k: v for k, v in logs.items() if k in ("loss", "grad_norm") and _number(v)}
        self.watcher.step(**scalars)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.watcher is None or not metrics:
            return
        scalars = {(LOSS if k == "eval_loss" else k.removeprefix("eval_")): v
                   for k, v in metrics.items() if _number(v)}
        self.watcher.step(phase=EVAL, **scalars)

    def on_train_end(self, args, state, control, **kwargs):
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
