"""What the optimizer step did, on captured steps: updates (new minus old parameter values) and the
optimizer's state tensors (Adam's moments, SGD's momentum).

Updates need the old values: the step pre-hook of a captured step keeps a copy of the watched
parameters (one multi-tensor op), and the post-hook turns that copy into new minus old in place (two
more) and summarizes it. The copy lives from the pre-hook to the post-hook of captured steps only, in
the device's caching allocator, and `updates_max_bytes` bounds it: parameters that the optimizer
updates (frozen ones, such as a LoRA base model, take nothing) are taken in selection order while their
bytes fit, the rest get no update slot and are counted. Update tensors carry their
parameter's name and module path (kind UPDATE), so update/weight ratios pair them by name.

Optimizer state exists only after the optimizer's first step, so its slots are found then (and for
parameters that get state later, at a later captured step) and the watcher adds them to the dictionary.
"""

from __future__ import annotations

import torch

from gradwatch.agent.capture.distributed import local, local_numel, partition_of
from gradwatch.agent.capture.slots import TensorSlot
from gradwatch.agent.stats.summarize import Summarizer
from gradwatch.v1 import run_pb2

STATES_PER_PARAMETER = 2  # what the selection budget counts: Adam's exp_avg and exp_avg_sq


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class Updates:
    def __init__(self, parameters: list[tuple[str, torch.nn.Parameter, str]], optimizer: torch.optim.Optimizer,
                 start_id: int, max_bytes: int):
        """Update slots for the trainable `parameters` of `optimizer`, the longest prefix whose copies fit
        in `max_bytes`."""
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        parameters = [(index, entry) for index, entry in enumerate(parameters)
                      if id(entry[1]) in trained and entry[1].requires_grad and not entry[1].is_sparse]
        self.slots: list[TensorSlot] = []
        self._params: list[torch.nn.Parameter] = []
        spent = 0
        for index, (name, param, module_path) in parameters:
            nbytes = local_numel(param) * param.element_size()  # a DTensor's copy is of its local shard
            if spent + nbytes > max_bytes:
                break
            spent += nbytes
            self.slots.append(TensorSlot(
                id=start_id + len(self.slots), name=name, kind=run_pb2.TENSOR_KIND_UPDATE,
                module_path=module_path or name, order=index, shape=tuple(param.shape), dtype=_dtype(param),
                numel=local_numel(param), partition=partition_of(param)))
            self._params.append(param)
        self.over_budget = len(parameters) - len(self.slots)  # parameters whose updates are not watched
        self.copy_bytes = spent
        self._before: list[torch.Tensor] | None = None

    def copy_parameters(self) -> None:
        """Before the update: keep the watched parameters' values (captured steps only)."""
        if self._params:
            with torch.no_grad():
                self._before = torch._foreach_mul([local(p).detach() for p in self._params], 1.0)

    def summarize(self, summarizer: Summarizer, present: list[TensorSlot]) -> None:
        """After the update: summarize new - old and let the copy go."""
        before, self._before = self._before, None
        if before is None:
            return
        with torch.no_grad():
            torch._foreach_sub_(before, [local(p).detach() for p in self._params])  # old - new, in place ...
            torch._foreach_neg_(before)                                      # ... then new - old, exactly
        summarizer.summarize_many([slot.id for slot in self.slots], before)
        present.extend(self.slots)

    def discard(self) -> None:
        """The step did not happen (or its capture was given up): drop the copy."""
        self._before = None


class OptimizerStates:
    def __init__(self, optimizer: torch.optim.Optimizer, parameters: list[tuple[str, torch.nn.Parameter, str]]):
        self._optimizer = optimizer
        self._waiting = list(enumerate(parameters))  # parameters without state yet
        self._watched: list[tuple[TensorSlot, torch.nn.Parameter, str]] = []  # (slot, parameter, state key)
        self._found: list[tuple[TensorSlot, torch.nn.Parameter, str]] = []    # discovered, waiting for ids

    def discover(self) -> list[TensorSlot]:
        """Slots (ids unassigned) for state that appeared since the last call: `<name>.<key>`, the
        parameter's module path, at most STATES_PER_PARAMETER floating-point tensors per parameter
        (scalars such as Adam's `step` are left out)."""
        if not self._waiting:
            return []
        found, waiting = [], []
        for index, (name, param, module_path) in self._waiting:
            state = self._optimizer.state.get(param)
            if not state:
                waiting.append((index, (name, param, module_path)))
                continue
            keys = [k for k, v in state.items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0 and not v.is_sparse]
            for key in keys[:STATES_PER_PARAMETER]:
                v = state[key]
                found.append((TensorSlot(id=-1, name=f"{name}.{key}", kind=run_pb2.TENSOR_KIND_OPTIMIZER_STATE,
                                         module_path=module_path or name, order=index, shape=tuple(v.shape),
                                         dtype=_dtype(v), numel=local_numel(v), partition=partition_of(v)),
                              param, key))
        self._waiting = waiting
        self._found = found
        return [slot for slot, _, _ in found]

    def watch(self, slots: list[TensorSlot]) -> None:
        """The slots discover() returned, now with their ids."""
        self._watched.extend((slot, param, key) for slot, (_, param, key) in zip(slots, self._found, strict=True))
        self._found = []

    def summarize(self, summarizer: Summarizer, present: list[TensorSlot]) -> None:
        rows, values = [], []
        for slot, param, key in self._watched:
            value = self._optimizer.state.get(param, {}).get(key)
            if isinstance(value, torch.Tensor):
                rows.append(slot.id)
                values.append(value)
                present.append(slot)
        summarizer.summarize_many(rows, values)
