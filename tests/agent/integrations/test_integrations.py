"""A torch.compile'd model is watched like the eager one, against a real gRPC server on 127.0.0.1. The trainer
integrations have their own files: test_hf.py, test_lightning.py, test_optuna.py (each skips where its framework
is not installed: gradwatch depends on none of them)."""

from __future__ import annotations

import torch
from torch import nn

import gradwatch
from gradwatch.v1 import run_pb2
from tests.agent.capture.test_updates import dictionary

GRADIENT, INPUT = run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_INPUT


def grad_sumsq(report, names) -> float:
    return sum(s.sum_squares for s in report.tensors if names[s.tensor_id].kind == GRADIENT)


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
