"""What to watch: the tensor dictionary of a model (every parameter and its gradient) and the rank."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from gradwatch.agent.encode import TensorSlot
from gradwatch.v1 import run_pb2


def distributed_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialized, else RANK/WORLD_SIZE, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_slots(model: torch.nn.Module) -> tuple[list[TensorSlot], list[Callable[[], torch.Tensor | None]]]:
    """One slot per parameter and one per gradient, in module registration order.

    Returns the slots and, for each, a callable giving the tensor to summarize now (None when absent,
    e.g. a gradient before the first backward).
    """
    module_order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    slots: list[TensorSlot] = []
    sources: list[Callable[[], torch.Tensor | None]] = []
    for name, param in model.named_parameters():
        module_path = name.rpartition(".")[0] or name
        order = module_order.get(name.rpartition(".")[0], 0)
        for kind, source in (
            (run_pb2.TENSOR_KIND_PARAMETER, lambda p=param: p),
            (run_pb2.TENSOR_KIND_GRADIENT, lambda p=param: p.grad),
        ):
            suffix = "" if kind == run_pb2.TENSOR_KIND_PARAMETER else ".grad"
            slots.append(TensorSlot(
                id=len(slots), name=name + suffix, kind=kind, module_path=module_path, order=order,
                shape=tuple(param.shape), dtype=str(param.dtype).removeprefix("torch."), numel=param.numel(),
            ))
            sources.append(source)
    return slots, sources
