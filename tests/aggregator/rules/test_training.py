"""Rule tables for Overfit, Overtraining and WeightUpdateRatio: report sequences in, alert transitions out
(no Redis)."""

from __future__ import annotations

import math

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.state import State
from gradwatch.v1 import report_pb2, run_pb2

F, R = "firing", "resolved"
T0 = 1_700_000_000.0
LAYERS = ("embed", "fc1", "fc2", "head")
EVAL = report_pb2.PHASE_EVAL


def report(step: int, loss: float | None, phase: int = report_pb2.PHASE_TRAIN, lr: float | None = 1e-3,
           rank: int = 0) -> report_pb2.StepReport:
    r = report_pb2.StepReport(run_id="demo", rank=rank, step=step, phase=phase)
    if lr is not None:
        r.learning_rates.append(lr)
    r.capture_time.FromNanoseconds(int((T0 + step * 0.1) * 1e9))
    if loss is not None:
        r.loss = loss
    return r


def jitter(s: int, i: int = 0) -> float:
    """Deterministic noise in [-1, 1]."""
    return math.sin(1.7 * s + 2.3 * i) * math.cos(0.3 * s + i)


def training(steps: int, train, val, every: int = 100, batches: int = 5, noise: float = 0.02):
    """A training report per step, and an evaluation of `batches` eval reports every `every` steps, each
    batch's loss val(s) within +-noise."""
    out = []
    for s in range(steps):
        if s % every == 0:
            out += [report(s, val(s) * (1 + noise * jitter(s, i)), EVAL) for i in range(batches)]
        out.append(report(s, train(s)))
    return out


def falling(s: int) -> float:
    """A training loss falling from 2 to 0.5, with per-batch noise."""
    return 0.5 + 1.5 * math.exp(-s / 800) + 0.05 * jitter(s)


def gap_from(step: int, growth: float = 1e-3, base: float = 1.03):
    """Validation loss base x training loss until `step`, then the gap widens by `growth` per step."""
    return lambda s: (0.5 + 1.5 * math.exp(-s / 800)) * (base + growth * max(0, s - step))


OVERFIT = [
    pytest.param(falling, gap_from(1000), {}, [(1300, F)], id="the gap opens from step 1000"),
    pytest.param(falling, lambda s: gap_from(1000)(s) if s < 1800 else falling(s), {}, [(1300, F), (1900, R)],
                 id="closes again after 2 good evaluations"),
    pytest.param(falling, gap_from(10**9), {}, [], id="validation 3 % above training (pretraining)"),
    pytest.param(falling, lambda s: 0.8 * falling(s), {}, [], id="validation below training: dropout"),
    pytest.param(falling, lambda s: gap_from(10**9)(s) * (1.4 if s == 1200 else 1), {}, [],
                 id="one noisy evaluation above 10 %"),
    pytest.param(falling, lambda s: gap_from(10**9)(s) * (1.4 if s in (1200, 1400) else 1), {}, [],
                 id="two bad evaluations, not consecutive"),
    pytest.param(lambda s: -1.0 - s / 1000, lambda s: -0.5, {}, [], id="negative loss: no ratio"),
    pytest.param(falling, gap_from(1000), {"every": 1000}, [], id="evaluations too rare to reach patience"),
]


@pytest.mark.parametrize(("train", "val", "kwargs", "expected"), OVERFIT)
def test_overfit(train, val, kwargs, expected, feed):
    alerts = feed(training(2200, train, val, **kwargs), "Overfit")
    assert [(a.step, a.status) for a in alerts] == expected


def test_the_end_of_run_marker_completes_the_last_evaluation(feed):
    """Evaluations at 1200, 1500 and, after the last training step, 1800: then the watcher closes."""
    reports = training(1801, falling, gap_from(1000), every=300)[:-1]
    assert feed(reports, "Overfit") == []
    final = report_pb2.StepReport(run_id="demo", rank=0, step=1800, final=True)
    assert [(a.step, a.status) for a in feed(reports + [final], "Overfit")] == [(1800, F)]


def test_overfit_is_not_judged_before_train_window_losses(feed):
    """An evaluation before training (step 0) and one after 10 training reports are not judged."""
    reports = [report(0, 5.0, EVAL)] + [report(s, 1.0) for s in range(10)] + [report(10, 5.0, EVAL)] * 3
    assert feed(reports + [report(11, 1.0)], "Overfit") == []


def test_overfit_alert_fields(feed):
    (a, *_) = feed(training(2200, lambda s: 1.0, lambda s: 1.0 if s < 1000 else 1.5), "Overfit")
    assert (a.step, a.layer, a.tensor, a.threshold, a.severity) == (1200, "(loss)", "eval_loss", 0.1, "warning")
    assert a.value == pytest.approx(0.5, abs=0.02)
    assert a.summary.startswith("Overfitting: validation loss 1.5 at step 1200 is 5")
    assert "above the training loss 1 (mean of the last 20 training reports), more than 10.0 % in 3 consecutive " \
           "evaluations (run demo, rank 0)" in a.summary


def plateau(at: int, rise: float = 0.0):
    """Validation loss falling until step `at`, then flat (or rising by `rise` per step)."""
    return lambda s: 1 + math.exp(-min(s, at) / 500) + rise * max(0, s - at)


def flat_after(step: int):
    return lambda s: falling(min(s, step))


OVERTRAINING = [
    pytest.param(falling, plateau(1000), 3000, [(2000, F)], id="flat from step 1000: 10 evaluations"),
    pytest.param(falling, plateau(1000, rise=2e-4), 3000, [(2000, F)], id="rising from step 1000"),
    pytest.param(falling, lambda s: plateau(1000)(s) - (0.3 if s >= 2400 else 0), 3000, [(2000, F), (2500, R)],
                 id="a new best resolves it"),
    pytest.param(falling, lambda s: 2.0 * (1 - 0.004 * s / 100), 3000, [],
                 id="slow steady improvement: 0.4 % per evaluation"),
    pytest.param(falling, lambda s: plateau(10**9)(s) * (1 + 0.002 * jitter(s // 100)), 3000, [],
                 id="improving with evaluation noise"),
    pytest.param(falling, plateau(1000), 1900, [], id="nine evaluations without improvement"),
    pytest.param(flat_after(900), plateau(1000), 3000, [], id="converged: the training loss is flat too"),
]


@pytest.mark.parametrize(("train", "val", "steps", "expected"), OVERTRAINING)
def test_overtraining(train, val, steps, expected, feed):
    alerts = feed(training(steps, train, val, batches=1, noise=0.0), "Overtraining")
    assert [(a.step, a.status) for a in alerts] == expected


def test_overtraining_restart_from_a_checkpoint_starts_over(feed):
    flat = training(2000, falling, lambda s: 1.5, batches=1)
    again = [r for r in training(2000, falling, lambda s: 1.5, batches=1) if r.step >= 1200]
    assert feed(flat[: len(flat) // 2] + again, "Overtraining") == []


def test_overtraining_alert_fields(feed):
    (a,) = feed(training(2100, falling, plateau(1000), batches=1, noise=0.0), "Overtraining")
    assert (a.step, a.layer, a.tensor, a.value, a.threshold) == (2000, "(loss)", "eval_loss", 10, 10)
    assert a.summary.startswith("Overtraining: the validation loss has not improved by more than 0.1 % on its best, "
                                "1.1 at step 1000, in 10 evaluations up to step 2000 (now 1.1) while the training "
                                "loss fell from 0.94 to 0.63; stop, or keep the best checkpoint (run demo, rank 0)")


def test_each_rank_evaluates_on_its_own(feed):
    """Interleaved eval reports of two ranks at the same step are two evaluations, not one."""
    reports = []
    for s in range(0, 2200):
        if s % 100 == 0:
            reports += [report(s, gap_from(1000)(s), EVAL, rank=0), report(s, 0.9 * falling(s), EVAL, rank=1)]
        reports += [report(s, falling(s), rank=0), report(s, falling(s), rank=1)]
    assert [(a.step, a.rank) for a in feed(reports, "Overfit")] == [(1300, 0)]


# WeightUpdateRatio: each layer has a weight and its update (same name, kind UPDATE).

def registration(inputs: tuple[str, ...] = ()) -> run_pb2.RunRegistration:
    reg = run_pb2.RunRegistration(run_id="demo", rank=0, world_size=1)
    for order, layer in enumerate(LAYERS):
        reg.tensors.add(id=10 * order + 1, name=f"{layer}.weight", kind=run_pb2.TENSOR_KIND_PARAMETER,
                        module_path=layer, order=order, shape=[16, 16])
        reg.tensors.add(id=10 * order + 5, name=f"{layer}.weight", kind=run_pb2.TENSOR_KIND_UPDATE,
                        module_path=layer, order=order, shape=[16, 16])
    return reg


def stepping(steps: int, ratio, lr=lambda s: 1e-3, nan=lambda s: False, updates: bool = True):
    """ratio(step, layer): ||update|| / ||weight|| (None: no update tensor); weights of norm 4."""
    out = []
    for s in range(steps):
        r = report(s, 1.0, lr=lr(s))
        for i, layer in enumerate(LAYERS):
            x = ratio(s, layer)
            r.tensors.add(tensor_id=10 * i + 1, count=256, sum_squares=16.0, min=-1, max=1)
            if updates and x is not None:
                r.tensors.add(tensor_id=10 * i + 5, count=256, sum_squares=16.0 * x * x, min=-x, max=x,
                              nan_count=3 if nan(s) else 0)
        out.append(r)
    return out


def healthy(s, layer):
    return 1e-3 * (1 + 0.3 * jitter(s, LAYERS.index(layer)))


def only(layer: str, steps, x: float):
    inside = steps if callable(steps) else (lambda s: s in steps)
    return lambda s, lay: x if lay == layer and inside(s) else healthy(s, lay)


def warmup(s: int) -> float:
    """Linear warm-up from 0 over 2000 steps to 1e-6 (an RLHF-sized peak)."""
    return 1e-6 * min(1.0, s / 2000)


def cosine_to_zero(s: int, n: int = 300) -> float:
    return 1e-3 * 0.5 * (1 + math.cos(math.pi * min(s, n) / n))


UPDATE_RATIO = [
    pytest.param(only("fc1", range(20, 100), 25.0), {}, [(22, F, "fc1")], id="updates 25x the weights"),
    pytest.param(only("fc1", range(20, 40), 25.0), {}, [(22, F, "fc1"), (44, R, "fc1")], id="then healthy again"),
    pytest.param(lambda s, lay: 1e-10, {"lr": lambda s: 1e-10}, [(2, F, "embed")],
                 id="a learning rate set 1e7x too small"),
    pytest.param(lambda s, lay: 1e-10 if lay == "fc2" and s >= 20 else healthy(s, lay), {},
                 [(22, F, "fc2")], id="SGD with vanishing gradients: tiny updates of one layer"),
    pytest.param(lambda s, lay: 50.0 if lay == "fc2" else (20.0 if lay == "fc1" else healthy(s, lay)), {},
                 [(2, F, "fc2")], id="the farthest outside is named"),
    pytest.param(healthy, {}, [], id="healthy: about 1e-3"),
    pytest.param(lambda s, lay: warmup(s), {"lr": warmup}, [],
                 id="Adam, weights of RMS 1: ratios below 1e-8 for 20 steps while lr rises"),
    pytest.param(lambda s, lay: 1e-2 * cosine_to_zero(s), {"lr": cosine_to_zero, "steps": 301}, [],
                 id="SGD, cosine decay to zero: below 1e-8 in the last steps"),
    pytest.param(lambda s, lay: 1e-3 if s >= 10 else 0.0, {"lr": lambda s: 1e-3 if s >= 10 else 0.0}, [],
                 id="learning rate 0 for the first steps"),
    pytest.param(lambda s, lay: 0.0 if s < 8 else healthy(s, lay), {"nan": lambda s: s < 8}, [],
                 id="AMP loss scaler skips the first steps"),
    pytest.param(lambda s, lay: 0.0 if lay == "embed" else healthy(s, lay), {}, [],
                 id="a frozen layer: exactly zero is UnchangedTensor's"),
    pytest.param(only("head", {0}, 1e3), {}, [], id="LayerScale 1e-6 at init: one report 1000x"),
    pytest.param(only("fc1", range(20, 100), 25.0), {"updates": False}, [], id="updates not captured"),
]


@pytest.mark.parametrize(("ratio", "kwargs", "expected"), UPDATE_RATIO)
def test_weight_update_ratio(ratio, kwargs, expected, feed):
    alerts = feed(stepping(kwargs.pop("steps", 60), ratio, **kwargs), "WeightUpdateRatio", registration())
    assert [(a.step, a.status, a.layer) for a in alerts] == expected


def test_zero_initialised_weights_have_no_ratio(feed):
    reports = stepping(10, healthy)
    for r in reports[:3]:
        r.tensors[0].sum_squares = 0.0  # embed.weight all zero: the update is infinitely larger
    assert feed(reports, "WeightUpdateRatio", registration()) == []


def test_weight_update_ratio_alert_fields(feed):
    (a,) = feed(stepping(10, only("fc1", range(0, 10), 25.0)), "WeightUpdateRatio", registration())
    assert (a.step, a.layer, a.tensor, a.value, a.threshold) == (2, "fc1", "", pytest.approx(25.0), 10.0)
    assert a.summary == ("Updates of layer fc1 are 25.0x its weights (||update|| / ||weight|| above 10) in 3 "
                         "consecutive reports up to step 2 at learning rate 0.001 (run demo, rank 0)")


def test_forget_drops_every_run_state():
    config = AggregatorConfig(keep_firing_s=0)
    state, engine = State(config, Counters()), RuleEngine(config)
    state.register("demo", registration())
    reports = training(1400, falling, gap_from(1000)) + [report(1400, 1.5, EVAL)]
    reports += [r for r in stepping(1460, only("fc1", range(1400, 1500), 25.0)) if r.step >= 1401]
    for seq, r in enumerate(reports, 1):
        r.sequence = seq
        engine.evaluate(state.apply("demo", r))
    rules = {r.name: r for r in engine.rules}
    overfit, overtraining, ratio = rules["Overfit"], rules["Overtraining"], rules["WeightUpdateRatio"]
    assert overfit.train and overtraining.best and ratio.lrs and overfit.incidents.open and ratio.incidents.open
    engine.forget("demo")
    assert not (overfit.train or overfit.streak or overfit.evaluations.pending or overtraining.best
                or overtraining.train or overtraining.evaluations.pending or ratio.lrs or ratio.streaks.runs)
    assert engine.firing() == []
