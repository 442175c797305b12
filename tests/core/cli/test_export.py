"""`gradwatch export` and `gradwatch.read_run` on a run fed through a real aggregator into a real Redis: steps at
full resolution and folded into 10- and 100-step buckets, an evaluation phase, NaN gradients, hyperparameters and
labels. The Parquet and CSV files, read back with pandas, must say what the aggregator's /steps API says; and the
command line end to end: the embedded Redis found through the data dir, an unknown run, a missing extra."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import gradwatch
from gradwatch.aggregator.history import HistoryStore
from gradwatch.aggregator.http.server import serve
from gradwatch.cli.export import main_export
from gradwatch.cli.stack import EMBEDDED_URL_FILE
from gradwatch.v1 import report_pb2

ROOT = Path(__file__).resolve().parents[3]
RUN = "export-demo"
HP = {"lr": 0.1, "batch": 32, "optimizer": "sgd", "warmup": True}
STEPS, FULL, WINDOW = 250, 10, 2  # 10 steps whole, then 10-step buckets, 100-step ones beyond 10 windows
NAN_STEPS = (15, 25, 125, 245)  # fc1's gradient NaN: 15 fires NonFinite (pinned, kept whole); 25 and 125 fold
EVAL_STEPS = (50, 100, 240)


def grads(step: int) -> dict[str, float]:
    return {"embed": 0.5, "fc1": 1.0 + step, "fc2": 2.0 + 0.5 * step, "head": 3.0}


@pytest.fixture
def run(make_aggregator, build, publish, run_all):
    """RUN applied by one aggregator and compacted; returns a second replica that does not follow the run, so its
    /steps answers from Redis as the export reads it."""
    reg = build.registration(run=RUN)
    reg.hyperparameters["lr"].number = HP["lr"]
    reg.hyperparameters["batch"].integer = HP["batch"]
    reg.hyperparameters["optimizer"].text = HP["optimizer"]
    reg.hyperparameters["warmup"].flag = HP["warmup"]
    reg.labels["team"] = "core"
    publish.registration(reg)
    seq = itertools.count(1)
    for step in range(STEPS):
        nan = {("fc1", "gradient"): 1} if step in NAN_STEPS else None
        r = build.report(step, run=RUN, seq=next(seq), grad=grads(step), loss=1.0 / (step + 1), nonfinite=nan)
        r.scalars["accuracy"] = step / STEPS
        publish.report(r)
        if step in EVAL_STEPS:
            e = build.report(step, run=RUN, seq=next(seq), loss=0.3, phase=report_pb2.PHASE_EVAL, tensors=False)
            e.scalars["accuracy"] = 0.9
            publish.report(e)
    agg = make_aggregator(history_full_steps=FULL, history_alert_window=WINDOW)
    run_all(agg)
    while agg.history_store.compact(RUN, STEPS - 1, FULL, WINDOW):
        pass
    return make_aggregator(consumer="replica-2")


@pytest.fixture
def api_steps(run):
    server, thread = serve("127.0.0.1", 0, run.registry, run.view, history=run.history, poll_s=0.02)
    url = f"http://127.0.0.1:{server.server_port}/api/v1/runs/{RUN}/steps?limit=100000"
    with urllib.request.urlopen(url, timeout=10) as resp:
        steps = json.load(resp)["data"]["steps"]
    server.shutdown()
    server.server_close()
    thread.join(5)
    return steps


def as_api(df: pd.DataFrame) -> list[dict]:
    """The long table folded back into /steps rows (NaN and Inf spelled as the API spells them)."""
    def num(v: float):
        return v if math.isfinite(v) else ("NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf"))

    rows = []
    for (step, phase, resolution), g in df.groupby(["step", "phase", "resolution"], sort=False, observed=True):
        row = {"step": int(step), "phase": phase, "time": g["time"].iloc[0].timestamp(), "loss": None,
               "grad_norm": None, "layers": {}, "param_norms": {}, "scalars": {}}
        for stat, layer, value in zip(g["statistic"], g["layer"], g["value"], strict=True):
            if stat in ("loss", "grad_norm"):
                row[stat] = num(value)
            elif stat == "layer_grad_norm":
                row["layers"][layer] = num(value)
            elif stat == "param_norm":
                row["param_norms"][layer] = num(value)
            else:
                row["scalars"][stat] = num(value)
        if resolution != 1:
            row["resolution"] = int(resolution)
        rows.append(row)
    return rows


def same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["time"] == pytest.approx(w["time"], abs=1e-6)
        assert {k: v for k, v in g.items() if k != "time"} == {k: v for k, v in w.items() if k != "time"}


def test_parquet_read_back_with_pandas_says_what_the_api_says(run, api_steps, redis_url, tmp_path):
    path = tmp_path / "run.parquet"
    err = io.StringIO()
    assert main_export(RUN, output=str(path), redis_url=redis_url, err=err) == 0, err.getvalue()
    assert f"of run {RUN} to {path}" in err.getvalue()
    df = pd.read_parquet(path)

    assert {1, 10, 100} == set(df["resolution"])  # every tier is in the file
    same_rows(as_api(df), api_steps)
    # ... and what the durable history holds, row for row
    rows = HistoryStore(run.history_store.client).rows(RUN, limit=10**6)
    assert [(r["step"], r["phase"], r.get("resolution", 1)) for r in as_api(df)] == [
        (r[0], "train" if r[2] else "eval", r[8] if len(r) > 8 else 1) for r in rows]

    assert not list(tmp_path.glob(".*part"))  # written beside, then renamed
    meta = json.loads(pq.read_schema(path).metadata[b"gradwatch"])
    assert meta["run"] == RUN and meta["hyperparameters"] == HP and meta["labels"] == {"team": "core"}
    assert meta["layers"] == ["embed", "fc1", "fc2", "head"]  # forward order


def test_nan_stays_nan_in_whole_steps_and_in_buckets(run, redis_url):
    df = gradwatch.read_run(RUN, redis_url=redis_url)
    fc1 = df[(df["layer"] == "fc1") & (df["statistic"] == "layer_grad_norm")].set_index("step")
    whole = fc1[fc1["resolution"] == 1]
    for step in (15, 245):  # pinned by the alert, or within the latest steps
        cell = whole.loc[step]
        assert math.isnan(cell["value"]) and (cell["count"], cell["nonfinite"]) == (0, 1)
        assert pd.isna(cell["min"]) and pd.isna(cell["max"])
        g = df[(df["step"] == step) & (df["statistic"] == "grad_norm") & (df["phase"] == "train")]
        assert math.isnan(g["value"].item())  # the global norm over a NaN is NaN too
    bucket = fc1[fc1["resolution"] == 10].loc[120]  # steps 120..129, 125 among them
    assert math.isnan(bucket["value"]) and bucket["nonfinite"] == 1 and bucket["count"] == 9
    assert (bucket["min"], bucket["max"]) == (121.0, 130.0)  # over the finite values
    hundred = fc1[fc1["resolution"] == 100].loc[0]  # steps 0..99 but the alert's window: 15 and 25 both there
    assert math.isnan(hundred["value"]) and hundred["nonfinite"] == 1 and hundred["count"] == 100 - 5 - 1
    assert not (df["value"] == 0).loc[df["statistic"] != "accuracy"].any()  # NaN never became 0


def test_phases_hyperparameters_and_types(run, redis_url):
    df = gradwatch.read_run(RUN, redis_url=redis_url)
    evals = df[df["phase"] == "eval"]
    assert sorted(set(evals["step"])) == list(EVAL_STEPS) and set(evals["resolution"]) == {1}
    assert set(evals["statistic"]) == {"loss", "accuracy"}
    assert evals[evals["statistic"] == "loss"]["value"].tolist() == [0.3] * 3
    for name, value in HP.items():
        assert (df[f"hp.{name}"] == value).all()
    assert df["hp.lr"].dtype == "float64" and df["hp.batch"].dtype == "int64" and df["hp.warmup"].dtype == bool
    assert (df["label.team"] == "core").all()
    assert str(df["time"].dtype) == "datetime64[us, UTC]"
    assert df["layer"].dtype == "category" and df["statistic"].dtype == "category"
    assert df.attrs["gradwatch"]["hyperparameters"] == HP
    assert list(df.columns[:12]) == ["run", "step", "phase", "resolution", "time", "layer", "statistic", "value",
                                     "min", "max", "count", "nonfinite"]
    assert df.equals(pd.read_parquet(export_file(redis_url, "parquet")))  # the file is the DataFrame


def export_file(redis_url: str, fmt: str, *args: str):
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), f"run.{fmt}")
    assert cli("export", RUN, "--redis-url", redis_url, "--output", path, *args).returncode == 0
    return path


def test_csv_holds_the_same_table(run, redis_url, tmp_path):
    want = gradwatch.read_run(RUN, redis_url=redis_url)
    path = tmp_path / "run.csv"
    assert main_export(RUN, output=str(path), redis_url=redis_url, quiet=True) == 0  # the format from the suffix
    got = pd.read_csv(path, parse_dates=["time"])
    assert list(got.columns) == list(want.columns)
    for column in ("run", "phase", "layer", "statistic"):
        assert got[column].fillna("").tolist() == want[column].astype(str).tolist()
    for column in ("step", "resolution", "value", "min", "max", "count", "nonfinite", "hp.lr", "hp.batch"):
        pd.testing.assert_series_equal(got[column], want[column], check_dtype=False)  # NaN equals NaN
    assert (got["time"] == want["time"]).all()
    assert got["value"].isna().sum() == want["value"].isna().sum() > 0


def test_wide_has_a_row_per_step(run, redis_url):
    long = gradwatch.read_run(RUN, redis_url=redis_url)
    wide = gradwatch.read_run(RUN, redis_url=redis_url, wide=True)
    assert len(wide) == long.groupby(["step", "phase", "resolution"], observed=True).ngroups
    assert list(wide.columns[:8]) == ["run", "step", "phase", "resolution", "time", "loss", "grad_norm", "accuracy"]
    train = wide[(wide["phase"] == "train") & (wide["resolution"] == 1)].set_index("step")
    assert math.isnan(train.loc[15, "grad_norm/fc1"]) and train.loc[16, "grad_norm/fc1"] == 17.0
    assert train.loc[16, "param_norm/head"] == 10.0
    ev = wide[wide["phase"] == "eval"].set_index("step")
    assert pd.isna(ev.loc[50, "grad_norm/fc1"]) and not math.isnan(ev.loc[50, "loss"])  # absent is null, not NaN
    assert wide.loc[wide["resolution"] == 100, "accuracy"].isna().all()  # buckets keep no scalars


def cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`python -m gradwatch ...` as a user runs it, without GRADWATCH_* variables unless given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    return subprocess.run([sys.executable, "-m", "gradwatch", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120, env={**clean, **(env or {})}, cwd=cwd)


def test_command_line_end_to_end(run, redis_url, tmp_path):
    """The embedded Redis of `gradwatch up` found through the data dir; a step range to stdout as CSV; an unknown
    run; a Redis that is not there."""
    data = tmp_path / "data"
    data.mkdir()
    (data / EMBEDDED_URL_FILE).write_text(redis_url + "\n")
    done = cli("export", RUN, "--data-dir", str(data), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    df = pd.read_parquet(tmp_path / f"{RUN}.parquet")
    assert df.equals(gradwatch.read_run(RUN, redis_url=redis_url))

    done = cli("export", RUN, "--redis-url", redis_url, "--format", "csv", "--output", "-", "--from", "240",
               "--to", "245", "--no-layers")
    assert done.returncode == 0, done.stderr
    part = pd.read_csv(io.StringIO(done.stdout))
    assert sorted(set(part["step"])) == list(range(240, 246)) and part["layer"].isna().all()  # "": empty
    assert math.isnan(part[(part["step"] == 245) & (part["statistic"] == "grad_norm")]["value"].item())

    done = cli("export", "no-such-run", "--redis-url", redis_url, cwd=tmp_path)
    assert done.returncode == 1 and "no run 'no-such-run'" in done.stderr and RUN in done.stderr
    assert not (tmp_path / "no-such-run.parquet").exists()

    done = cli("export", RUN, "--redis-url", "redis://127.0.0.1:1/0", cwd=tmp_path)
    assert done.returncode == 1 and "cannot reach Redis" in done.stderr


def test_a_missing_extra_is_named(redis_url, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    err = io.StringIO()
    assert main_export(RUN, redis_url=redis_url, err=err) == 2
    assert "pip install 'gradwatch[export]'" in err.getvalue()
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"gradwatch\[export\]"):
        gradwatch.read_run(RUN, redis_url=redis_url)


def test_importing_gradwatch_imports_no_pandas_or_redis():
    code = ("import sys, gradwatch; gradwatch.read_run; "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'redis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_reader_user_may_export_and_a_user_that_may_not_is_told(redis_7, tmp_path):
    """Only read commands: the reader user of deploy/redis/users.acl exports; a user without read access to the
    run's keys gets one line naming that user."""
    import redis

    from gradwatch.aggregator.history import HistoryStore as Store

    rules = next(line.split()[2:] for line in (ROOT / "deploy" / "redis" / "users.acl").read_text().splitlines()
                 if line.startswith("user reader "))
    admin = redis.Redis.from_url(redis_7.url)
    admin.acl_setuser("reader", reset=True)  # redis-py's acl_setuser cannot take selectors: send the rules as such
    admin.execute_command("ACL", "SETUSER", "reader", *[r for r in rules if not r.startswith(">")], ">pw")
    admin.execute_command("ACL", "SETUSER", "stranger", "on", ">pw", "+@all", "~other:*")
    Store(admin).save("acl-run", [(0, 1.0, True, 0.5, 1.0, {"fc1": 1.0}, {}, {"fc1": 2.0})])
    host, port = admin.connection_pool.connection_kwargs["host"], admin.connection_pool.connection_kwargs["port"]
    err = io.StringIO()
    path = tmp_path / "acl.parquet"
    assert main_export("acl-run", output=str(path), redis_url=f"redis://reader:pw@{host}:{port}/0", err=err) == 0, \
        err.getvalue()
    assert len(pd.read_parquet(path)) == 4
    err = io.StringIO()
    assert main_export("acl-run", output=str(path), redis_url=f"redis://stranger:pw@{host}:{port}/0", err=err) == 1
    assert "may not read the run" in err.getvalue() and "reader user" in err.getvalue()
    assert ":pw@" not in err.getvalue()  # the password is never shown
    admin.close()


def test_progress_on_stderr(monkeypatch):
    from gradwatch.cli import export

    monkeypatch.setattr(export, "PROGRESS_S", 0.0)
    err = io.StringIO()
    progress = export.Progress(err, RUN, 200)
    progress(50)
    progress(200)
    progress.finish()
    lines = err.getvalue().splitlines()
    assert lines[0].startswith(f"exporting {RUN}: 50 of 200 steps and buckets (25 %)") and len(lines) == 2
    quiet = io.StringIO()
    export.Progress(quiet, RUN, 200, quiet=True)(100)
    assert quiet.getvalue() == ""
