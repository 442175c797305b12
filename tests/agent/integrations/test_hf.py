"""The Hugging Face callback in a real `transformers.Trainer` (with accelerate), against a real gRPC server on
127.0.0.1: a loss on every optimizer step with the default logging settings, a NaN loss as NaN, the Trainer's
step numbers, plain hyperparameters, inputs and labels observed. Skips where transformers is not installed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradwatch.v1 import report_pb2, run_pb2
from tests.agent.capture.test_updates import dictionary

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradwatch.agent.integrations.hf import GradwatchCallback, find_trainer  # noqa: E402

GRADIENT, INPUT = run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_INPUT
BATCH, ACCUMULATE, STEPS = 4, 2, 6


class Model(nn.Module):
    """Logs each micro-batch's loss; the forward call `nan_at` (0-based) returns a NaN loss whose gradients are
    the finite ones of the same batch, so only the loss is non-finite."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.nan_at = nan_at
        self.losses: list[float] = []

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels)
        if self.training:
            if len(self.losses) == self.nan_at:
                loss = loss + torch.tensor(math.nan)  # a constant: the backward is the finite one
            self.losses.append(float(loss.detach()))
        return {"loss": loss, "logits": logits}


class Probe(transformers.TrainerCallback):
    """What the Trainer itself says: its step numbers, its evaluation steps and its logs."""

    def __init__(self):
        self.steps, self.evaluations, self.logs = [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations.append(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs or {})))


class SkipStep(transformers.TrainerCallback):
    """Makes optimizer step `at` a skipped one, as accelerate's GradScaler skips a step after an overflow: the
    Trainer goes on and counts it, the real optimizer never steps."""

    def __init__(self, at: int):
        self.at = at

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 == self.at:
            optimizer.step = lambda *a, **k: None  # the instance's: this step only
        else:
            vars(optimizer).pop("step", None)


def train(ingest, tmp_path, model: Model, callbacks=(), **extra):
    torch.manual_seed(0)
    rows = [{"x": torch.randn(6), "labels": int(torch.randint(0, 3, ()))} for _ in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATE, learning_rate=0.05, eval_strategy="steps", eval_steps=3,
        per_device_eval_batch_size=8, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, **extra)
    callback, probe = GradwatchCallback(run="hf-1", collector=ingest.target), Probe()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:16],
                                   callbacks=[callback, probe, *callbacks])
    trainer.train()
    assert callback.watcher is None  # closed at the end of train()
    assert "training_step" not in vars(trainer)  # the Trainer's own method again
    train_reports = [r for r in ingest.reports if r.phase == report_pb2.PHASE_TRAIN]
    evals = [r for r in ingest.reports if r.phase == report_pb2.PHASE_EVAL]
    return train_reports, evals, probe


def test_every_step_has_its_unfiltered_loss_at_the_trainers_step_number(ingest, tmp_path):
    model = Model(nan_at=2 * ACCUMULATE + 1)  # the second micro-batch of the third step
    reports, evals, probe = train(ingest, tmp_path, model)  # logging_steps: the default 500
    assert not [s for s, logs in probe.logs if "loss" in logs]  # the Trainer logged no training loss at all
    assert [r.step for r in reports] == probe.steps == list(range(1, STEPS + 1))
    assert [r.step for r in evals] == probe.evaluations == [3, 6] and all(r.loss > 0 for r in evals)
    # The step's loss as the Trainer adds it up: each micro-batch's loss over the accumulation steps.
    expected = [sum(model.losses[i:i + ACCUMULATE]) / ACCUMULATE for i in range(0, len(model.losses), ACCUMULATE)]
    assert all(r.HasField("loss") for r in reports)
    assert math.isnan(reports[2].loss) and math.isnan(expected[2])
    for report, loss in zip(reports, expected, strict=True):
        if not math.isnan(loss):
            assert report.loss == pytest.approx(loss, rel=1e-6)

    names = dictionary(ingest)
    assert all(sum(s.sum_squares for s in r.tensors if names[s.tensor_id].kind == GRADIENT) > 0 for r in reports)
    inputs = {names[s.tensor_id].name for s in reports[0].tensors if names[s.tensor_id].kind == INPUT}
    assert inputs == {"inputs.x", *(f"inputs.x[{c}]" for c in range(6)), "inputs.labels"}
    labels = sum(v for r in reports for k, v in r.scalars.items() if k.startswith("labels/"))
    assert labels == STEPS * ACCUMULATE * BATCH  # every micro-batch's labels counted once

    reg = [r for req in ingest.requests for r in req.registrations][-1]
    hp = reg.hyperparameters
    assert hp["lr_scheduler_type"].text == "linear" and hp["optim"].text.startswith("adamw")
    assert hp["learning_rate"].number == 0.05 and hp["gradient_accumulation_steps"].integer == ACCUMULATE
    assert hp["max_steps"].integer == STEPS and hp["total_train_batch_size"].integer == BATCH * ACCUMULATE
    assert hp["fp16"].WhichOneof("value") == "flag" and not hp["fp16"].flag
    assert not any(v.text.startswith(("SchedulerType.", "OptimizerNames.")) for v in hp.values())  # no enum reprs


def test_logging_steps_attach_the_trainers_grad_norm_to_the_same_step(ingest, tmp_path):
    model = Model()
    reports, _, probe = train(ingest, tmp_path, model, logging_steps=2, logging_nan_inf_filter=False)
    logged = {step: logs for step, logs in probe.logs if "loss" in logs}
    assert sorted(logged) == [2, 4, 6]
    by_step = {r.step: r for r in reports}
    assert sorted(s for s, r in by_step.items() if "grad_norm" in r.scalars) == [2, 4, 6]
    for step, logs in logged.items():
        assert by_step[step].scalars["grad_norm"] == pytest.approx(logs["grad_norm"], rel=1e-6)
        # The Trainer's logged loss is the average of the steps since its last log: the same losses.
        assert (by_step[step - 1].loss + by_step[step].loss) / 2 == pytest.approx(logs["loss"], rel=1e-5)


def test_a_skipped_step_is_counted_as_the_trainer_counts_it(ingest, tmp_path):
    model = Model()
    reports, evals, probe = train(ingest, tmp_path, model, callbacks=[SkipStep(at=2)])
    assert probe.steps == [1, 2, 3, 4, 5, 6]
    assert [r.step for r in reports] == [1, 3, 4, 5, 6]  # step 2 made no update: no report, the numbers go on
    assert [r.step for r in evals] == [3, 6]
    losses = [sum(model.losses[i:i + ACCUMULATE]) / ACCUMULATE for i in range(0, len(model.losses), ACCUMULATE)]
    assert reports[1].loss == pytest.approx(losses[2], rel=1e-6)  # step 3's own loss, not the skipped one's


def test_no_trainer_on_the_stack():
    assert find_trainer(GradwatchCallback()) is None
