"""The module graph the agent registers: from torch.fx where the model traces, else from the autograd
graph of the first training forward pass; residual connections, functional ops in between, in-place
modules, and what reaches the collector."""

from __future__ import annotations

import threading

import torch
from torch import nn

import gradwatch
from gradwatch.agent.capture.topology import MAX_SOURCES, FlowRecorder, ModelTopology, fx_graph
from gradwatch.cli.processes import wait_until


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))  # a residual add between modules


class Net(nn.Module):
    def __init__(self, blocks: int = 2):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.pos = nn.Parameter(torch.zeros(8))  # used outside any leaf module
        self.blocks = nn.Sequential(*[Block() for _ in range(blocks)])
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.blocks(self.embed(x) + self.pos)))  # a functional op before head


class Branchy(Net):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        h = self.embed(x) + self.pos
        if h.sum() > -1e9:  # always true, but a Proxy has no truth value
            h = self.blocks(h)
        return self.head(torch.relu(h))


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.act(self.fc(x)))


def edges(graph) -> set[tuple[str, str]]:
    return {(e.source, e.target) for e in graph.edges}


EXPECTED = {
    ("embed", "pos"), ("pos", "blocks.0.norm"), ("embed", "blocks.0.norm"),
    ("blocks.0.norm", "blocks.0.fc1"), ("blocks.0.fc1", "blocks.0.act"), ("blocks.0.act", "blocks.0.fc2"),
    ("blocks.0.fc2", "blocks.1.norm"), ("blocks.1.norm", "blocks.1.fc1"), ("blocks.1.fc2", "head"),
}


def test_fx_graph_of_a_residual_model():
    graph = fx_graph(Net())
    nodes = {n.module_path: n.module_type for n in graph.nodes}
    assert list(nodes)[:2] == ["embed", "pos"] and nodes["blocks.0.fc1"] == "Linear"
    assert nodes["blocks.1.norm"] == "LayerNorm" and nodes["pos"] == "Parameter" and "blocks.0" not in nodes
    got = edges(graph)
    assert EXPECTED - {("embed", "pos")} <= got  # the parameter is added to embed's output, not fed by it
    assert ("embed", "blocks.1.norm") in got or ("pos", "blocks.1.norm") in got  # the residual stream
    assert all(source != target for source, target in got)


def test_tracing_leaves_a_model_training_in_another_thread_alone():
    """torch.fx patches nn.Module.__call__ process-wide while it traces; with the stock tracer a model another
    thread runs meanwhile fails inside the trace (NameError), here it trains on untouched."""
    other = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    stop, errors, steps = threading.Event(), [], [0]

    def train():
        try:
            while not stop.is_set():
                other(torch.randn(4, 8)).sum().backward()
                steps[0] += 1
        except Exception as err:  # noqa: BLE001 - what the test is about
            errors.append(err)

    thread = threading.Thread(target=train)
    thread.start()
    try:
        wait_until(lambda: steps[0] > 0, 10, "the other thread training")
        graphs = [fx_graph(Net()) for _ in range(20)]
        seen = steps[0]
        wait_until(lambda: steps[0] > seen or errors, 10, "the other thread still training")
    finally:
        stop.set()
        thread.join(10)
    assert errors == []
    assert all(g is not None and EXPECTED - {("embed", "pos")} <= edges(g) for g in graphs)


def test_the_residual_stream_keeps_only_the_nearest_producers():
    graph = fx_graph(Net(blocks=6))
    into_head = {s for s, t in edges(graph) if t == "head"}
    assert len(into_head) == MAX_SOURCES and "blocks.5.fc2" in into_head and "embed" not in into_head
    assert len(graph.edges) < 6 * 8  # linear in depth, not quadratic


def test_an_untraceable_model_gets_its_graph_from_the_first_training_forward():
    model = Branchy()
    assert fx_graph(model) is None
    topo = ModelTopology(model)
    assert topo.graph() is None  # nothing seen yet
    with torch.no_grad():
        model(torch.randn(2, 4))  # evaluation passes leave no autograd graph: ignored
    assert topo.graph() is None
    model(torch.randn(3, 4)).sum().backward()
    graph = topo.graph()
    nodes = [n.module_path for n in graph.nodes]
    assert nodes[0] == "embed" and nodes[-1] == "head" and len(nodes) == 1 + 4 * 2 + 1  # leaves only
    got = edges(graph)
    assert {e for e in EXPECTED if "pos" not in e} <= got  # through the add, relu and residual adds
    assert ("embed", "blocks.1.norm") in got  # the residual stream
    assert topo.graph() is graph and not topo._recorder  # built once; the hooks are gone
    assert all(not m._forward_hooks for m in model.modules())


def test_an_in_place_module_is_walked_through():
    model = InPlace()
    recorder = FlowRecorder(model)
    model(torch.randn(2, 4)).sum().backward()
    assert edges(recorder.graph()) == {("fc", "act"), ("act", "out")}


def test_the_registration_carries_the_graph(ingest):
    model = Branchy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.watch(model, opt, run="unit-topology", collector=ingest.target) as w:
        for _ in range(3):
            model(torch.randn(4, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
        assert w.flush(5)
    regs = [r for req in ingest.requests for r in req.registrations]
    assert not regs[0].HasField("topology") or regs[-1].topology.nodes  # known after the first step
    graph = regs[-1].topology
    assert [n.module_path for n in graph.nodes][0] == "embed"
    assert ("blocks.1.fc2", "head") in edges(graph)
    layers = {t.module_path for t in regs[-1].tensors}
    assert {"embed", "blocks.0.fc1", "head"} <= layers & {n.module_path for n in graph.nodes}
    assert all(not h for m in model.modules() for h in (m._forward_hooks,))  # removed by close()


def test_a_traceable_model_registers_its_graph_at_once(ingest):
    model = Net()
    with gradwatch.watch(model, None, run="unit-fx", collector=ingest.target) as w:
        model(torch.randn(2, 4)).sum().backward()
        w.step()
        assert w.flush(5)
    first = ingest.requests[0].registrations[0]
    assert ("blocks.0.fc1", "blocks.0.act") in edges(first.topology)
