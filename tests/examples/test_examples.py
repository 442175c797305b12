"""Every example under examples/ runs as a user runs it (`python examples/NAME.py`, its own whole stack) and
must show what it demonstrates: the alerts it is about reached the aggregator, the broken gradient was
named, the diverging trials were told apart and pruned, the trainer integrations reported every step. Each
writes what it saw with --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TIMEOUT_S = 120  # each takes ~10 s alone; a loaded 2-core CI machine gets slack


def run_example(name: str, tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--json", str(out)], capture_output=True,
                          text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert proc.returncode == 0, f"examples/{name}.py exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc.stdout


def rules(alerts: list[dict]) -> set[str]:
    return {a["rule"] for a in alerts}


def test_gradcheck(tmp_path):
    result, stdout = run_example("gradcheck", tmp_path)
    correct, broken = result["correct"], result["broken"]
    assert correct["passed"] and correct["failed"] == []
    assert max(correct["max_relative_error"].values()) < 1e-6
    assert broken["failed"] == ["hidden.bias"]  # the input and weight gradients of the Function are right
    assert broken["max_relative_error"]["hidden.bias"] > 0.5  # mean instead of sum over 32: off by 31/32
    # The verdicts went through collector, Redis and aggregator.
    assert correct["telemetry_passed"] == 1.0 and broken["telemetry_passed"] == 0.0
    assert "hidden.bias" in stdout and "FAIL" in stdout


def test_activation_health(tmp_path):
    result, _ = run_example("activation_health", tmp_path)
    tanh, relu = result["act-saturated-tanh"], result["act-dead-relu"]
    assert {(a["rule"], a["layer"]) for a in tanh["alerts"]} >= {("SaturatedActivation", "act1")}
    assert {(a["rule"], a["layer"]) for a in relu["alerts"]} >= {("DeadReLU", "act1")}
    assert "DeadReLU" not in rules(tanh["alerts"]) and "SaturatedActivation" not in rules(relu["alerts"])
    # The same fractions the dashboards read, from /api/v1/runs/{run}/layers.
    assert tanh["layers"]["act1"]["saturated_fraction"] > 0.95
    assert relu["layers"]["act1"]["dead_fraction"] == 1.0


def test_data_statistics(tmp_path):
    result, _ = run_example("data_statistics", tmp_path)
    raw, imbalanced = result["data-raw-pixels"]["alerts"], result["data-imbalanced"]["alerts"]
    assert "UnnormalizedInput" in rules(raw)
    assert {"ClassImbalance", "InputDataDrift"} <= rules(imbalanced)
    assert not {"ClassImbalance", "InputDataDrift"} & rules(raw)  # balanced labels, one preprocessing
    assert "UnnormalizedInput" not in rules(imbalanced)
    drift = next(a for a in imbalanced if a["rule"] == "InputDataDrift")
    assert drift["step"] >= 30  # the preprocessing changed at step 30, not before
    assert next(a for a in raw if a["rule"] == "UnnormalizedInput")["tensor"].startswith("inputs.0")


def test_overfitting(tmp_path):
    result, _ = run_example("overfitting", tmp_path)
    fired = {a["rule"]: a for a in result["alerts"]}
    assert {"Overfit", "Overtraining"} <= set(fired)
    assert fired["Overtraining"]["step"] > result["best_step"]  # after the validation loss turned
    run = result["run"]
    assert run["eval_loss"] > run["loss"] and run["scalars"]["accuracy"] > run["eval_scalars"]["accuracy"]


def test_sweep(tmp_path):
    result, stdout = run_example("sweep", tmp_path)
    assert sorted(result["diverged"]) == result["expected_diverged"] == ["sweep-lr0.5-wd0", "sweep-lr0.5-wd0.01"]
    for run, why in result["diverged"].items():
        assert "ExplodingGradient" in why, run
    runs = {r["run"]: r for r in result["runs"]}
    assert len(runs) == 6
    assert runs["sweep-lr0.1-wd0.01"]["hyperparameters"] == {"lr": 0.1, "weight_decay": 0.01, "momentum": 0.9,
                                                             "batch_size": 64}
    assert runs["sweep-lr0.1-wd0.01"]["labels"] == {"sweep": "lr-x-wd", "model": "mlp-tanh"}
    # The compare table: hyperparameter rows, one column per run, the rules of the diverged ones.
    table = stdout[stdout.index("the runs side by side"):]
    assert "weight_decay" in table and "sweep-lr0.01-wd0" in table and "ExplodingGradient" in table


def test_optuna_pruning(tmp_path):
    pytest.importorskip("optuna")
    result, _ = run_example("optuna_pruning", tmp_path)
    trials = result["trials"]
    assert trials[0]["state"] == "COMPLETE" and trials[1]["state"] == "PRUNED"
    assert trials[1]["gradwatch_alert"] in {"ExplodingGradient", "NonFinite"}
    for t in trials:  # pruned exactly when gradwatch raised an alert, within one step of it
        assert (t["state"] == "PRUNED") == ("gradwatch_alert" in t), t
        if t["state"] == "PRUNED":
            assert 0 <= t["stopped_at_step"] - t["alert_step"] <= 1, t
    assert result["best"] is not None and trials[result["best"]]["state"] == "COMPLETE"
    # The packaged watch_trial registered the trial's params and its study.
    assert result["registered"]["hyperparameters"] == {"lr": 0.8}
    assert result["registered"]["labels"] == {"study": "gradwatch-lr", "trial": "1", "model": "mlp-tanh"}



def test_ray_tune(tmp_path):
    pytest.importorskip("ray.tune")
    result, _ = run_example("ray_tune", tmp_path)
    trials = {t["lr"]: t for t in result["trials"]}
    assert trials[0.8]["state"] == "STOPPED" and trials[0.8]["gradwatch_alert"] in {"ExplodingGradient", "NonFinite"}
    assert trials[0.03]["state"] == "COMPLETE" and trials[0.03]["iterations"] == 60
    for t in trials.values():  # stopped exactly when gradwatch raised an alert, within one step of it
        assert t["error"] is None and (t["state"] == "STOPPED") == ("gradwatch_alert" in t), t
        if t["state"] == "STOPPED":
            assert 0 <= t["last_step"] - t["alert_step"] <= 1 and t["iterations"] == t["last_step"] + 1, t
            assert t["reason"].startswith(f"gradwatch: {t['gradwatch_alert']} at step {t['alert_step']}"), t
    # The packaged watch_trial registered the trial's config and its experiment.
    assert result["registered"]["hyperparameters"] == {"lr": 0.8}
    labels = result["registered"]["labels"]
    assert labels["experiment"] == "gradwatch-lr" and labels["model"] == "mlp-tanh"
    assert trials[0.8]["run"] == f"gradwatch-lr-{labels['trial']}"
    assert result["stopper"] == {"errors": 0, "late": 0, "unwatched": 0}

def test_hf_trainer(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    result, _ = run_example("hf_trainer", tmp_path)
    assert result["steps"] == list(range(1, 25))  # the Trainer's step numbers, every one of them
    assert result["trainer_loss_logs"] == 0  # default logging_steps: the Trainer itself logged no loss
    assert all(loss is not None for loss in result["losses"])
    bad = result["alerts"][0]["step"]
    first_nan = result["first_nan"]  # the update of the bad step wrote NaN into the weights: NaN from then on
    assert first_nan in (bad, bad + 1) and all(loss == "NaN" for loss in result["losses"][first_nan - 1:])
    assert "net.0" in result["alerts"][0]["summary"]  # where the Inf entered
    assert result["hyperparameters"]["lr_scheduler_type"] == "cosine"  # a plain value, not SchedulerType.COSINE
    assert result["hyperparameters"]["gradient_accumulation_steps"] == 2
    assert result["inputs"] == ["inputs.features", "inputs.labels"]


def test_lightning_trainer(tmp_path):
    pytest.importorskip("lightning")
    result, _ = run_example("lightning_trainer", tmp_path)
    assert result["steps"] == list(range(12)) and all(loss is not None for loss in result["losses"])
    assert {"lr": 0.01, "channels": 8, "accumulate_grad_batches": 2, "gradient_clip_val": 1.0,
            "precision": "32-true"}.items() <= result["hyperparameters"].items()
    assert result["alerts"][0]["rule"] == "UnnormalizedInput" and result["alerts"][0]["tensor"].startswith("inputs.0")
    assert result["inputs"]["min"] >= 0 and result["inputs"]["max"] <= 255 and result["inputs"]["mean"] > 100
