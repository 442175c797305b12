"""gradwatch.agent.gradcheck.gradcheck on real models: correct ones pass (smooth, kinked, convolutional with batch norm
and dropout in training mode), wrong custom autograd Functions fail and are named, the user's model and
RNG are left alone, and the CLI prints the table with exit status 1 on failure."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent.gradcheck import GradcheckReport, TensorCheck, gradcheck, load_spec
from gradwatch.cli import main as cli
from gradwatch.cli.redis_server import free_port

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gradcheck.py"


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny float64 passes: a second thread spin-waits for a core that a busy machine lacks."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ScaledTanh(torch.autograd.Function):
    """tanh(x) * 2 with a hand-written backward; `wrong` drops the factor 2 from the input gradient."""

    wrong = False

    @classmethod
    def forward(cls, ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return 2 * y

    @classmethod
    def backward(cls, ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y) * (1 if cls.wrong else 2)


class WrongScaledTanh(ScaledTanh):
    wrong = True


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


def mlp(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(8, 16), act=act, fc2=nn.Linear(16, 3)))


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(4 * 4 * 4, 3))


@pytest.mark.parametrize("make", [lambda: mlp(nn.Tanh()), lambda: mlp(nn.ReLU()), lambda: mlp(nn.GELU()),
                                  lambda: mlp(Act(ScaledTanh))], ids=["tanh", "relu", "gelu", "custom-function"])
def test_correct_models_pass(make):
    report = gradcheck(make(), nn.CrossEntropyLoss(), batch(), samples=20)
    assert report.passed, report.table()
    assert [t.name for t in report.tensors] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert report.max_relative_error < 1e-6
    assert {t.checked for t in report.tensors} == {20, 16, 3}  # fc2.bias has 3 coordinates: all of them


@pytest.mark.parametrize("train", [False, True], ids=["eval-mode", "train-mode"])
def test_convolution_with_batch_norm_and_dropout_passes(train):
    model = convnet()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 3
    report = gradcheck(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), (x, y), train=train)
    assert report.passed, report.table()
    assert "1.weight" in [t.name for t in report.tensors]  # batch norm's scale is checked too


def test_wrong_custom_function_fails_and_names_the_tensors_behind_it():
    report = gradcheck(mlp(Act(WrongScaledTanh)), nn.CrossEntropyLoss(), batch())
    assert not report.passed
    # The input gradient is half what it should be: every tensor before the Function is wrong, none after.
    assert report.failed == ["fc1.weight", "fc1.bias"]
    worst = report.tensors[0]
    assert worst.max_relative_error == pytest.approx(0.5, rel=1e-3)
    assert worst.analytic == pytest.approx(worst.numeric / 2, rel=1e-4)
    table = report.table()
    assert "FAILED: 2 of 4 tensors" in table and "fc1.bias" in table and table.count("FAIL") == 3


def test_example_broken_function_names_the_bias():
    correct, broken = load_spec(f"{EXAMPLE}:correct"), load_spec(f"{EXAMPLE}:broken")
    assert gradcheck(*correct).passed
    assert gradcheck(*broken).failed == ["hidden.bias"]


def test_the_users_model_gradients_rng_and_mode_are_left_alone():
    model = convnet().train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    gradcheck(model, nn.CrossEntropyLoss(), (x, y), train=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and next(model.parameters()).dtype == torch.float32
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and torch.equal(p.grad, before[n][1]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n  # batch norm's running statistics too


def test_gradwatch_hooks_do_not_see_the_float64_copy():
    model = mlp(nn.Tanh())
    watcher = gradwatch.watch(model, run="gradcheck-hooks", collector=f"127.0.0.1:{free_port()}",
                              select="preset:business")
    try:
        gradcheck(model, nn.CrossEntropyLoss(), batch())
        # The watcher learns the forward order at the first forward pass it sees: it saw none.
        assert watcher._capture.activations.exec_order == {}
        model(batch()[0])
        assert list(watcher._capture.activations.exec_order) == ["fc1", "act", "fc2"]
    finally:
        watcher.close(timeout=0.1)


def test_unused_frozen_and_non_contiguous_parameters():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8).t())  # non-contiguous (8, 3)
            self.unused = nn.Parameter(torch.randn(4))
            self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)

        def forward(self, x):
            return torch.sin(x @ self.w) + self.frozen

    report = gradcheck(Odd(), nn.CrossEntropyLoss(), batch())
    assert report.passed, report.table()
    assert [t.name for t in report.tensors] == ["w", "unused"]  # frozen ones are not checked
    unused = report.tensors[1]
    assert unused.max_abs_error == 0 and unused.analytic == 0 == unused.numeric


def test_telemetry_goes_to_the_watcher_as_evaluation_scalars():
    class Recorder:
        def step(self, phase="train", **scalars):
            self.call = (phase, scalars)

    recorder = Recorder()
    report = gradcheck(mlp(Act(WrongScaledTanh)), nn.CrossEntropyLoss(), batch(), watcher=recorder)
    phase, scalars = recorder.call
    assert phase == "eval"
    assert scalars["gradcheck/passed"] == 0.0
    assert scalars["gradcheck/max_relative_error"] == report.max_relative_error
    assert scalars["gradcheck/fc1.bias"] == report.tensors[1].max_relative_error
    assert set(scalars) == {"gradcheck/passed", "gradcheck/max_relative_error", "gradcheck/fc1.weight",
                            "gradcheck/fc1.bias", "gradcheck/fc2.weight", "gradcheck/fc2.bias"}


def test_scalars_are_bounded_worst_first():
    tensors = [TensorCheck(f"t{i}", (1,), 1, float(i), 0.0, (0,), 0.0, 0.0, True) for i in range(40)]
    scalars = GradcheckReport(tensors).scalars()
    assert len(scalars) == 2 + 30 and "gradcheck/t39" in scalars and "gradcheck/t9" not in scalars


def test_bad_arguments():
    with pytest.raises(ValueError, match="one-element"):
        gradcheck(mlp(nn.Tanh()), lambda m, b: m(b[0]), batch())
    with pytest.raises(ValueError, match="eps"):
        gradcheck(mlp(nn.Tanh()), nn.CrossEntropyLoss(), batch(), eps=0)
    assert not GradcheckReport().passed and math.isnan(GradcheckReport().max_relative_error)


def test_cli_prints_the_table_and_fails_on_a_wrong_gradient(capsys):
    assert cli.main(["gradcheck", f"{EXAMPLE}:correct", "--samples", "5"]) == 0
    assert "gradcheck passed" in capsys.readouterr().out
    assert cli.main(["gradcheck", f"{EXAMPLE}:broken"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 1 of 6 tensors" in out
    assert [line.split()[0] for line in out.splitlines() if line.rstrip().endswith("FAIL")] == ["hidden.bias"]


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "MODULE:FUNCTION"),
    ("examples/none.py:f", "no such file"),
    (f"{EXAMPLE}:missing", "no function 'missing'"),
    ("gradwatch.agent.gradcheck:DEFAULT_EPS", "no function"),
    ("gradwatch.cli.runs:DEFAULT_URL", "no function"),
])
def test_cli_bad_spec_is_one_line(capsys, spec, message):
    assert cli.main(["gradcheck", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
