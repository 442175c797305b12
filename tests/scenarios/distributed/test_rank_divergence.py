"""A real three-process DDP job (gloo, CPU) in which rank 1 alone flips the sign of one element of one parameter:
RankDivergence, on what the ranks sent to a real gRPC server, names that parameter and rank 1; a clean job raises
nothing.

When the flip shows: the agent summarizes parameters at the optimizer's step pre-hook, before the update
(agent/capture/step.py `Capture.begin`). The flip comes right after `opt.step()` of step FLIP, so step FLIP's
report still holds the clean parameter and step FLIP + 1's is the first with the flipped one: the alert is on
step FLIP + 1's join. From then on rank 1's replica stays off (the same updates to a different value), so the
one incident stays open. DDP's all-reduce keeps the gradients identical, so only the parameter is named. The
sums of squares of the flipped parameter agree across ranks (a sign flip keeps them), which is why the
comparison needs the checksums: fed without them, the same reports raise nothing at step FLIP + 1 (at best
later, once the updates have pulled rank 1's sum of squares 1e-4 away for two steps).
"""

from __future__ import annotations

import sys
from datetime import timedelta

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.state import State
from tests.scenarios.distributed.ranks import run_ranks

WORLD_SIZE = 3
STEPS = 6
FLIP = 2                  # rank 1 flips right after this step's optimizer step
FLIPPED = "2.weight"
ELEMENT = (1, 3)
RUN = "ddp-divergence"
JOB_TIMEOUT_S = 120  # a hang guard only: the job takes a few seconds


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def worker(rank: int, world_size: int, port: int, collector: str, steps: int, flip: bool) -> None:
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
        data = torch.Generator().manual_seed(1000 + rank)
        for step in range(steps):
            loss = model(torch.randn(4, 8, generator=data)).pow(2).mean()
            loss.backward()
            opt.step()  # the agent's pre-hook summarized gradients and parameters just before this update
            opt.zero_grad(set_to_none=True)
            if flip and rank == 1 and step == FLIP:  # a bit flip in memory: rank 1's replica, no one else's
                with torch.no_grad():
                    dict(model.module.named_parameters())[FLIPPED][ELEMENT].neg_()
            watcher.step(loss=loss)
        watcher.close()
        c = watcher.counters
        if (c.exported, c.dropped, c.internal_errors) != (steps, 0, 0):
            raise SystemExit(f"rank {rank}: unexpected counters {c}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def judge(requests, checksums: bool = True) -> list:
    """What a real aggregator's State and RuleEngine make of the requests, in arrival order: RankDivergence's
    firing alerts. checksums=False: as agents before the checksum would have sent them."""
    config = AggregatorConfig(keep_firing_s=0.0)
    state, engine = State(config, Counters()), RuleEngine(config)
    alerts = []
    for request in requests:
        for reg in request.registrations:
            state.register(RUN, reg)
        for report in request.reports:
            if not checksums:
                report = type(report).FromString(report.SerializeToString())
                for s in report.tensors:
                    s.ClearField("checksum")
            alerts += engine.evaluate(state.apply(RUN, report))
            for joined in state.take_closed():
                alerts += engine.evaluate_joined(joined)
    return [a for a in alerts if a.rule == "RankDivergence" and a.status == "firing"]


@pytest.mark.parametrize("flip", [True, False], ids=["one element flipped on rank 1", "clean"])
def test_a_sign_flip_on_one_rank_is_named(ingest, tmp_path, flip):
    run_ranks(__file__, WORLD_SIZE, tmp_path, JOB_TIMEOUT_S,
              lambda rank: [ingest.target, str(STEPS), "flip" if flip else "clean"])
    reports = ingest.reports
    assert sorted((r.rank, r.step) for r in reports) == [(k, s) for k in range(WORLD_SIZE) for s in range(STEPS)]
    names = {t.id: t.name for req in ingest.requests for reg in req.registrations for t in reg.tensors}
    summaries = {(r.rank, r.step, names[s.tensor_id]): s for r in reports for s in r.tensors}
    assert all(s.HasField("checksum") for s in summaries.values())  # the default selection: parameters, gradients

    alerts = judge(ingest.requests)
    if not flip:
        assert alerts == []
        return
    (alert,) = alerts
    assert (alert.step, alert.rank, alert.tensor, alert.layer) == (FLIP + 1, 1, FLIPPED, "2")
    assert alert.summary.startswith(f"Rank 1 disagrees with its 2 peers at step {FLIP + 1}: parameter {FLIPPED} "
                                    "differs bitwise from the copy that 2 of 3 ranks hold")
    before, after = ([summaries[(rank, step, FLIPPED)] for rank in range(WORLD_SIZE)] for step in (FLIP, FLIP + 1))
    assert len({s.checksum for s in before}) == 1  # summarized before the flip
    assert [s.checksum == after[0].checksum for s in after] == [True, False, True]
    for s in after:  # what the sum-of-squares comparison saw: no difference
        assert s.sum_squares == pytest.approx(after[0].sum_squares, rel=1e-12)
    grads = {rank: summaries[(rank, FLIP + 1, f"{FLIPPED}.grad")].checksum for rank in range(WORLD_SIZE)}
    assert len(set(grads.values())) == 1  # all-reduced: identical on every rank
    assert all(a.step > FLIP + 1 for a in judge(ingest.requests, checksums=False))


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6] == "flip")
