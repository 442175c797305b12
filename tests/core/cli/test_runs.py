"""`gradwatch runs list|compare|delete` against a real stack fed by short training runs, and the failures a
user meets: no aggregator, an unknown run, an aggregator that sends fewer fields; delete finding the embedded Redis
of `gradwatch up`, refusing an active run, asking for a confirmation, a Redis user that may not delete."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.cli import main as cli
from gradwatch.cli.redis_server import free_port
from gradwatch.cli.runs import (
    MISSING,
    ApiError,
    RunNotFound,
    compare_rows,
    compare_table,
    main_delete,
    redis_target,
    run_detail,
)
from gradwatch.cli.stack import Stack, StackConfig, embedded_redis_url

RUNS = {"runs-a": {"lr": 0.1, "optimizer": "sgd", "warmup": True}, "runs-b": {"lr": 0.01, "optimizer": "sgd"},
        "runs-nan": {"lr": 0.1, "optimizer": "sgd"}}
STEPS = 6
NAN_STEP = 3  # runs-nan: one weight turns NaN before this step

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A running `gradwatch up` stack (embedded Redis) that has applied RUNS: its config."""
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
        yield cfg
    assert embedded_redis_url(cfg.data_dir) is None  # `gradwatch up` stopped: its Redis URL is no longer recorded


@pytest.fixture(scope="module")
def url(stack):
    return f"http://{stack.aggregator_metrics_listen}"


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


# -- delete -------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_gradwatch_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("GRADWATCH_"):
            monkeypatch.delenv(name)


def gradwatch_cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`python -m gradwatch ...` as a user runs it: no terminal on stdin, no GRADWATCH_* variable unless given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    return subprocess.run([sys.executable, "-m", "gradwatch", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})}, cwd=cwd)


def test_delete_finds_the_embedded_redis_of_gradwatch_up(stack, url, tmp_path):
    import redis

    from gradwatch.streams import RUNS_KEY, run_keys
    from tests.fixtures.aggregator import Build, Publisher

    embedded = embedded_redis_url(stack.data_dir)
    assert embedded and embedded.startswith("redis://127.0.0.1:")
    client = redis.Redis.from_url(embedded)
    build, publish, run = Build(), Publisher(client), "runs-doomed"
    publish.registration(build.registration(run))
    for step in range(3):
        publish.report(build.report(step, run=run, nonfinite={("fc1", "gradient"): 1} if step == 1 else None))
    deadline = time.monotonic() + 20
    while not _followed(url, run):
        assert time.monotonic() < deadline, "the stack's aggregator never followed the run"
        time.sleep(0.1)

    refused = gradwatch_cli("runs", "delete", run, "--data-dir", stack.data_dir, cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"gradwatch runs delete: run '{run}' last reported ")
    assert refused.stderr.rstrip().endswith("(--force)")
    assert client.exists(*run_keys(run)) >= 5

    unconfirmed = gradwatch_cli("runs", "delete", run, "--force", env={"GRADWATCH_UP_DATA_DIR": stack.data_dir},
                                cwd=tmp_path)
    assert unconfirmed.returncode == 2, unconfirmed.stderr
    assert "not deleting without a confirmation: stdin is not a terminal; pass --yes" in unconfirmed.stderr
    assert f"the embedded Redis of gradwatch up, data in {stack.data_dir}" in unconfirmed.stdout
    assert "followed by aggregator" in unconfirmed.stdout and f"gradwatch:{{{run}}}:history" in unconfirmed.stdout

    deleted = gradwatch_cli("runs", "delete", run, "--force", "--yes", "--data-dir", stack.data_dir, cwd=tmp_path)
    assert deleted.returncode == 0, deleted.stderr
    last = deleted.stdout.splitlines()[-1]
    assert last.startswith(f"deleted run {run}: ") and last.endswith(f"keys, 1 alerts, its entry in {RUNS_KEY}")
    assert client.exists(*run_keys(run)) == 0 and client.zscore(RUNS_KEY, run) is None
    deadline = time.monotonic() + 10
    while _followed(url, run):  # the aggregator lets it go
        assert time.monotonic() < deadline, "the aggregator still serves the deleted run"
        time.sleep(0.1)
    assert client.exists(*run_keys(run)) == 0
    assert all(client.zscore(RUNS_KEY, other) is not None for other in RUNS)
    client.close()


def _followed(url: str, run: str) -> bool:
    try:
        return run_detail(url, run).get("step") is not None
    except RunNotFound:
        return False


def test_delete_an_unknown_run(stack, no_gradwatch_env, capsys):
    assert cli.main(["runs", "delete", "nope", "--yes", "--data-dir", stack.data_dir]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradwatch runs delete: no run 'nope' in Redis at redis://127.0.0.1:")
    assert err.endswith(f"(the embedded Redis of gradwatch up, data in {stack.data_dir}): no key, no entry in "
                        f"gradwatch:runs, no alert")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_delete_asks_first(redis_url, redis_client, no_gradwatch_env):
    from gradwatch.streams import RUNS_KEY
    from tests.fixtures.aggregator import Build, Publisher

    Publisher(redis_client).registration(Build().registration("asked"))
    redis_client.zadd(RUNS_KEY, {"asked": time.time() - 2 * 3600})  # finished two hours ago
    out, err = io.StringIO(), io.StringIO()
    assert main_delete("asked", redis_url, out=out, err=err, stdin=Terminal("n\n")) == 1
    assert "Delete run 'asked'? This cannot be undone. [y/N] " in err.getvalue()
    assert "nothing deleted" in err.getvalue() and redis_client.exists("gradwatch:{asked}:reports")
    assert "last report 2.0 h ago" in out.getvalue()
    out = io.StringIO()
    assert main_delete("asked", redis_url, out=out, err=io.StringIO(), stdin=Terminal("y\n")) == 0
    assert out.getvalue().splitlines()[-1] == "deleted run asked: 2 keys, 0 alerts, its entry in gradwatch:runs"
    assert not redis_client.exists("gradwatch:{asked}:reports")


def test_delete_as_a_user_that_may_not(redis_url, redis_client, no_gradwatch_env):
    from tests.fixtures.aggregator import Build, Publisher

    Publisher(redis_client).registration(Build().registration("guarded"))
    redis_client.acl_setuser("looker", enabled=True, passwords=["+pw"], keys=["gradwatch:*"],
                             commands=["+exists", "+get", "+zscore", "+xrange", "+ping", "+command"])
    try:
        limited = redis_url.replace("redis://", "redis://looker:pw@")
        err = io.StringIO()
        assert main_delete("guarded", limited, yes=True, force=True, out=io.StringIO(), err=err) == 1
        message = err.getvalue().strip()
        assert message.startswith("gradwatch runs delete: the Redis user of redis://looker:***@127.0.0.1:")
        assert "the admin user of deploy/redis/users.acl" in message and ":pw@" not in message
        assert redis_client.exists("gradwatch:{guarded}:reports")
    finally:
        redis_client.acl_deluser("looker")


def test_delete_without_a_redis(no_gradwatch_env, capsys):
    port = free_port()
    assert cli.main(["runs", "delete", "x", "--yes", "--redis-url", f"redis://127.0.0.1:{port}/0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"gradwatch runs delete: cannot reach Redis at redis://127.0.0.1:{port}/0 (--redis-url)")


def test_which_redis_delete_uses(tmp_path, no_gradwatch_env, monkeypatch):
    from gradwatch.cli.stack import EMBEDDED_URL_FILE

    assert redis_target(data_dir=str(tmp_path)) == (
        "redis://127.0.0.1:6379/0", f"the default: no gradwatch up is running with data in {tmp_path}", False)
    (tmp_path / EMBEDDED_URL_FILE).write_text("redis://127.0.0.1:5555/0\n")
    assert redis_target(data_dir=str(tmp_path))[0::2] == ("redis://127.0.0.1:5555/0", False)
    monkeypatch.setenv("GRADWATCH_REDIS_CLUSTER", "1")
    assert redis_target(data_dir=str(tmp_path))[2] is False  # the embedded Redis is never a cluster
    monkeypatch.setenv("GRADWATCH_REDIS_URL", "redis://redis.internal:6379/0")
    assert redis_target(data_dir=str(tmp_path)) == ("redis://redis.internal:6379/0", "GRADWATCH_REDIS_URL", True)
    assert redis_target("redis://admin:pw@h:1/0", str(tmp_path), False) == ("redis://admin:pw@h:1/0", "--redis-url",
                                                                            False)
