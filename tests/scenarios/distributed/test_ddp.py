"""A real two-process DDP job (gloo, CPU) reporting to a real gRPC server in the pytest process.

Each rank runs this file as a script (a fresh interpreter, as torchrun would start it): init the
process group over tcp://127.0.0.1, wrap the model in DDP, watch it, train a few steps on its own
data, close the watcher, destroy the process group. The test then checks what the ranks sent: one
registration per rank, sequences 1..N, the same tensor names, and gradients equal across ranks at
every step, because DDP all-reduces them before the optimizer step the agent hooks.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.v1 import run_pb2
from tests.scenarios.distributed.ranks import run_ranks

WORLD_SIZE = 2
STEPS = 5
RUN = "ddp-test"
JOB_TIMEOUT_S = 60  # a hang guard only: the job takes a few seconds


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def worker(rank: int, world_size: int, port: int, collector: str, steps: int) -> None:
    """One rank of the job (runs in a child process)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=30))
    try:
        model = DistributedDataParallel(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        watcher = gradwatch.watch(model, opt, run=RUN, collector=collector)
        data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches: local gradients differ
        for _ in range(steps):
            loss = model(torch.randn(4, 8, generator=data)).pow(2).mean()
            loss.backward()  # DDP averages the gradients across ranks here
            opt.step()       # the agent's pre-hook captures them now
            opt.zero_grad(set_to_none=True)
            watcher.step(loss=loss)
        watcher.close()
        c = watcher.counters
        if (c.exported, c.dropped, c.internal_errors) != (steps, 0, 0):
            raise SystemExit(f"rank {rank}: unexpected counters {c}")
        dist.barrier()  # neither rank tears the group down while its peer still trains
    finally:
        dist.destroy_process_group()
    if dist.is_initialized():
        raise SystemExit(f"rank {rank}: process group still initialized")


def test_ddp_ranks_report_consistent_names_and_equal_gradients(ingest, tmp_path):
    run_ranks(__file__, WORLD_SIZE, tmp_path, JOB_TIMEOUT_S, lambda rank: [ingest.target, str(STEPS)])

    registrations = [reg for req in ingest.requests for reg in req.registrations]
    assert sorted((r.rank, r.world_size, r.run_id) for r in registrations) == [(0, 2, RUN), (1, 2, RUN)]
    names = {r.rank: {t.id: t.name for t in r.tensors} for r in registrations}
    kinds = {r.rank: {t.id: t.kind for t in r.tensors} for r in registrations}
    assert sorted(names[0].values()) == sorted(names[1].values())  # the same dictionary on both ranks
    assert {"0.weight", "0.weight.grad", "2.bias.grad"} <= set(names[0].values())

    by_rank = {rank: [r for r in ingest.reports if r.rank == rank] for rank in range(WORLD_SIZE)}
    for rank, reports in by_rank.items():
        assert [r.sequence for r in reports] == list(range(1, STEPS + 1)), rank
        assert [r.step for r in reports] == list(range(STEPS)) and all(r.run_id == RUN for r in reports)

    def stats(report, rank):
        return {names[rank][s.tensor_id]: (kinds[rank][s.tensor_id], s) for s in report.tensors}

    for r0, r1 in zip(by_rank[0], by_rank[1], strict=True):
        assert r0.loss != r1.loss  # different data on each rank...
        s0, s1 = stats(r0, 0), stats(r1, 1)
        assert s0.keys() == s1.keys()
        grads = [name for name, (kind, _) in s0.items() if kind == run_pb2.TENSOR_KIND_GRADIENT]
        assert len(grads) == 4
        for name in grads:  # ...yet the same gradients after DDP's all-reduce
            g0, g1 = s0[name][1], s1[name][1]
            assert g0.sum_squares > 0 and g0.count == g1.count
            assert g0.sum_squares == pytest.approx(g1.sum_squares, rel=1e-6, abs=1e-12), (r0.step, name)
            assert g0.sum == pytest.approx(g1.sum, rel=1e-6, abs=1e-9), (r0.step, name)
        for name in s0.keys() - set(grads):  # and replicas whose parameters stay in step
            assert s0[name][1].sum_squares == pytest.approx(s1[name][1].sum_squares, rel=1e-6), (r0.step, name)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
