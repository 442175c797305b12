"""The topology's module groups and layout (aggregator/http/ui/tree.js, layout.js) run by Node: path prefixes
become groups, single-child groups are skipped, wide groups split into ranges of at most MAX_CHILDREN, groups
open level by level within the budget, the edges between what is shown, and a layout whose cells never overlap
(the label check in a real browser is test_scale.py). Skipped without node, a failure under
GRADWATCH_REQUIRE_TOOLS=1 (.ci/run installs nodejs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.scenarios.ui.synthetic import gpt2_like, transformer_graph

UI = Path(__file__).resolve().parents[3] / "aggregator" / "http" / "ui"


def run_node(nodes: list[str], edges: list[tuple[str, str]], body: str) -> dict:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("GRADWATCH_REQUIRE_TOOLS", "") == "1":
            pytest.fail("node is not installed (.ci/run installs nodejs), and GRADWATCH_REQUIRE_TOOLS=1")
        pytest.skip("node is not installed (.ci/run installs nodejs)")
    graph = {"nodes": [{"id": n} for n in nodes], "edges": [{"source": s, "target": t} for s, t in edges]}
    script = (f"import {{ ModuleTree, MAX_CHILDREN }} from {json.dumps((UI / 'tree.js').as_uri())};\n"
              f"import {{ layoutTree, textMeasure }} from {json.dumps((UI / 'layout.js').as_uri())};\n"
              f"const g = {json.dumps(graph)};\n"
              "const t0 = performance.now();\n"
              "const tree = new ModuleTree(g.nodes, g.edges);\n"
              "const units = (u) => u.children.map((c) => [c.id, c.kind, tree.label(c), c.size]);\n"
              f"const out = (() => {{ {body} }})();\n"
              "out.ms = performance.now() - t0;\n"
              "console.log(JSON.stringify(out));\n")
    proc = subprocess.run([node, "--input-type=module"], input=script, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def deep(blocks: int = 200) -> tuple[list[str], list[tuple[str, str]]]:
    nodes, edges = transformer_graph(blocks)
    return [n for n, _ in nodes], edges


def test_paths_become_groups_and_wide_groups_ranges():
    nodes, edges = deep()
    out = run_node(nodes, edges, "return {top: units(tree.root), blocks: units(tree.root.children[1]), "
                                 "range: units(tree.root.children[1].children[0]), leaves: tree.leaves.length, "
                                 "max: MAX_CHILDREN};")
    assert out["leaves"] == 2002
    assert [u[:3] for u in out["top"]] == [["embed", "leaf", "embed"], ["blocks", "group", "blocks"],
                                           ["head", "leaf", "head"]]
    # 200 blocks in 13 ranges of 16 (the last of 8), each labelled by the block numbers it holds
    assert len(out["blocks"]) == 13 and out["blocks"][0][1:] == ["range", "0–15", 160]
    assert out["blocks"][-1][1:] == ["range", "192–199", 80]
    assert out["range"][3][:3] == ["blocks.3", "group", "3"]
    assert all(len(units) <= out["max"] for units in (out["top"], out["blocks"], out["range"]))
    assert out["ms"] < 500


def test_groups_open_level_by_level_within_the_budget_and_reveal_a_layer():
    nodes, edges = deep()
    out = run_node(nodes, edges, """
      tree.openLevels();
      const first = tree.visible().map((u) => u.id);
      tree.reveal('blocks.150.attn.v_proj');
      const revealed = tree.visible().map((u) => u.id);
      const edges = tree.visibleEdges().map(([a, b]) => [a.id, b.id]);
      return {first, revealed, edges};""")
    assert out["first"] == ["embed", *[f"blocks[{a}–{min(a + 15, 199)}]" for a in range(0, 200, 16)], "head"]
    assert "blocks.150.attn.v_proj" in out["revealed"] and "blocks.150.mlp" in out["revealed"]
    assert "blocks.151" in out["revealed"] and "blocks[160–175]" in out["revealed"]
    assert len(out["revealed"]) < 60
    edges = {tuple(e) for e in out["edges"]}
    assert ("blocks.150.ln_1", "blocks.150.attn.v_proj") in edges  # inside the open block
    assert ("blocks.150.attn.o_proj", "blocks.150.ln_2") in edges
    assert ("blocks.149", "blocks.150.ln_1") in edges  # from a closed block into the open one
    assert ("blocks[128–143]", "blocks.144") in edges  # between a closed range and an open one's child


def test_gpt2_groups_skip_single_children_and_all_fit():
    nodes, edges = gpt2_like(2)
    out = run_node([n for n, _ in nodes], edges, """
      tree.openLevels();
      return {shown: tree.visible().map((u) => [u.id, tree.label(u)]), top: units(tree.root)};""")
    assert [u[0] for u in out["top"]] == ["transformer", "lm_head"]
    assert len(out["shown"]) == 25 and ["transformer.h.0.attn.c_attn", "c_attn"] in out["shown"]


def test_a_module_that_holds_layers_and_has_its_own_is_both():
    out = run_node(["enc", "enc.a", "enc.b", "dec"], [("enc", "enc.a"), ("enc.a", "enc.b"), ("enc.b", "dec")], """
      tree.openLevels();
      return {shown: tree.visible().map((u) => [u.id, tree.label(u)])};""")
    assert out["shown"] == [["enc", "enc (own)"], ["enc.a", "a"], ["enc.b", "b"], ["dec", "dec"]]


@pytest.mark.parametrize("opened", ["first", "everything"])
def test_layout_cells_and_frames_never_overlap(opened):
    nodes, edges = deep(40)
    out = run_node(nodes, edges, f"""
      tree.openLevels();
      if ({json.dumps(opened)} === 'everything') for (const u of tree.units.values()) u.open = true;
      const lay = layoutTree(tree, 900, textMeasure(null), (u) => tree.label(u));
      return {{cells: lay.cells.map((c) => [c.x, c.y, c.w, c.h, c.lx - c.lw / 2, c.lw]),
              frames: lay.frames.map((f) => [f.x, f.y, f.w, f.h, f.unit.id]), shown: tree.visible().length,
              width: lay.width}};""")
    cells = out["cells"]
    assert len(cells) == out["shown"]
    for x, _, w, _, label_x, label_w in cells:
        assert x <= label_x and label_x + label_w <= x + w  # the label lies inside its cell
    boxes = sorted((x, y, x + w, y + h) for x, y, w, h, *_ in cells)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if b[0] >= a[2]:
                break
            assert b[1] >= a[3] or a[1] >= b[3], (a, b)
    # a frame holds whole cells, never part of one
    for fx, fy, fw, fh, _ in out["frames"]:
        for x, y, w, h, *_ in cells:
            inside = fx <= x and x + w <= fx + fw and fy <= y and y + h <= fy + fh
            outside = x + w <= fx or fx + fw <= x or y + h <= fy or fy + fh <= y
            assert inside or outside
