"""Where this process stands in a distributed run: its rank and world size, and its DTensors (FSDP2
`fully_shard`, tensor parallelism): each rank summarizes its local shard, and registers how the shards
make up the whole so the aggregator merges ranks exactly.

The agent never runs a collective: `local(t)` is the rank's own shard as a plain tensor (no copy, no
communication, no host read), summarized like any tensor; its element count is each summary's `count`.
The registration carries the global shape (so fan-in and the like are the whole tensor's) and a
partition from the placements:

- any `Shard` (FSDP2's Shard(0), tensor-parallel row/column shards): SHARDED, ranks add their sums of
  squares. On a mesh with Replicate dims as well (HSDP; a 2-D FSDP x TP mesh for a tensor replicated
  over TP) every shard has copies: only the rank at coordinate 0 of each Replicate dim registers
  SHARDED, the copies PER_RANK, so the sum over SHARDED ranks counts each shard once.
- only `Replicate`: REPLICATED, counted once (from the lowest rank).
- any `Partial` (pending sums, e.g. a gradient before its reduction): PER_RANK. Each rank holds a
  partial sum of the whole, whose sum of squares no addition of per-rank statistics can give; such a
  tensor stays per rank and out of the global gradient norm.

The mesh is taken to span every rank holding a copy: replicas made outside it (DDP around a
tensor-parallel model whose mesh is TP only) would be added as many times as there are replicas.
"""

from __future__ import annotations

import os
import sys

import torch

from gradwatch.v1 import run_pb2

_dtensor: type | None = None


def _dtensor_class() -> type | None:
    """DTensor once the user's code imported it: importing torch.distributed.tensor here would add most of
    a second to every `import gradwatch`, and a model of DTensors has imported it already."""
    global _dtensor
    if _dtensor is None:
        _dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return _dtensor


def is_dtensor(t: object) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor as a plain tensor (a view; outside autograd); else `t`."""
    if is_dtensor(t):
        with torch.no_grad():  # to_local() with grad enabled adds an autograd node
            return t.to_local()
    return t


def local_numel(t: torch.Tensor) -> int:
    return local(t).numel()


def partition_of(t: torch.Tensor, default: int = run_pb2.PARTITION_REPLICATED) -> int:
    """How ranks merge `t` (see the module docstring); `default` for plain tensors."""
    if not is_dtensor(t):
        return default
    placements = t.placements
    if any(p.is_partial() for p in placements):
        return run_pb2.PARTITION_PER_RANK
    if not any(p.is_shard() for p in placements):
        return run_pb2.PARTITION_REPLICATED
    coordinate = t.device_mesh.get_coordinate()  # this rank's place on the mesh: local, no communication
    if coordinate is None or any(p.is_replicate() and c for p, c in zip(placements, coordinate, strict=True)):
        return run_pb2.PARTITION_PER_RANK  # not on the mesh, or a copy of a shard another rank registers
    return run_pb2.PARTITION_SHARDED


def distributed_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialized, else RANK/WORLD_SIZE, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
