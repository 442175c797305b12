"""The Optuna pruner with real Optuna against a whole stack (collector, aggregator and redis-server as processes):
the trial whose learning rate explodes is pruned within one step of its ExplodingGradient alert, the others run
to the end; its run carries the trial's params. And the pruner's refusals: an aggregator out of reach prunes
nothing and raises nothing, a read token travels as a bearer header. Skips where optuna is not installed."""

from __future__ import annotations

import json
import math
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gradwatch.cli.redis_server import free_port
from tests.agent.integrations.tuners import LEARNING_RATES, regression

optuna = pytest.importorskip("optuna")

from gradwatch.agent.integrations.alerts import AggregatorError, AlertReader  # noqa: E402
from gradwatch.agent.integrations.optuna import GradwatchPruner, run_id, watch_trial  # noqa: E402

STEPS = 30


def objective(trial, pruner: GradwatchPruner, collector: str) -> float:
    model, optimizer, train = regression(trial.suggest_float("lr", 1e-3, 10.0, log=True))
    with watch_trial(trial, model, optimizer, collector=collector, labels={"model": "mlp"}) as watcher:
        for step, value in train(watcher, STEPS):
            if math.isfinite(value):
                trial.report(value, step)
            if trial.should_prune():
                trial.set_user_attr("stopped_at", step)
                raise optuna.TrialPruned(pruner.reason(trial))
    return value


def test_the_exploding_trial_is_pruned_within_one_step_of_its_alert(stack):
    pruner = GradwatchPruner(rules=("ExplodingGradient",), url=stack.aggregator_metrics_listen)
    study = optuna.create_study(study_name="gradwatch test", pruner=pruner)  # a space: not a run id character
    for lr in LEARNING_RATES:
        study.enqueue_trial({"lr": lr})
    study.optimize(lambda t: objective(t, pruner, stack.collector_listen), n_trials=len(LEARNING_RATES))

    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                      optuna.trial.TrialState.COMPLETE]
    exploded = study.trials[1]
    alert = pruner.alert(exploded)
    assert alert["rule"] == "ExplodingGradient" and alert["run"] == "gradwatch-test-trial-1"
    assert 0 <= exploded.user_attrs["stopped_at"] - alert["step"] <= 1  # within one step of the alert
    assert exploded.user_attrs["stopped_at"] < STEPS - 1
    assert exploded.user_attrs["gradwatch_run"] == "gradwatch-test-trial-1"
    assert pruner.alert(study.trials[0]) is None and pruner.alert(study.trials[2]) is None
    assert pruner.errors == 0 and pruner.late == 0

    url = f"http://{stack.aggregator_metrics_listen}/api/v1/runs/gradwatch-test-trial-1"
    with urllib.request.urlopen(url, timeout=5) as resp:
        run = json.load(resp)["data"]
    assert run["hyperparameters"] == {"lr": 3.0}
    assert run["labels"] == {"study": "gradwatch test", "trial": "1", "model": "mlp"}


def test_an_unreachable_aggregator_prunes_nothing_and_raises_nothing(caplog):
    pruner = GradwatchPruner(url=f"127.0.0.1:{free_port()}")
    study = optuna.create_study(pruner=pruner)
    trial = study.ask()
    assert not trial.should_prune() and not trial.should_prune()
    assert pruner.errors == 2
    assert len([r for r in caplog.records if "cannot ask the aggregator" in r.getMessage()]) == 1  # told once
    # Another pruner still decides where gradwatch cannot.
    always = type("Always", (optuna.pruners.BasePruner,), {"prune": lambda self, study, trial: True})()
    study = optuna.create_study(pruner=GradwatchPruner(url=f"127.0.0.1:{free_port()}", wrapped_pruner=always))
    assert study.ask().should_prune()


def test_the_read_token_travels_as_a_bearer_header():
    seen: list[str | None] = []

    class Api(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == "Bearer s3cret"
            body = {"status": "success", "data": {"run": "r", "step": 4, "alerts": [
                {"rule": "NonFinite", "status": "firing", "run": "r", "step": 3}]}} if ok else {
                "status": "error", "errorType": "unauthenticated", "error": "no"}
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"127.0.0.1:{server.server_address[1]}"
        state = AlertReader(url, token="s3cret").run("r")
        assert state.step == 4 and [a["rule"] for a in state.firing] == ["NonFinite"]
        with pytest.raises(AggregatorError, match="401.*read token"):
            AlertReader(url, token="wrong").run("r")
        assert seen == ["Bearer s3cret", "Bearer wrong"]
        assert "s3cret" not in repr(AlertReader(url, token="s3cret"))
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("study", "number", "expected"), [
    ("lr-sweep", 3, "lr-sweep-trial-3"),
    ("my study/2024", 0, "my-study-2024-trial-0"),
    ("x" * 200, 12, "x" * (128 - len("-trial-12")) + "-trial-12"),
])
def test_run_id(study, number, expected):
    assert run_id(study, number) == expected
