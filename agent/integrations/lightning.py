"""PyTorch Lightning callback: `Trainer(callbacks=[GradwatchCallback(run="my-run")])`.

Optional: importing this module needs `lightning` (or the older `pytorch_lightning`); gradwatch itself
does not depend on either.

Lightning runs forward and backward inside `optimizer.step(closure)`, after the optimizer's step
pre-hook, so the watcher's own window would see the previous step's gradients. The callback opens the
window in `on_before_optimizer_step` instead (after backward and AMP's unscale_, before clipping), and a
step counts when the optimizer's post-hook runs: a step that GradScaler skips is no step. Training
batches go to `observe_inputs` (labels: the last element of a tuple batch, or `batch["labels"]`, when
it is an integer tensor), the training loss to `watcher.step`, and validation metrics at the end of
each validation epoch to an evaluation report (`val_loss` as its loss, the others without their `val_`
prefix). Only the first optimizer is watched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import gradwatch
from gradwatch.names import EVAL, LOSS

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the package's older name
    from pytorch_lightning.callbacks import Callback


def labels_of(batch: object) -> torch.Tensor | None:
    """Integer class labels of a batch, when it carries them where they usually are."""
    candidate = None
    if isinstance(batch, Mapping):
        candidate = batch.get("labels", batch.get("label"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        candidate = batch[-1]
    if isinstance(candidate, torch.Tensor) and not candidate.is_floating_point() and candidate.dtype != torch.bool:
        return candidate
    return None


class GradwatchCallback(Callback):
    def __init__(self, run: str | None = None, *, observe_inputs: bool = True, **watch_kwargs):
        """`watch_kwargs` go to gradwatch.watch() (collector, select, schedule, config, ...)."""
        self.run = run
        self.observe_inputs = observe_inputs
        self.watch_kwargs = watch_kwargs
        self.watcher = None
        self._optimizer = None

    def on_fit_start(self, trainer, pl_module) -> None:
        optimizers = trainer.optimizers
        self._optimizer = optimizers[0] if optimizers else None
        self.watcher = gradwatch.watch(pl_module, self._optimizer, run=self.run, **self.watch_kwargs)
        self.watcher.external_window = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.watcher is not None and self.observe_inputs:
            self.watcher.observe_inputs(batch, labels=labels_of(batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.watcher is not None and getattr(optimizer, "_optimizer", optimizer) is self._optimizer:
            self.watcher.capture_window()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.watcher is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self.watcher.step(**({LOSS: loss} if isinstance(loss, (torch.Tensor, float, int)) else {}))

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
