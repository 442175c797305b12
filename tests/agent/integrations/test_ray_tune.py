"""The Ray Tune stopper with real Ray Tune (a local Ray of 2 CPUs, trials in worker processes) against a whole
stack (collector, aggregator and redis-server as processes): the trial whose learning rate explodes is stopped
within one step of its ExplodingGradient alert, the others run to the end; its run carries the trial's config;
the reason stays in its last result. And the stopper's refusals: results without a run, an aggregator out of
reach. Skips where ray[tune] is not installed, fails instead under GRADWATCH_REQUIRE_TOOLS=1 (the test extra
installs it)."""

from __future__ import annotations

import json
import math
import os
import pickle
import urllib.request

import pytest
import torch
from torch import nn

from gradwatch.cli.redis_server import free_port
from tests.agent.integrations.tuners import LEARNING_RATES, regression

try:
    import ray
    from ray import tune
except ModuleNotFoundError as e:
    if os.environ.get("GRADWATCH_REQUIRE_TOOLS", "") == "1":
        pytest.fail(f"ray[tune] is not installed ({e}; the test extra installs it), and GRADWATCH_REQUIRE_TOOLS=1",
                    pytrace=False)
    pytest.skip(f"ray[tune] is not installed ({e}): pip install 'gradwatch[ray]'", allow_module_level=True)

from gradwatch.agent.integrations.ray_tune import GradwatchStopper, report, run_id, watch_trial  # noqa: E402

STEPS = 30
EXPERIMENT = "gradwatch test"  # a space: not a run id character


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (its start takes seconds): 2 CPUs, so two trials run at once."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
        yield
        ray.shutdown()


def train_fn(config: dict, collector: str) -> None:
    """The trainable, in a Ray worker: `collector` comes through tune.with_parameters, not the config."""
    torch.set_num_threads(1)
    model, optimizer, train = regression(config["lr"])
    with watch_trial(config, model, optimizer, collector=collector, labels={"model": "mlp"}) as watcher:
        for step, value in train(watcher, STEPS):
            report({"loss": value if math.isfinite(value) else None, "step": step}, watcher)


def test_the_exploding_trial_is_stopped_within_one_step_of_its_alert(local_ray, stack, tmp_path):
    stopper = GradwatchStopper(rules=("ExplodingGradient",), url=stack.aggregator_metrics_listen)
    tuner = tune.Tuner(tune.with_parameters(train_fn, collector=stack.collector_listen),
                       param_space={"lr": tune.grid_search(list(LEARNING_RATES))},
                       run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(tmp_path), stop=stopper,
                                                 verbose=0))
    results = {r.config["lr"]: r for r in tuner.fit()}

    assert sorted(results) == sorted(LEARNING_RATES) and not any(r.error for r in results.values())
    exploded = results[3.0].metrics
    trial = exploded["trial_id"]
    alert = stopper.alert(trial)
    assert alert["rule"] == "ExplodingGradient" and alert["run"] == run_id(EXPERIMENT, trial)
    assert exploded["gradwatch_run"] == alert["run"] == f"gradwatch-test-{trial}"
    assert 0 <= exploded["step"] - alert["step"] <= 1, (exploded["step"], alert)  # within one step of the alert
    assert exploded["training_iteration"] == exploded["step"] + 1 < STEPS  # nothing reported after the stop
    assert exploded["gradwatch_alert"] == stopper.reason(trial)
    assert stopper.reason(trial).startswith("gradwatch: ExplodingGradient at step ")
    for lr in (0.01, 0.03):  # the healthy trials ran to the end, unaffected
        healthy = results[lr].metrics
        assert healthy["training_iteration"] == STEPS and healthy["step"] == STEPS - 1
        assert stopper.alert(healthy["trial_id"]) is None and "gradwatch_alert" not in healthy
        assert healthy["gradwatch_step"] == STEPS - 1
    assert stopper.errors == 0 and stopper.late == 0 and stopper.unwatched == 0

    url = f"http://{stack.aggregator_metrics_listen}/api/v1/runs/{alert['run']}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        run = json.load(resp)["data"]
    assert run["hyperparameters"] == {"lr": 3.0}
    assert run["labels"] == {"experiment": EXPERIMENT, "trial": trial, "model": "mlp"}


def test_a_result_without_a_run_or_an_unreachable_aggregator_stops_nothing(caplog):
    stopper = GradwatchStopper(url=f"127.0.0.1:{free_port()}")
    assert not stopper("t1", {"loss": 1.0}) and not stopper("t1", {"loss": 1.0})
    assert stopper.unwatched == 2 and stopper.errors == 0
    assert not stopper("t1", {"gradwatch_run": "r", "gradwatch_step": 3})
    assert not stopper("t1", {"gradwatch_run": "r", "gradwatch_step": 4})
    assert stopper.errors == 2 and not stopper.stop_all() and stopper.alert("t1") is None
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "has no 'gradwatch_run'" in m]) == 1  # each told once
    assert len([m for m in messages if "cannot ask the aggregator" in m]) == 1


def test_the_stopper_survives_pickling():
    """Tune pickles its run config, the stopper in it, into the experiment directory (tuner.pkl)."""
    stopper = pickle.loads(pickle.dumps(GradwatchStopper(rules=("NonFinite",), url="127.0.0.1:1", token="s3cret")))
    assert stopper.rules == {"NonFinite"} and stopper.reader.url == "http://127.0.0.1:1"
    assert not stopper("t", {"gradwatch_run": "r"}) and stopper.errors == 1  # its lock works again


@pytest.mark.parametrize(("experiment", "trial", "expected"), [
    ("lr-sweep", "a1b2c_00003", "lr-sweep-a1b2c_00003"),
    ("my sweep/2024", "a1b2c_00000", "my-sweep-2024-a1b2c_00000"),
    ("x" * 200, "a1b2c_00012", "x" * (128 - len("-a1b2c_00012")) + "-a1b2c_00012"),
])
def test_run_id(experiment, trial, expected):
    assert run_id(experiment, trial) == expected


@pytest.mark.filterwarnings("ignore::UserWarning")  # Ray's, once per process: "only inside a Tuner"
def test_watch_trial_outside_tune_needs_a_run():
    with pytest.raises(RuntimeError, match="run="):
        watch_trial({"lr": 0.1}, nn.Linear(2, 1))
