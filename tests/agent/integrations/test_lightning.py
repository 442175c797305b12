"""The Lightning callback in a real `lightning.Trainer`, against a real gRPC server on 127.0.0.1: captured after
backward, a loss on every optimizer step (NaN as NaN), the step numbers Lightning's loggers write, the module's
hparams and the Trainer's settings as plain values, inputs and labels observed. Skips where Lightning is not
installed."""

from __future__ import annotations

import enum
import math

import pytest
import torch
from torch import nn

from gradwatch.v1 import report_pb2, run_pb2
from tests.agent.capture.test_updates import dictionary

pl = pytest.importorskip("lightning.pytorch")

from gradwatch.agent.integrations.lightning import GradwatchCallback  # noqa: E402

GRADIENT, INPUT = run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_INPUT
BATCH, ACCUMULATE, STEPS = 4, 2, 5
NAN_BATCH = 5  # the second batch of the third optimizer step


class Schedule(enum.Enum):
    COSINE = "cosine"


class RecordingLogger(pl.loggers.Logger):
    """The steps Lightning writes metrics at, and the hyperparameters it hands to loggers."""

    def __init__(self):
        super().__init__()
        self.steps: list[int] = []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        if "train_loss" in metrics:
            self.steps.append(step)


class Module(pl.LightningModule):
    def __init__(self, lr: float = 0.1, schedule: Schedule = Schedule.COSINE, optimizer: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.grad_sumsq: list[float] = []  # what the optimizer step will use, seen by the module itself
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if len(self.losses) == NAN_BATCH:
            loss = loss + torch.tensor(math.nan)  # a constant: the gradients stay finite
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def on_before_optimizer_step(self, optimizer):
        self.grad_sumsq.append(sum(float(p.grad.double().pow(2).sum()) for p in self.parameters()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, **self.hparams.optimizer)


def test_lightning_callback(ingest, tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 6), torch.randint(0, 3, (48,)))
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    module = Module(optimizer={"momentum": 0.5})
    callback, logger = GradwatchCallback(run="lightning-1", collector=ingest.target), RecordingLogger()
    trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, val_check_interval=4,
                         limit_val_batches=2, log_every_n_steps=1, callbacks=[callback], logger=logger,
                         accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader, loader)
    assert callback.watcher is None  # closed at the end of fit
    names = dictionary(ingest)
    train = [r for r in ingest.reports if r.phase == report_pb2.PHASE_TRAIN]
    evals = [r for r in ingest.reports if r.phase == report_pb2.PHASE_EVAL]
    # Optimizer steps, not batches, numbered as Lightning's loggers number them.
    assert [r.step for r in train] == logger.steps == list(range(STEPS))
    # Captured after backward: the gradients the module saw in the same hook, not the previous step's.
    for report, expected in zip(train, module.grad_sumsq, strict=True):
        assert sum(s.sum_squares for s in report.tensors if names[s.tensor_id].kind == GRADIENT) == pytest.approx(
            expected, rel=1e-6)
    # Every step's loss: its batches' losses over accumulate_grad_batches, added up; the NaN one is NaN.
    expected = [sum(module.losses[i:i + ACCUMULATE]) / ACCUMULATE for i in range(0, 2 * STEPS, ACCUMULATE)]
    assert all(r.HasField("loss") for r in train) and math.isnan(train[2].loss)
    for report, loss in zip(train, expected, strict=True):
        if not math.isnan(loss):
            assert report.loss == pytest.approx(loss, rel=1e-6)
    assert all(list(r.learning_rates) == [0.1] for r in train)
    inputs = {names[s.tensor_id].name for s in train[0].tensors if names[s.tensor_id].kind == INPUT}
    assert inputs == {"inputs.0", *(f"inputs.0[{c}]" for c in range(6)), "inputs.1"}
    assert sum(v for r in train for k, v in r.scalars.items() if k.startswith("labels/")) == STEPS * ACCUMULATE * BATCH
    assert evals and all(r.loss > 0 and 0 <= r.scalars["acc"] <= 1 and not r.tensors for r in evals)

    hp = [r for req in ingest.requests for r in req.registrations][-1].hyperparameters
    assert hp["lr"].number == 0.1 and hp["schedule"].text == "cosine" and hp["optimizer.momentum"].number == 0.5
    assert hp["max_steps"].integer == STEPS and hp["accumulate_grad_batches"].integer == ACCUMULATE
    assert hp["precision"].text == "32-true" and hp["strategy"].text == "SingleDeviceStrategy"
    assert "gradient_clip_val" not in hp  # None: not set, not sent


def test_a_skipped_step_is_counted_as_lightning_counts_it(ingest, tmp_path):
    class Skipping(Module):
        """Step 2 runs forward and backward but makes no update, as after a GradScaler overflow."""

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            if self.trainer.global_step == 2:
                optimizer_closure()
                return
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))
    module, logger = Skipping(optimizer={}), RecordingLogger()
    trainer = pl.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, log_every_n_steps=1, logger=logger,
                         callbacks=[GradwatchCallback(run="lightning-skip", collector=ingest.target)],
                         accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH))
    train = [r for r in ingest.reports if r.phase == report_pb2.PHASE_TRAIN]
    assert logger.steps == [0, 1, 2, 3, 4]
    assert [r.step for r in train] == [0, 1, 3, 4]  # step 2 made no update: no report, the numbers go on
    losses = [sum(module.losses[i:i + ACCUMULATE]) / ACCUMULATE for i in range(0, 2 * STEPS, ACCUMULATE)]
    for report, loss in zip(train, [losses[0], losses[1], losses[3], losses[4]], strict=True):
        if not math.isnan(loss):  # each step its own loss: the skipped one's went with it
            assert report.loss == pytest.approx(loss, rel=1e-6)


def test_per_token_labels_are_inputs_but_not_classes(ingest, tmp_path):
    class Tagger(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 10)

        def training_step(self, batch, batch_idx):
            tokens, tags = batch
            return nn.functional.cross_entropy(self.head(self.embed(tokens)).flatten(0, 1), tags.flatten())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randint(0, 10, (8, 5)), torch.randint(0, 10, (8, 5)))
    callback = GradwatchCallback(run="lightning-tokens", collector=ingest.target)
    trainer = pl.Trainer(max_steps=2, callbacks=[callback], accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(Tagger(), torch.utils.data.DataLoader(data, batch_size=4))
    names = dictionary(ingest)
    train = [r for r in ingest.reports if r.phase == report_pb2.PHASE_TRAIN]
    assert [r.step for r in train] == [0, 1]
    assert {names[s.tensor_id].name for s in train[0].tensors if names[s.tensor_id].kind == INPUT} == {
        "inputs.0", "inputs.1"}
    assert not any(k.startswith("labels") for r in train for k in r.scalars)
