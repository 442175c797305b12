"""What to watch: the tensor dictionary of a model (every parameter and its gradient) and the rank."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from gradwatch.agent.dtensor import local_numel, partition_of
from gradwatch.agent.encode import TensorSlot
from gradwatch.v1 import run_pb2


def distributed_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialized, else RANK/WORLD_SIZE, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_slots(parameters: list[tuple[str, torch.nn.Parameter, str]], with_parameters: bool = True,
                with_gradients: bool = True) -> tuple[list[TensorSlot], list[Callable[[], torch.Tensor | None]]]:
    """Slots for the selected (name, parameter, module path) triples: the parameter and/or its gradient.

    Returns the slots and, for each, a callable giving the tensor to summarize now (None when absent,
    e.g. a gradient before the first backward). `order` is the registration order until the watcher
    learns the forward execution order. DTensor parameters (FSDP2, tensor parallel) register their
    global shape, their local element count and the partition of their placements (agent/dtensor.py);
    their gradients share the parameter's placements.
    """
    slots: list[TensorSlot] = []
    sources: list[Callable[[], torch.Tensor | None]] = []
    kinds = [(run_pb2.TENSOR_KIND_PARAMETER, "", lambda p: (lambda: p))] if with_parameters else []
    if with_gradients:
        kinds.append((run_pb2.TENSOR_KIND_GRADIENT, ".grad", lambda p: (lambda: p.grad)))
    for index, (name, param, module_path) in enumerate(parameters):
        for kind, suffix, source in kinds:
            slots.append(TensorSlot(
                id=len(slots), name=name + suffix, kind=kind, module_path=module_path or name, order=index,
                shape=tuple(param.shape), dtype=str(param.dtype).removeprefix("torch."), numel=local_numel(param),
                partition=partition_of(param),
            ))
            sources.append(source(param))
    return slots, sources
