"""What is watched: the tensor dictionary's entries (TensorSlot) and those of a model's parameters and gradients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradwatch.agent.capture.distributed import local_numel, partition_of
from gradwatch.v1 import run_pb2


@dataclass(frozen=True)
class TensorSlot:
    """One watched tensor: its dictionary entry and its row in the statistics buffer."""

    id: int
    name: str
    kind: int  # run_pb2.TensorKind
    module_path: str
    order: int
    shape: tuple[int, ...]
    dtype: str
    numel: int
    partition: int = run_pb2.PARTITION_REPLICATED


def build_slots(parameters: list[tuple[str, torch.nn.Parameter, str]], with_parameters: bool = True,
                with_gradients: bool = True) -> tuple[list[TensorSlot], list[Callable[[], torch.Tensor | None]]]:
    """Slots for the selected (name, parameter, module path) triples: the parameter and/or its gradient.

    Returns the slots and, for each, a callable giving the tensor to summarize now (None when absent,
    e.g. a gradient before the first backward). `order` is the registration order until the watcher
    learns the forward execution order. DTensor parameters (FSDP2, tensor parallel) register their
    global shape, their local element count and the partition of their placements (agent/capture/distributed.py);
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
