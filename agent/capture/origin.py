"""Where NaN or Inf is born: an always-on check of every leaf module's output and output gradient.

One responsibility: on every step, due or not, name the first leaf module whose forward output held NaN
or Inf, and the module whose backward turned a finite gradient of its output into a non-finite gradient of
its input (report.proto's NonFiniteOrigin), with no host sync on the training thread.

Design, and why it is exact. A forward hook on every leaf module (`leaf_modules`: nn.MultiheadAttention
counts as one) queues one `torch.aminmax` of each floating-point tensor of the output (those of a tuple,
list or dict output too) and puts a tensor hook on it that does the same with its gradient in backward. A
tensor holds NaN or Inf exactly when its min or its max is not finite: NaN propagates into both, and ±Inf
is the min or the max; unlike a sum, a min/max cannot overflow, so a large finite tensor never reads as
Inf. It reads the tensor once, in one launch: `isfinite().all()` writes a mask first (15x slower on a CPU,
twice the memory traffic on a GPU), and counting NaN/Inf costs 2.5-4x the min/max, so the check detects
without counting (`nonfinite_count` stays 0). The two 0-d results stay on the device as they come; the host
side keeps only the module index of each check in order (forward `i`, backward `~i`) and where each
backward pass starts. At the capture window `close()` stacks every result in one op and queues one
non-blocking copy to host memory (pinned on CUDA); the reader thread finds the first non-finite check of
each direction (`origins()`). Cost: one more read of every module output and output gradient per step and a
few microseconds of Python per module and pass (figures: README, "Using the agent").

Which passes count: forward passes in training mode or with grad enabled (evaluation in eval mode under
no_grad is not checked); never forward code that runs inside backward (activation checkpointing's
recomputation, told by autograd's current graph task), so a recomputed module is not checked twice.
Reentrant checkpoints run a backward of their own through the recomputed outputs, so those get the
gradient hook. Backward passes are told apart by their graph task; a nested task right after a
recomputation (the reentrant checkpoint's inner backward) continues the pass it is in. Gradient
accumulation: every micro-batch is checked and the first in time wins. GradScaler: a loss-scale overflow
makes the scaled gradients Inf and the scaler skips the optimizer step; the zero_grad() that follows with no
capture window since the last one throws those gradients away, and their backward checks with them
(`abandon_backward`, through `on_zero_grad`), so a routine overflow is no origin (a `model.zero_grad()` is
not seen). In-place ops after a module (ReLU(inplace=True)) do not disturb the check: the min/max is queued
before them, and a tensor hook put on before an in-place op receives the gradient of the value the module
produced.

torch.compile: a traced forward hook calls a custom op (`gradwatch::origin_check`) that the compiled graph
runs where the hook was, so the check costs no graph break and no recompilation; tensor hooks cannot be put
on the intermediates of a compiled graph, so in compiled regions only the forward is checked. Under CUDA
graphs (`mode="reduce-overhead"`) a replay does not run the op.
"""

from __future__ import annotations

import bisect
import types
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from gradwatch.agent.capture.distributed import local
from gradwatch.names import LOSS_MODULE, OUTPUT_GRAD_SUFFIX, OUTPUT_SUFFIX
from gradwatch.v1 import report_pb2

CHECKED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
MAX_CHECKS = 1 << 16  # per step: a forward loop with no capture window (inference in train mode) stays bounded
_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)  # -1 outside backward
_checks: weakref.WeakValueDictionary[int, OriginCheck] = weakref.WeakValueDictionary()  # the custom op's targets


@dataclass
class OriginWindow:
    """One step's checks between the training thread and the reader: the min and max of each check in
    `host` (then one slot for the loss), and the bookkeeping to read them by."""

    host: torch.Tensor         # float64 host memory (pinned on CUDA): min, max of each check, then the loss
    visits: list[int]          # module index per check, in order: i forward, ~i backward
    passes: list[int]          # index into visits where each backward pass starts
    paths: list[str]           # module index -> path
    backward_from: int = 0     # backward checks before this one are of gradients thrown away (abandon())
    has_loss: bool = False
    loss: float | None = None  # a number passed as the loss (a tensor is copied into host[-1])

    def attach_loss(self, value: object) -> None:
        """The step's loss: a one-element tensor is copied on the device (no sync) into the last slot."""
        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                self.host[-1].copy_(value.detach().reshape(()), non_blocking=True)
                self.has_loss = True
        elif isinstance(value, (int, float)):
            self.loss = float(value)

    def read_loss(self) -> float | None:
        if self.has_loss:
            return float(self.host[-1])  # sync: reader thread, after the copy's event completed
        return self.loss


def leaf_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules whose outputs are checked, in registration order: those without children, and those that
    never call theirs (nn.MultiheadAttention computes with its out_proj's weights, so out_proj never runs and
    the attention itself is the leaf)."""
    found, opaque = [], ()
    for path, m in model.named_modules():
        if not path or (opaque and path.startswith(opaque)):
            continue
        if isinstance(m, torch.nn.MultiheadAttention):
            opaque += (path + ".",)
            found.append((path, m))
        elif next(m.children(), None) is None:
            found.append((path, m))
    return found


class OriginCheck:
    def __init__(self, model: torch.nn.Module):
        leaves = leaf_modules(model)
        self.paths = [path for path, _ in leaves]
        self.errors = 0      # exceptions swallowed in hooks; the watcher moves them into its counters
        self.unchecked = 0   # checks left out past MAX_CHECKS in one step
        self._results: list[torch.Tensor] = []  # 0-d device tensors: min, max of each check
        self._visits: list[int] = []
        self._passes: list[int] = []
        self._backward_from = 0
        self._task: int | None = None
        self._recomputing = False  # a forward hook ran inside backward since the last gradient check
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._pin = device.type == "cuda"
        self._token = torch.zeros(1, device=device)  # what the custom op says it mutates, so no compiler drops it
        _checks[id(self)] = self
        self._grad_hooks = [self._grad_hook(i) for i in range(len(leaves))]
        self._handles = [m.register_forward_hook(self._forward_hook(i)) for i, (_, m) in enumerate(leaves)]

    # ---- training thread: hooks ----------------------------------------------------------------

    def _check(self, t: torch.Tensor, visit: int) -> None:
        if t.dtype not in CHECKED_DTYPES or t.layout != torch.strided:
            return
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            t = local(t)  # a DTensor: the rank's own shard, never a collective
        if t.numel() == 0:
            return
        if len(self._visits) >= MAX_CHECKS:
            self.unchecked += 1
            return
        self._results.extend(torch.aminmax(t.detach()))
        self._visits.append(visit)

    def _forward_hook(self, index: int):
        grad_hook = self._grad_hooks[index]
        key = id(self)

        def hook(module, args, output):
            if torch.compiler.is_compiling():  # traced into the graph as one op (see the module docstring)
                if module.training or torch.is_grad_enabled():
                    for t in _tensors(output):
                        torch.ops.gradwatch.origin_check(t.detach(), self._token, key, index)
                return
            try:
                if not (module.training or torch.is_grad_enabled()):
                    return  # evaluation
                if _task_id() != -1:  # recomputed inside backward (activation checkpointing): checked already
                    self._recomputing = True
                    for t in _tensors(output):
                        if t.requires_grad:  # a reentrant checkpoint runs its backward through these
                            t.register_hook(grad_hook)
                    return
                for t in _tensors(output):
                    self._check(t, index)
                    if t.requires_grad:
                        t.register_hook(grad_hook)
            except Exception:  # never break the forward pass; the watcher counts it at the window
                self.errors += 1

        return hook

    def _grad_hook(self, index: int):
        visit = ~index

        def hook(grad: torch.Tensor) -> None:
            # Inside backward (on CUDA, autograd's device thread): device work only; returns None, so the
            # gradient flows on unchanged.
            try:
                task = _task_id()
                if task != self._task:
                    if not self._recomputing:
                        self._passes.append(len(self._visits))
                    self._task = task
                self._recomputing = False
                if grad is not None:
                    self._check(grad, visit)
            except Exception:
                self.errors += 1

        return hook

    # ---- training thread: the window -----------------------------------------------------------

    def close(self) -> OriginWindow:
        """End the step: one stack of the results and one non-blocking copy to host memory; start the next."""
        results, visits, passes, backward_from = self._results, self._visits, self._passes, self._backward_from
        self._results, self._visits, self._passes, self._backward_from = [], [], [], 0
        host = torch.empty(len(results) + 1, dtype=torch.float64, pin_memory=self._pin)
        if results:  # stack promotes mixed dtypes (NaN and ±Inf stay what they are); the copy widens to float64
            host[:-1].copy_(torch.stack(results), non_blocking=True)
        return OriginWindow(host, visits, passes, self.paths, backward_from)

    def abandon_backward(self) -> None:
        """The gradients of the passes so far were thrown away with no optimizer step (zero_grad after a step
        GradScaler skipped for a loss-scale overflow): their backward checks no longer count. Their forward
        checks do: a forward pass is not scaled, its NaN/Inf is the model's."""
        self._backward_from = len(self._visits)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        _checks.pop(id(self), None)


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a module's output: itself, or those of a tuple, list or dict, one level deep (a plain
    list, not a generator: the compiler traces this too)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [o for o in output if isinstance(o, torch.Tensor)]
    return []


# ---- reader thread ---------------------------------------------------------------------------------


def origins(window: OriginWindow, exec_order: Mapping[str, int]) -> list[report_pb2.NonFiniteOrigin]:
    """The step's origins, at most one per direction, from the host copy (after the copy's event).
    `exec_order`: module path -> forward execution index (the registration's order); modules it lacks take
    their place among this step's checked modules."""
    n = len(window.visits)
    if not n:
        return []
    values = window.host[: 2 * n].numpy().reshape(n, 2)  # sync: reader thread, after the copy's event completed
    bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if not bad.size:
        return []
    visits, paths = window.visits, window.paths

    def order(m: int) -> int:
        at = exec_order.get(paths[m])
        if at is None:
            seen = list(dict.fromkeys(v for v in visits if v >= 0))
            at = seen.index(m) if m in seen else len(seen)
        return at

    found = []
    first = next((int(i) for i in bad if visits[i] >= 0), None)
    if first is not None:
        m = visits[first]
        found.append(report_pb2.NonFiniteOrigin(direction=report_pb2.DIRECTION_FORWARD, module=paths[m],
                                                order=order(m), observed=paths[m] + OUTPUT_SUFFIX))
    first = next((int(i) for i in bad if visits[i] < 0 and i >= window.backward_from), None)
    if first is not None:
        start = window.passes[bisect.bisect_right(window.passes, first) - 1] if window.passes else 0
        if first == start or visits[first - 1] >= 0:  # the first gradient checked in its pass: the loss's own
            module, at = LOSS_MODULE, max(len(exec_order), len(window.paths))
        else:  # the module checked just before turned its finite output gradient into this one
            m = ~visits[first - 1]
            module, at = paths[m], order(m)
        found.append(report_pb2.NonFiniteOrigin(direction=report_pb2.DIRECTION_BACKWARD, module=module, order=at,
                                                observed=paths[~visits[first]] + OUTPUT_GRAD_SUFFIX))
    return found


class _Unwrap:
    """The handle of on_zero_grad(): remove() gives the optimizer its own zero_grad back."""

    def __init__(self, optimizer: torch.optim.Optimizer, wrapper, before):
        self._optimizer, self._wrapper, self._before = weakref.ref(optimizer), wrapper, before

    def remove(self) -> None:
        optimizer = self._optimizer()
        if optimizer is not None and getattr(vars(optimizer).get("zero_grad"), "__func__", None) is self._wrapper:
            if self._before is None:
                del optimizer.zero_grad
            else:
                optimizer.zero_grad = self._before


def on_zero_grad(optimizer: torch.optim.Optimizer, callback) -> _Unwrap:
    """Call `callback()` before each `optimizer.zero_grad()`. There is no zero_grad hook, so the instance's
    method is replaced, as torch's LR schedulers replace its step: by a method bound to the optimizer (a
    deepcopy binds to the copy) that calls what was there. The callback is held weakly."""
    before, ref = vars(optimizer).get("zero_grad"), weakref.WeakMethod(callback)

    def zero_grad(self, *args, **kwargs):
        method = ref()
        if method is not None:
            method()
        return before(*args, **kwargs) if before is not None else type(self).zero_grad(self, *args, **kwargs)

    optimizer.zero_grad = types.MethodType(zero_grad, optimizer)
    return _Unwrap(optimizer, zero_grad, before)


# ---- torch.compile ---------------------------------------------------------------------------------


def _compiled_check(x: torch.Tensor, token: torch.Tensor, check: int, module: int) -> None:
    target = _checks.get(check)
    if target is not None:
        try:
            target._check(x, module)
        except Exception:
            target.errors += 1


def _register_op() -> None:
    """`gradwatch::origin_check(x, token, check, module)`: opaque to the compiler, run in graph order."""
    library = getattr(torch, "library", None)
    if library is None or not hasattr(library, "custom_op") or hasattr(torch.ops.gradwatch, "origin_check"):
        return
    op = library.custom_op("gradwatch::origin_check", mutates_args=("token",))(_compiled_check)
    op.register_fake(lambda x, token, check, module: None)


_register_op()
