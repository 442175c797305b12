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


def test_a_wrapped_model_names_its_layers_as_the_model_itself(ingest):
    """DataParallel, torch.compile and both: the wrappers only run the model, so its layers keep the model's names
    (a DDP run lines up with the same model in one process; tests/scenarios/distributed checks DDP on gloo ranks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    own = {n for n, _ in model.named_parameters()} | {f"{n}.grad" for n, _ in model.named_parameters()}
    wrappers = {"dp": nn.DataParallel(model), "compiled": torch.compile(model, backend="aot_eager"),
                "compiled-dp": torch.compile(nn.DataParallel(model), backend="aot_eager")}
    for run, wrapped in wrappers.items():
        ingest.requests.clear()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradwatch.watch(wrapped, opt, run=f"wrapped-{run}", collector=ingest.target) as w:
            wrapped(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            w.step()
        assert w.model is model, run
        names = {t.name for t in dictionary(ingest).values()}
        assert own <= names and not any(n.startswith(("module.", "_orig_mod.")) for n in names), (run, names)
        assert w.counters.exported == 1 and w.counters.internal_errors == 0, (run, w.counters)
