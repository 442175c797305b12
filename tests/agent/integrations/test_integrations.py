"""Integrations and compiled models: a real Lightning Trainer, a real Hugging Face Trainer and a
torch.compile'd model, each against a real gRPC server on 127.0.0.1. The integration tests skip where
the framework is not installed (gradwatch depends on neither)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.v1 import report_pb2, run_pb2
from tests.agent.capture.test_updates import dictionary

GRADIENT, INPUT = run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_INPUT


def grad_sumsq(report, names) -> float:
    return sum(s.sum_squares for s in report.tensors if names[s.tensor_id].kind == GRADIENT)


def test_lightning_callback_captures_after_backward_and_counts_optimizer_steps(ingest, tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.agent.integrations.lightning import GradwatchCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
            self.grad_sumsq: list[float] = []  # what the optimizer step will use, seen by the module itself

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))
            self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

        def on_before_optimizer_step(self, optimizer):
            self.grad_sumsq.append(sum(float(p.grad.double().pow(2).sum()) for p in self.parameters()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 6), torch.randint(0, 3, (48,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    module = Module()
    callback = GradwatchCallback(run="lightning-1", collector=ingest.target)
    trainer = pl.Trainer(max_steps=5, accumulate_grad_batches=2, val_check_interval=4, limit_val_batches=2,
                         callbacks=[callback],
                         accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader, loader)
    assert callback.watcher is None  # closed at the end of fit
    names = dictionary(ingest)
    train = [r for r in ingest.reports if r.phase == report_pb2.PHASE_TRAIN]
    evals = [r for r in ingest.reports if r.phase == report_pb2.PHASE_EVAL]
    assert [r.step for r in train] == [0, 1, 2, 3, 4]  # optimizer steps, not batches
    # Captured after backward: the gradients the module saw in the same hook, not the previous step's.
    for report, expected in zip(train, module.grad_sumsq, strict=True):
        assert grad_sumsq(report, names) == pytest.approx(expected, rel=1e-6)
    assert all(r.loss > 0 and list(r.learning_rates) == [0.1] for r in train)
    inputs = {names[s.tensor_id].name for s in train[0].tensors if names[s.tensor_id].kind == INPUT}
    assert inputs == {"inputs.0", *(f"inputs.0[{c}]" for c in range(6)), "inputs.1"}
    assert sum(v for r in train for k, v in r.scalars.items() if k.startswith("labels/")) == 5 * 2 * 4
    assert evals and all(r.loss > 0 and 0 <= r.scalars["acc"] <= 1 and not r.tensors for r in evals)


def test_hugging_face_trainer_callback(ingest, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradwatch.agent.integrations.hf import GradwatchCallback

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    torch.manual_seed(0)
    rows = [{"x": torch.randn(6), "labels": int(torch.randint(0, 3, ()))} for _ in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=0.05, logging_steps=2, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=8,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    callback = GradwatchCallback(run="hf-1", collector=ingest.target)
    trainer = transformers.Trainer(model=Model(), args=args, train_dataset=rows, eval_dataset=rows[:16],
                                   callbacks=[callback])
    trainer.train()
    assert callback.watcher is None
    names = dictionary(ingest)
    train = [r for r in ingest.reports if r.phase == report_pb2.PHASE_TRAIN]
    evals = [r for r in ingest.reports if r.phase == report_pb2.PHASE_EVAL]
    assert [r.step for r in train] == list(range(6))
    assert all(grad_sumsq(r, names) > 0 for r in train)
    logged = [r for r in train if r.HasField("loss")]
    assert [r.step for r in logged] == [1, 3, 5]  # logging steps 2, 4, 6 are optimizer steps 1, 3, 5
    assert all(r.scalars["grad_norm"] > 0 for r in logged)
    assert [r.step for r in evals] == [2, 5] and all(r.loss > 0 for r in evals)
    reg = [r for req in ingest.requests for r in req.registrations][-1]
    assert reg.hyperparameters["gradient_accumulation_steps"].integer == 2


def test_compiled_model_is_watched_like_the_eager_one(ingest):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    w = gradwatch.watch(model, opt, run="compiled-1", collector=ingest.target, select="activations:on,updates:on")
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(3):
        x = torch.randn(4, 8)
        w.observe_inputs(x)
        compiled(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        w.step()
    w.close()
    names = dictionary(ingest)
    assert [r.step for r in ingest.reports] == [0, 1, 2]
    for report in ingest.reports:
        kinds = {names[s.tensor_id].kind for s in report.tensors}
        assert {GRADIENT, run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_UPDATE, INPUT,
                run_pb2.TENSOR_KIND_ACTIVATION} <= kinds
        assert grad_sumsq(report, names) > 0
    assert w.counters.internal_errors == 0
