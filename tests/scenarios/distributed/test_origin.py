"""The NaN/Inf origin check in a real two-process job (gloo, CPU; DDP and FSDP2 `fully_shard`) reporting to a
real gRPC server in the pytest process, with the default selection.

Only rank 1 produces a NaN, in the forward pass of a middle block, at step 2. Rank 1 reports the forward origin
naming that module (and the loss's own gradient as the backward origin); rank 0 reports no origin although
its gradients are NaN too after the cross-rank reduction: its own forward and backward stayed finite. Each
rank runs this file as a script, as test_ddp.py does.
"""

from __future__ import annotations

import math
import sys
from datetime import timedelta

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.v1 import report_pb2, run_pb2
from tests.scenarios.distributed.ranks import run_ranks

WORLD_SIZE = 2
STEPS, BAD_STEP, BAD_RANK = 3, 2, 1
RUN = "origin-distributed"
JOB_TIMEOUT_S = 90  # a hang guard only: the job takes a few seconds


class Act(nn.Module):
    def __init__(self):
        super().__init__()
        self.poison = False

    def forward(self, x):
        y = torch.tanh(x)
        if self.poison:
            y = y.clone()  # tanh keeps its output for backward
            y[0, 0] = math.nan
        return y


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(8, 16), Act(), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.out(self.act(self.fc(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def worker(rank: int, world_size: int, port: int, collector: str, mode: str) -> None:
    """One rank of the job (runs in a child process)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=30))
    try:
        net = Net()
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model, blocks = DistributedDataParallel(net), net.blocks
        else:
            from torch.distributed.fsdp import fully_shard

            for block in net.blocks:
                fully_shard(block)
            model = fully_shard(net)
            blocks = net.blocks
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        watcher = gradwatch.watch(model, opt, run=f"{RUN}-{mode}", collector=collector)
        data = torch.Generator().manual_seed(1000 + rank)
        for step in range(STEPS):
            blocks[1].act.poison = rank == BAD_RANK and step == BAD_STEP
            loss = model(torch.randn(4, 4, generator=data)).pow(2).mean()
            loss.backward()  # the reduction spreads rank 1's NaN gradients to rank 0
            opt.step()
            opt.zero_grad(set_to_none=True)
            watcher.step(loss=loss)
        watcher.close()
        c = watcher.counters
        if (c.exported, c.dropped, c.internal_errors) != (STEPS, 0, 0):
            raise SystemExit(f"rank {rank}: unexpected counters {c}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_job(ingest, tmp_path, mode: str) -> None:
    run_ranks(__file__, WORLD_SIZE, tmp_path, JOB_TIMEOUT_S, lambda rank: [ingest.target, mode])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_only_the_rank_that_made_the_nan_names_its_forward_origin(ingest, tmp_path, mode):
    run_job(ingest, tmp_path, mode)
    reports = {rank: [r for r in ingest.reports if r.rank == rank] for rank in range(WORLD_SIZE)}
    for rank in range(WORLD_SIZE):
        assert [(r.step, r.sequence) for r in reports[rank]] == [(s, s + 1) for s in range(STEPS)], rank
        assert all(not r.nonfinite_origins for r in reports[rank][:BAD_STEP]), rank
    bad = reports[BAD_RANK][BAD_STEP]
    got = {o.direction: (o.module, o.observed) for o in bad.nonfinite_origins}
    act = "blocks.1.act"  # as the unwrapped model names it, under DDP too
    assert got == {report_pb2.DIRECTION_FORWARD: (act, f"{act}:output"),
                   report_pb2.DIRECTION_BACKWARD: ("(loss)", "head:output.grad")}
    forward = next(o for o in bad.nonfinite_origins if o.direction == report_pb2.DIRECTION_FORWARD)
    assert forward.order == 5  # after inp, blocks.0.fc, blocks.0.act, blocks.0.out, blocks.1.fc
    peer = reports[1 - BAD_RANK][BAD_STEP]
    assert not peer.nonfinite_origins and math.isfinite(peer.loss)  # rank 0 saw nothing born on its side...
    registration = [g for req in ingest.requests for g in req.registrations if g.rank == 1 - BAD_RANK][-1]
    kinds = {t.id: t.kind for t in registration.tensors}
    grads = [s for s in peer.tensors if kinds[s.tensor_id] == run_pb2.TENSOR_KIND_GRADIENT]
    assert any(s.nan_count for s in grads)  # ...though the reduction gave it NaN gradients


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
