"""PyTorch Lightning callback: `Trainer(callbacks=[GradwatchCallback(run="my-run")])`.

Optional: importing this module needs `lightning` (or the older `pytorch_lightning`): the `integrations` extra;
gradwatch itself depends on neither.

Lightning runs forward and backward inside `optimizer.step(closure)`, after the optimizer's step
pre-hook, so the watcher's own window would see the previous step's gradients. The callback opens the
window in `on_before_optimizer_step` instead (after backward and AMP's unscale_, before clipping), and a
step counts when the optimizer's post-hook runs: a step that GradScaler skips makes no report. Steps are
numbered by the Trainer's `global_step` (0 first, or where a resumed run left off; a skipped step counted),
which is the step Lightning's loggers write a training step's metrics at. Training batches go to `observe_inputs` (class
labels: the last element of a tuple batch, or `batch["labels"]`, when it is a 1-D integer tensor); the loss
of each optimizer step (what `training_step` returned for each accumulated batch, divided by
`accumulate_grad_batches` as Lightning does for backward, added up: NaN stays NaN) to `watcher.step`; and
validation metrics at the end of each validation epoch to an evaluation report (`val_loss` as its loss, the
others without their `val_` prefix). Hyperparameters: the module's `hparams` (and the datamodule's), and the
Trainer's settings (max_steps, accumulate_grad_batches, gradient_clip_val, precision, ...), as plain values.
Only the first optimizer is watched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import gradwatch
from gradwatch.agent.integrations.batches import class_labels
from gradwatch.agent.integrations.hyperparameters import plain
from gradwatch.names import EVAL, LOSS

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the package's older name
    from pytorch_lightning.callbacks import Callback

TRAINER_SETTINGS = ("max_epochs", "max_steps", "accumulate_grad_batches", "gradient_clip_val",
                    "gradient_clip_algorithm", "precision", "world_size", "val_check_interval",
                    "check_val_every_n_epoch")


def hyperparameters(trainer, pl_module) -> dict:
    """The module's and the datamodule's hparams, then the Trainer's settings (what ran wins a name)."""
    datamodule = getattr(trainer, "datamodule", None)
    settings = {k: getattr(trainer, k) for k in TRAINER_SETTINGS if hasattr(trainer, k)}
    settings["strategy"] = type(trainer.strategy).__name__
    settings["accelerator"] = type(trainer.accelerator).__name__
    return plain(getattr(datamodule, "hparams", None), getattr(pl_module, "hparams", None), settings)


class GradwatchCallback(Callback):
    def __init__(self, run: str | None = None, *, observe_inputs: bool = True, **watch_kwargs):
        """`watch_kwargs` go to gradwatch.watch() (collector, select, schedule, config, labels, hyperparameters:
        added to the module's and the Trainer's)."""
        self.run = run
        self.observe_inputs = observe_inputs
        self.watch_kwargs = watch_kwargs
        self.watcher = None
        self._optimizer = None
        self._loss = None  # the step in progress: its batches' losses added up (a device tensor)
        self._global_step = 0  # the Trainer's at the start of the batch

    def on_fit_start(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        self._optimizer = optimizers[0] if optimizers else None
        kwargs = dict(self.watch_kwargs)
        params = {**hyperparameters(trainer, pl_module), **plain(kwargs.pop("hyperparameters", None))}
        self.watcher = gradwatch.watch(pl_module, self._optimizer, run=self.run, hyperparameters=params, **kwargs)
        self.watcher.external_window = True

    def on_train_start(self, trainer, pl_module) -> None:
        if self.watcher is not None:  # after a checkpoint restored the step count
            self.watcher.number_steps_from(trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.watcher is None:
            return
        self._global_step = trainer.global_step
        if pl_module.automatic_optimization:
            # Lightning counts a step that GradScaler (or the module's optimizer_step) skipped, the watcher does
            # not: follow Lightning. (Manual optimization counts every optimizer's steps: the watcher's own count.)
            self.watcher.number_steps_from(trainer.global_step)
        if self.observe_inputs:
            self.watcher.observe_inputs(batch, labels=class_labels(batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.watcher is not None and getattr(optimizer, "_optimizer", optimizer) is self._optimizer:
            self.watcher.capture_window()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.watcher is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        if isinstance(loss, (torch.Tensor, float, int)):
            self._loss = loss if self._loss is None else self._loss + loss
        if trainer.global_step != self._global_step:  # else a batch of gradient accumulation: its loss waits
            self.watcher.step(**({LOSS: self._loss} if self._loss is not None else {}))
            self._loss = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.watcher is None or trainer.sanity_checking:
            return
        scalars = {}
        for key, value in trainer.callback_metrics.items():
            if not key.startswith("val") or not isinstance(value, (torch.Tensor, float, int)):
                continue
            name = LOSS if key in ("val_loss", "val/loss") else key.removeprefix("val_").removeprefix("val/")
            scalars[name] = value
        if scalars:
            self.watcher.step(phase=EVAL, **scalars)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.watcher is not None and stage == "fit":
            self.watcher.close()
            self.watcher = None
            self._loss = None
