"""A real two-process FSDP2 job (`fully_shard`, gloo, CPU) reporting to a real gRPC server in the pytest process.

Each rank summarizes only its local shards, with no collective. Each rank also writes float64 references
computed from the whole tensors (`full_tensor()`: collectives in the test, never in the agent). The test
checks that the shards' counts and sums of squares add up over ranks to the whole tensors', that the
registration says SHARDED with the global shape, and that the aggregator's cross-rank join turns the
two ranks' reports into the gradient norm of the unsharded model. Placements other than FSDP's Shard(0)
(Replicate, Partial, a 2-D mesh with a Replicate dim) are checked on the same two ranks.
"""

from __future__ import annotations

import json
import math
import sys
from datetime import timedelta

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.state import State
from gradwatch.cli.redis_server import free_port
from gradwatch.v1 import run_pb2
from tests.scenarios.distributed.ranks import run_ranks

WORLD_SIZE = 2
STEPS = 3
RUN = "fsdp-test"
JOB_TIMEOUT_S = 90  # a hang guard only: the job takes a few seconds
SHARDED, REPLICATED, PER_RANK = run_pb2.PARTITION_SHARDED, run_pb2.PARTITION_REPLICATED, run_pb2.PARTITION_PER_RANK


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 16 and 3 rows over two ranks: even and uneven shards; the last layer's single row leaves rank 1 empty.
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.Tanh(), nn.Linear(3, 1))


def sq(t) -> float:
    return float(t.full_tensor().double().pow(2).sum())


def placements(rank: int) -> dict[str, int]:
    """The partition the agent gives DTensors of other placements, on this rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from gradwatch.agent.capture.distributed import partition_of

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    x = torch.arange(8.0).reshape(4, 2)
    out = {"replicate": partition_of(distribute_tensor(x, mesh, [Replicate()])),
           "shard1": partition_of(distribute_tensor(x, mesh, [Shard(1)])),
           "partial": partition_of(DTensor.from_local(x, mesh, [Partial()])),
           "plain": partition_of(x)}
    # HSDP-like: replicas along mesh dim 0, shards along dim 1. With (2, 1) rank 1 holds a copy of rank 0's
    # shard; with (1, 2) each rank holds its own shard.
    for shape in ((2, 1), (1, 2)):
        mesh2 = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        out[f"hsdp{shape[0]}x{shape[1]}"] = partition_of(distribute_tensor(x, mesh2, [Replicate(), Shard(0)]))
    return out


def worker(rank: int, world_size: int, port: int, collector: str, out: str) -> None:
    """One rank of the job (runs in a child process)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=30))
    try:
        model = make_model()
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        watcher = gradwatch.watch(model, opt, run=RUN, collector=collector, select="updates:on")
        data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
        reference = []
        for _ in range(STEPS):
            loss = model(torch.randn(4, 8, generator=data)).pow(2).mean()
            loss.backward()  # FSDP reduce-scatters: each rank keeps the averaged gradient of its shard
            before = {n: p.full_tensor().double() for n, p in model.named_parameters()}
            ref = {f"{n}.grad": sq(p.grad) for n, p in model.named_parameters()}
            ref.update({n: float(v.pow(2).sum()) for n, v in before.items()})
            opt.step()
            ref.update({f"{n}.update": float((p.full_tensor().double() - before[n]).pow(2).sum())
                        for n, p in model.named_parameters()})
            opt.zero_grad(set_to_none=True)
            watcher.step(loss=loss)
            reference.append(ref)
        watcher.close()
        c = watcher.counters
        if (c.exported, c.dropped, c.internal_errors) != (STEPS, 0, 0):
            raise SystemExit(f"rank {rank}: unexpected counters {c}")
        result = {"reference": reference, "placements": placements(rank),
                  "local": {n: list(p.to_local().shape) for n, p in model.named_parameters()}}
        with open(out, "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_job(ingest, tmp_path) -> list[dict]:
    outs = [tmp_path / f"rank{rank}.json" for rank in range(WORLD_SIZE)]
    run_ranks(__file__, WORLD_SIZE, tmp_path, JOB_TIMEOUT_S, lambda rank: [ingest.target, str(outs[rank])])
    return [json.loads(out.read_text()) for out in outs]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_fsdp2_shards_add_up_to_the_whole_tensors_and_join_into_the_global_norm(ingest, tmp_path):
    results = run_job(ingest, tmp_path)
    assert results[0]["local"]["4.bias"] == [1] and results[1]["local"]["4.bias"] == [0]  # an empty shard

    registrations = {r.rank: r for req in ingest.requests for r in req.registrations}
    assert sorted(registrations) == [0, 1]
    full = make_model()
    info = {rank: {t.name: t for t in reg.tensors} for rank, reg in registrations.items()}
    for rank in (0, 1):
        for name, p in full.named_parameters():
            for suffix in ("", ".grad"):
                t = info[rank][name + suffix]
                assert t.partition == SHARDED, (rank, name + suffix)
                assert tuple(t.shape) == tuple(p.shape)  # the global shape; the local size is each count
        assert all(t.partition == SHARDED for t in info[rank].values() if t.kind == run_pb2.TENSOR_KIND_UPDATE)

    # Updates carry their parameter's name (kind UPDATE): "<name>.update" here.
    names = {rank: {t.id: t.name + (".update" if t.kind == run_pb2.TENSOR_KIND_UPDATE else "") for t in reg.tensors}
             for rank, reg in registrations.items()}
    by_rank = {rank: [r for r in ingest.reports if r.rank == rank] for rank in (0, 1)}
    assert [len(v) for v in by_rank.values()] == [STEPS, STEPS]
    numel = {n: p.numel() for n, p in full.named_parameters()}
    for step in range(STEPS):
        ref = results[0]["reference"][step]
        assert ref == pytest.approx(results[1]["reference"][step], rel=1e-12)  # full tensors: the same on both
        per_rank = [{names[rank][s.tensor_id]: s for s in by_rank[rank][step].tensors} for rank in (0, 1)]
        assert per_rank[0].keys() == per_rank[1].keys() == ref.keys()
        for name, expected in ref.items():
            shards = [per_rank[rank][name] for rank in (0, 1)]
            assert sum(s.count for s in shards) == numel[name.removesuffix(".grad").removesuffix(".update")]
            assert math.fsum(s.sum_squares for s in shards) == pytest.approx(expected, rel=1e-6, abs=1e-12), \
                (step, name)

    # The aggregator: both registrations, both ranks' reports; each step closes complete, and its norm is
    # the unsharded model's gradient norm.
    state = State(AggregatorConfig(), Counters())
    for reg in registrations.values():
        state.register(RUN, reg)
    for r0, r1 in zip(by_rank[0], by_rank[1], strict=True):
        state.apply(RUN, r0)
        state.apply(RUN, r1)
    joined = state.take_closed()
    assert [(j.step, j.reason) for j in joined] == [(s, "complete") for s in range(STEPS)]
    for j, ref in zip(joined, results[0]["reference"], strict=True):
        global_norm = math.sqrt(math.fsum(v for k, v in ref.items() if k.endswith(".grad")))
        assert j.global_grad_norm == pytest.approx(global_norm, rel=1e-6)
    assert state.runs[RUN].grad_norm == pytest.approx(joined[-1].global_grad_norm)

    expected = {"replicate": REPLICATED, "shard1": SHARDED, "partial": PER_RANK, "plain": REPLICATED,
                "hsdp1x2": SHARDED}
    for rank in (0, 1):
        assert results[rank]["placements"] == {**expected, "hsdp2x1": SHARDED if rank == 0 else PER_RANK}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
def test_fsdp2_capture_reads_nothing_back_on_the_training_thread(ingest, host_reads):
    """One rank in this process: the agent's path through DTensor parameters, gradients, updates and
    optimizer state makes no host read (the CPU stand-in for set_sync_debug_mode("error"))."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        model = make_model()
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        w = gradwatch.watch(model, opt, run="fsdp-1", collector=ingest.target,
                            select="updates:on,optimizer_state:on,activations:on")
        for _ in range(2):
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            w.step()
        w.close()
    finally:
        dist.destroy_process_group()
    assert host_reads == []
    assert w.counters.internal_errors == 0 and len(ingest.reports) == 2
    reg = [r for req in ingest.requests for r in req.registrations][-1]
    kinds = {run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_UPDATE,
             run_pb2.TENSOR_KIND_OPTIMIZER_STATE}
    assert {t.partition for t in reg.tensors if t.kind in kinds} == {SHARDED}
    assert {t.kind for t in reg.tensors} >= kinds
    assert len(ingest.reports[-1].tensors) == len(reg.tensors)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
