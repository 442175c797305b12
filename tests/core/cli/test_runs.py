"""`gradwatch runs list|compare` against a real stack fed by two short training runs, and the failures a
user meets: no aggregator, an unknown run, an aggregator that sends fewer fields."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.cli import main as cli
from gradwatch.cli.redis_server import free_port
from gradwatch.cli.runs import MISSING, ApiError, compare_rows, compare_table, run_detail
from gradwatch.cli.stack import Stack, StackConfig

RUNS = {"runs-a": {"lr": 0.1, "optimizer": "sgd", "warmup": True}, "runs-b": {"lr": 0.01, "optimizer": "sgd"},
        "runs-nan": {"lr": 0.1, "optimizer": "sgd"}}
STEPS = 6
NAN_STEP = 3  # runs-nan: one weight turns NaN before this step

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    cfg = StackConfig(data_dir=str(tmp_path_factory.mktemp("stack")), collector_listen=f"127.0.0.1:{free_port()}",
                      collector_metrics_listen=f"127.0.0.1:{free_port()}",
                      aggregator_metrics_listen=f"127.0.0.1:{free_port()}", log_level="WARNING")
    with Stack(cfg):
        base = f"http://{cfg.aggregator_metrics_listen}"
        for run, hp in RUNS.items():
            torch.manual_seed(0)
            model = nn.Linear(4, 2)
            opt = torch.optim.SGD(model.parameters(), lr=hp["lr"])
            with gradwatch.watch(model, opt, run=run, collector=cfg.collector_listen, hyperparameters=hp,
                                 labels={"team": "core"}) as w:
                for step in range(STEPS):
                    if run == "runs-nan" and step == NAN_STEP:
                        with torch.no_grad():
                            model.weight[0, 0] = float("nan")
                    x = torch.randn(8, 4)
                    loss = nn.functional.cross_entropy(model(x), x[:, :2].argmax(1))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    w.step(loss=loss, accuracy=0.5)
                w.step(phase="eval", loss=0.7, accuracy=0.25)
        _wait_applied(base)
        yield base


def _wait_applied(base: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if all(run_detail(base, run).get("step") == STEPS - 1 for run in RUNS):
                return
        except ApiError:
            pass
        time.sleep(0.1)
    raise AssertionError("the aggregator did not apply every run")


def test_compare_shows_the_runs_side_by_side(url, capsys):
    assert cli.main(["runs", "compare", "runs-a", "runs-b", "--url", url]) == 0
    # One row per field: its name, then one value (without spaces here) per run.
    rows = {" ".join(cells[:-2]): cells[-2:] for cells in map(str.split, capsys.readouterr().out.splitlines())}
    assert rows["run"] == ["runs-a", "runs-b"]
    assert rows["lr"] == ["0.1", "0.01"] and rows["optimizer"] == ["sgd", "sgd"]
    assert rows["warmup"] == ["true", MISSING]
    assert rows["label team"] == ["core", "core"]
    assert rows["step"] == [str(STEPS - 1)] * 2
    assert rows["eval loss"] == ["0.7", "0.7"]
    assert rows["accuracy"] == ["0.5", "0.5"] and rows["eval accuracy"] == ["0.25", "0.25"]
    assert rows["firing alerts"] == ["0", "0"]


def test_compare_json_and_an_unknown_run(url, capsys):
    assert cli.main(["runs", "compare", "runs-b", "nope", "--url", url, "--json"]) == 1
    captured = capsys.readouterr()
    details = json.loads(captured.out)
    assert [d["run"] for d in details] == ["runs-b"] and details[0]["hyperparameters"]["lr"] == 0.01
    assert captured.err.strip() == f"gradwatch runs compare: no run 'nope' at {url} (see gradwatch runs list)"


def test_list(url, capsys):
    assert cli.main(["runs", "list", "--url", url.removeprefix("http://")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "step", "loss"]
    assert sorted(line.split()[0] for line in out[1:]) == ["runs-a", "runs-b", "runs-nan"]


def test_nan_reads_nan_never_zero(url, capsys):
    assert cli.main(["runs", "compare", "runs-nan", "--url", url]) == 0
    rows = {" ".join(cells[:-1]): cells[-1] for cells in map(str.split, capsys.readouterr().out.splitlines())}
    assert rows["loss"] == "NaN" and rows["grad norm"] == "NaN"
    assert cli.main(["runs", "list", "--url", url]) == 0
    line = next(x.split() for x in capsys.readouterr().out.splitlines() if x.startswith("runs-nan"))
    assert line[2] == "NaN"  # the loss column


def test_unreachable_aggregator_is_one_line(capsys):
    port = free_port()
    for argv in (["runs", "list"], ["runs", "compare", "x"]):
        assert cli.main([*argv, "--url", f"http://127.0.0.1:{port}"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert err.startswith(f"gradwatch runs: cannot reach the aggregator at http://127.0.0.1:{port}")


def test_missing_fields_show_as_dashes():
    """An older aggregator: no hyperparameters, labels, scalars or alerts in its answers."""
    rows = dict(compare_rows([{"run": "old", "step": 3, "loss": float("nan")}, {"run": "new", "step": None}]))
    assert rows["step"] == ["3", MISSING] and rows["loss"] == ["nan", MISSING]
    assert rows["rules"] == [MISSING, MISSING] and rows["firing alerts"] == ["0", "0"]
    assert compare_table([{"run": "only"}]).splitlines()[0].split() == ["run", "only"]
