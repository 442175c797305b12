"""The live view's graph layout (aggregator/http/ui/graph.js, layeredLayout) run by Node: longest-path ranks,
parallel branches side by side, a serpentine that keeps consecutive layers adjacent, and 1,000 layers
laid out in milliseconds. Skipped without node, a failure under GRADWATCH_REQUIRE_TOOLS=1 (.ci/run
installs nodejs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

GRAPH_JS = Path(__file__).resolve().parents[3] / "aggregator" / "http" / "ui" / "graph.js"


def layout(nodes: list[str], edges: list[tuple[str, str]], aspect: float = 1.8) -> dict:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("GRADWATCH_REQUIRE_TOOLS", "") == "1":
            pytest.fail("node is not installed (.ci/run installs nodejs), and GRADWATCH_REQUIRE_TOOLS=1")
        pytest.skip("node is not installed (.ci/run installs nodejs)")
    graph = {"nodes": [{"id": n} for n in nodes], "edges": [{"source": s, "target": t} for s, t in edges]}
    script = (f"import {{ layeredLayout }} from {json.dumps(GRAPH_JS.as_uri())};\n"
              f"const g = {json.dumps(graph)};\n"
              "const t0 = performance.now();\n"
              f"const out = layeredLayout(g.nodes, g.edges, {aspect});\n"
              "out.ms = performance.now() - t0;\n"
              "console.log(JSON.stringify(out));\n")
    proc = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_ranks_are_longest_paths_and_branches_stack():
    # embed -> a -> b -> head, and a skip connection embed -> head; c in parallel with a
    out = layout(["embed", "a", "c", "b", "head"],
                 [("embed", "a"), ("embed", "c"), ("a", "b"), ("c", "b"), ("b", "head"), ("embed", "head")])
    assert out["rank"] == [0, 1, 1, 2, 3]
    pos = out["pos"]
    assert pos[1][0] == pos[2][0] and pos[1][1] != pos[2][1]  # a and c: same column, one above the other
    assert len({tuple(p) for p in pos}) == 5


def test_a_chain_of_1000_layers_snakes_with_neighbours_adjacent():
    names = [f"blocks.{i}" for i in range(1000)]
    out = layout(names, list(zip(names, names[1:], strict=False)))
    pos = out["pos"]
    assert out["bands"] > 1 and out["perBand"] * out["bands"] >= 1000
    assert len({tuple(p) for p in pos}) == 1000
    for (x0, y0), (x1, y1) in zip(pos, pos[1:], strict=False):
        assert (abs(x1 - x0), y1 - y0) in ((1, 0), (0, 2.5))  # next column, or the turn to the next band
    assert out["ms"] < 200


def test_nodes_outside_the_edges_and_cycles_still_get_places():
    out = layout(["a", "b", "c", "d"], [("a", "b"), ("b", "a"), ("x", "c")])
    assert len({tuple(p) for p in out["pos"]}) == 4
