"""Gradient checking: a model with a correct custom autograd Function passes, one whose backward is wrong
fails and names the tensor; both results travel to the aggregator as evaluation scalars gradcheck/*.

    python examples/gradcheck.py
    gradwatch gradcheck examples/gradcheck.py:broken      # the table alone; exit status 1: it fails

The broken Function's backward averages the bias gradient over the batch instead of summing it, the kind
of slip that trains (slowly) and that no loss curve reveals.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import gradwatch.agent.gradcheck


class LinearFunction(torch.autograd.Function):
    """y = x W^T + b with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad @ weight, grad.T @ x, grad.sum(0)


class BrokenLinearFunction(LinearFunction):
    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return grad @ weight, grad.T @ x, grad.mean(0)  # the bug: a batch of 32 makes it 32x too small


class CustomLinear(nn.Linear):
    function = LinearFunction

    def forward(self, x):
        return self.function.apply(x, self.weight, self.bias)


class BrokenLinear(CustomLinear):
    function = BrokenLinearFunction


def _case(hidden: type[nn.Module]):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), act1=nn.Tanh(), hidden=hidden(32, 32), act2=nn.Tanh(),
                                      head=nn.Linear(32, 4)))
    x = torch.randn(32, 16)
    y = (x[:, :4] * 2).argmax(1)  # a learnable rule
    return model, nn.CrossEntropyLoss(), (x, y)


def correct():
    """(model, loss_fn, batch) with a correct custom Function in layer `hidden`."""
    return _case(CustomLinear)


def broken():
    """The same with the broken Function: hidden.bias must fail, every other tensor pass."""
    return _case(BrokenLinear)


def main() -> int:
    from common import arguments, finish, local_stack

    args = arguments(__doc__)
    result: dict = {}
    with local_stack() as local:
        for name, case in (("correct", correct), ("broken", broken)):
            model, loss_fn, (x, y) = case()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            run = f"gradcheck-{name}"
            print(f"\nrun {run}: gradcheck before training, then 30 steps", flush=True)
            with local.watch(model, optimizer, run=run) as watcher:
                report = gradwatch.agent.gradcheck.gradcheck(model, loss_fn, (x, y), watcher=watcher)
                print(report.table(), flush=True)
                for _ in range(30):
                    loss = loss_fn(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    watcher.step(loss=loss)
            print(f"  {watcher.counters.exported} reports exported, {watcher.counters.dropped} dropped", flush=True)
            local.wait_step(run, 29)
            sent = local.metric("gradwatch_run_eval_scalar", run=run, name="gradcheck/passed")
            print(f"the aggregator has gradcheck/passed = {sent} for run {run} "
                  f"(gradwatch_run_eval_scalar on /metrics)", flush=True)
            result[name] = {"passed": report.passed, "failed": report.failed, "telemetry_passed": sent,
                            "max_relative_error": {t.name: t.max_relative_error for t in report.tensors}}
    ok = (result["correct"]["passed"] and result["correct"]["telemetry_passed"] == 1.0
          and result["broken"]["failed"] == ["hidden.bias"] and result["broken"]["telemetry_passed"] == 0.0)
    return finish(args, ok, result, "the correct Function passed, the broken one failed on hidden.bias, and the "
                                    "aggregator has both verdicts" if ok else "unexpected gradcheck results")


if __name__ == "__main__":
    raise SystemExit(main())
