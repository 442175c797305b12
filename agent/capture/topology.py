"""The model's module graph for topology views (the registration's `topology`): nodes are leaf modules
(module path and class name), edges the data flow between them.

Where the model traces with torch.fx (no data, no device work; a tracer that leaves other threads'
models alone) the graph is known at watch() time. Otherwise the first training forward pass is watched:
a forward hook on each leaf module notes the autograd node of its output and those of its inputs, and
walking the autograd graph back from each input to the nearest module output gives the edges, through
whatever functional ops lie between (residual adds, F.relu, reshapes). The hooks read autograd metadata
only, never tensor values (no host sync), and are removed once the graph is built. A graph that cannot be
had is None: the aggregator then chains the layers in forward order.
`unwrapped` gives the model inside DDP, DataParallel and torch.compile: what is named and hooked.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

import torch

from gradwatch.agent.capture.distributed import is_dtensor
from gradwatch.v1 import run_pb2

log = logging.getLogger("gradwatch.agent")

MAX_NODES = 5_000       # larger graphs are not sent (a topology view of them is unreadable anyway)
MAX_EDGES = 20_000
FX_MAX_MODULES = 2_000  # tracing very large models at watch() would delay the first step
MAX_CALLS = 20_000      # leaf-module calls recorded in the observed forward pass
WALK_LIMIT = 256        # autograd nodes visited back from one input before giving up on it
# A residual stream carries every earlier block's output: each module is joined to its nearest
# producers only, or a deep network's graph would grow quadratically in edges.
MAX_SOURCES = 3

_eager = getattr(getattr(torch, "compiler", None), "disable", lambda fn: fn)
# torch.fx patches torch.nn.Module.__call__ and __getattr__ process-wide while it traces, and restores them
# after: two traces at once would restore each other's patches for good. One trace at a time.
_TRACING = threading.Lock()


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside the wrappers that only run it: DistributedDataParallel and DataParallel (`.module`)
    and torch.compile (`._orig_mod`). Its layers are named as in the same model in one process ("fc1", not
    "module.fc1" or "_orig_mod.fc1"), so a multi-rank run, a compiled one and a plain one line up layer by layer.
    The wrapped model runs the same submodules: every hook is on them."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None),
                                                                     torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _tracer():
    """An fx Tracer that leaves other threads alone: while it traces, a module another thread calls (a
    model in training beside the one being watched) runs as if unpatched instead of failing in the trace."""
    import torch.fx

    class OwnThreadTracer(torch.fx.Tracer):
        def __init__(self):
            super().__init__()
            self._thread = threading.get_ident()

        def call_module(self, m, forward, args, kwargs):
            if threading.get_ident() != self._thread:
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

        def getattr(self, attr, attr_val, parameter_proxy_cache):
            if threading.get_ident() != self._thread:
                return attr_val
            return super().getattr(attr, attr_val, parameter_proxy_cache)

    return OwnThreadTracer


def leaf_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(path, m) for path, m in model.named_modules() if path and next(m.children(), None) is None]


def _graph(nodes: dict[str, str], edges: dict[tuple[str, str], None]) -> run_pb2.ModelGraph | None:
    if not nodes or len(nodes) > MAX_NODES or len(edges) > MAX_EDGES:
        return None
    graph = run_pb2.ModelGraph()
    for path, kind in nodes.items():
        graph.nodes.add(module_path=path, module_type=kind)
    for source, target in edges:
        graph.edges.add(source=source, target=target)
    return graph


def fx_graph(model: torch.nn.Module) -> run_pb2.ModelGraph | None:
    """The module graph from torch.fx, or None where the model does not trace (data-dependent control
    flow, non-tensor inputs...) or is too large to trace at watch() time."""
    if sum(1 for _ in model.modules()) > FX_MAX_MODULES:
        return None
    if any(is_dtensor(p) for p in model.parameters()):
        return None  # FSDP2 / tensor parallel: tracing would run their hooks (collectives, FSDP's lazy init)
    try:
        import torch.fx

        with _TRACING, torch.no_grad():
            graph = _tracer()().trace(model)
    except Exception as e:  # anything: tracing runs the model's Python code on proxies
        log.debug("gradwatch: torch.fx cannot trace %s (%s); the graph comes from the first forward pass",
                  type(model).__name__, e)
        return None
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    nodes: dict[str, str] = {}
    edges: dict[tuple[str, str], None] = {}  # an ordered set
    producers: dict[torch.fx.Node, frozenset[str]] = {}  # fx node -> the nearest modules whose outputs reach it
    rank: dict[str, int] = {}  # module -> position of its first call: "nearest" is the latest
    for node in graph.nodes:  # in topological order
        came_from = frozenset().union(*(producers.get(a, frozenset()) for a in node.all_input_nodes))
        if len(came_from) > MAX_SOURCES:
            came_from = frozenset(sorted(came_from, key=lambda m: rank.get(m, -1))[-MAX_SOURCES:])
        if node.op == "call_module":
            path = str(node.target)
            nodes.setdefault(path, type(modules[path]).__name__ if path in modules else "")
            rank.setdefault(path, len(rank))
            for source in sorted(came_from):
                if source != path:
                    edges[(source, path)] = None
            producers[node] = frozenset((path,))
        elif node.op == "get_attr" and str(node.target) in params:
            # A parameter used outside a leaf module (a positional embedding...): the agent's layer of it.
            name = str(node.target)
            owner = name.rpartition(".")[0]
            layer = owner or name
            nodes.setdefault(layer, type(modules[owner]).__name__ if owner else "Parameter")
            rank.setdefault(layer, len(rank))
            producers[node] = frozenset((layer,))
        else:
            producers[node] = came_from
    return _graph(nodes, edges)


class FlowRecorder:
    """Forward hooks on every leaf module that note, for grad-enabled calls, the autograd nodes of the
    module's inputs and outputs; `graph()` turns them into edges and removes the hooks."""

    def __init__(self, model: torch.nn.Module):
        self._leaves = leaf_modules(model)
        self._calls: list[tuple[str, list, list]] = []  # (path, input grad_fns, output grad_fns)
        self._handles = [m.register_forward_hook(self._hook(path)) for path, m in self._leaves]

    @property
    def recorded(self) -> bool:
        return bool(self._calls)

    def _hook(self, path: str):
        @_eager
        def hook(module, inputs, output):
            try:
                if not torch.is_grad_enabled() or len(self._calls) >= MAX_CALLS:
                    return
                self._calls.append((path, _grad_fns(inputs), _grad_fns(output)))
            except Exception:  # never break the forward pass: the graph is a nicety
                pass

        return hook

    def graph(self) -> run_pb2.ModelGraph | None:
        """The graph of the recorded pass (None before one was recorded); removes the hooks once built."""
        if not self._calls:
            return None
        types = dict((path, type(m).__name__) for path, m in self._leaves)
        nodes: dict[str, str] = {}
        produced_by: dict[object, str] = {}
        for path, _, outs in self._calls:
            nodes.setdefault(path, types.get(path, ""))
            for fn in outs:
                produced_by.setdefault(fn, path)
        edges: dict[tuple[str, str], None] = {}
        for path, ins, _ in self._calls:
            for source in _sources(ins, path, produced_by):
                edges[(source, path)] = None
        self.remove()
        return _graph(nodes, edges)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._calls = []


def _grad_fns(value) -> list:
    """Autograd nodes of the tensors in a module's inputs or output (tensors, tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        return [value.grad_fn] if value.grad_fn is not None else []
    if isinstance(value, (tuple, list)):
        return [fn for v in value[:16] for fn in _grad_fns(v)]
    if isinstance(value, dict):
        return [fn for v in list(value.values())[:16] for fn in _grad_fns(v)]
    return []


def _sources(starts: list, path: str, produced_by: dict[object, str]) -> list[str]:
    """The modules whose outputs reach these inputs: the first module output met walking back through the
    autograd graph on each branch. The module's own output is walked through (an in-place module's
    input carries its own output's node)."""
    found: list[str] = []
    seen: dict[int, object] = {}  # holds the nodes too: a freed wrapper's id could come back
    queue = deque(starts)
    while queue and len(seen) < WALK_LIMIT * max(1, len(starts)):
        fn = queue.popleft()
        if fn is None or id(fn) in seen:
            continue
        seen[id(fn)] = fn
        owner = produced_by.get(fn)
        if owner is not None and owner != path:
            if owner not in found:
                found.append(owner)
                if len(found) == MAX_SOURCES:
                    break  # breadth first: these are the nearest
            continue
        queue.extend(next_fn for next_fn, _ in getattr(fn, "next_functions", ()))
    return found


class ModelTopology:
    """The graph of one watched model: from torch.fx at once where it traces, else from the first
    training forward pass. `graph()` is None until it is known."""

    def __init__(self, model: torch.nn.Module):
        self._graph = fx_graph(model)
        self._recorder = FlowRecorder(model) if self._graph is None else None

    def graph(self) -> run_pb2.ModelGraph | None:
        if self._graph is None and self._recorder is not None and self._recorder.recorded:
            try:
                self._graph = self._recorder.graph()
            except Exception:  # a graph is never worth an error
                log.debug("gradwatch: cannot build the module graph", exc_info=True)
            finally:
                self._recorder.remove()
                self._recorder = None
        return self._graph

    def close(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
