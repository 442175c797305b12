"""Rule tables for ClassImbalance, InputDataDrift and UnnormalizedInput: report sequences in, alert
transitions out (no Redis)."""

from __future__ import annotations

import math
import random

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.rules.catalogue import RuleEngine
from gradwatch.aggregator.state import State
from gradwatch.v1 import report_pb2, run_pb2
from tests.aggregator.rules.test_tensors import rounded_constant

F, R = "firing", "resolved"
T0 = 1_700_000_000.0
EVAL = report_pb2.PHASE_EVAL


def report(step: int, phase: int = report_pb2.PHASE_TRAIN, **scalars: float) -> report_pb2.StepReport:
    r = report_pb2.StepReport(run_id="demo", rank=0, step=step, phase=phase, loss=1.0, learning_rates=[1e-3])
    r.capture_time.FromNanoseconds(int((T0 + step * 0.1) * 1e9))
    for k, v in scalars.items():
        r.scalars[k] = v
    return r


def labelled(steps: int, weights, batch: int = 64, seed: int = 0, phase=lambda s: report_pb2.PHASE_TRAIN):
    """Reports whose batches draw `batch` labels with weights(step) -> {class id: weight}; like the agent,
    every id up to the highest seen so far is sent, absent ones as 0."""
    rng = random.Random(seed)
    out, highest = [], -1
    for s in range(steps):
        w = weights(s)
        classes = list(w)
        counts: dict[str, int] = {}
        for c in rng.choices(classes, weights=[w[c] for c in classes], k=batch):
            counts[c] = counts.get(c, 0) + 1
        highest = max(highest, *(int(c) for c in counts)) if all(c.isdigit() for c in counts) else highest
        r = report(s, phase(s), accuracy=0.5)
        for c in range(highest + 1):
            r.scalars[f"labels/{c}"] = 0.0
        for c, n in counts.items():
            r.scalars[f"labels/{c}"] = n
        out.append(r)
    return out


def balanced(n: int):
    return lambda s: {str(c): 1.0 for c in range(n)}


def without(n: int, gone: str, after: int):
    return lambda s: {str(c): 1.0 for c in range(n) if s < after or str(c) != gone}


CLASS_IMBALANCE = [
    pytest.param(lambda s: {"0": 20.0, "1": 1.0}, 100, {}, [(7, F)], id="1:20, fires once 500 labels are counted"),
    pytest.param(lambda s: {"0": 20.0, "1": 1.0} if s < 100 else {"0": 1.0, "1": 1.0}, 300, {}, [(7, F), (113, R)],
                 id="the sampler is fixed: resolves once the window is back under 10x"),
    pytest.param(without(10, "7", 200), 400, {}, [(289, F)], id="class 7 stops coming: fires as it dwindles"),
    pytest.param(balanced(10), 400, {}, [], id="10 balanced classes"),
    pytest.param(balanced(1000), 150, {"batch": 256}, [], id="1000 balanced classes: the chance ratio stays under 10"),
    pytest.param(lambda s: {"0": 6.0, "1": 4.0}, 200, {}, [], id="60/40"),
    pytest.param(lambda s: {"1": 1.0, "2": 1.0, "5": 1.0}, 200, {}, [], id="ids with gaps: 0, 3 and 4 never used"),
    pytest.param(lambda s: {str(s // 10 % 10): 1.0}, 200, {"phase": lambda s: EVAL}, [],
                 id="a validation loader ordered by class is not read"),
    pytest.param(lambda s: {"0": 20.0, "1": 1.0}, 7, {}, [], id="fewer than 500 labels"),
]


@pytest.mark.parametrize(("weights", "steps", "kwargs", "expected"), CLASS_IMBALANCE)
def test_class_imbalance(weights, steps, kwargs, expected, feed):
    assert [(a.step, a.status) for a in feed(labelled(steps, weights, **kwargs), "ClassImbalance")] == expected


def test_reports_without_labels_are_no_evidence(feed):
    reports = labelled(100, lambda s: {"0": 20.0, "1": 1.0})
    quiet = [report(100 + s, accuracy=0.9) for s in range(50)]
    assert [a.status for a in feed(reports + quiet, "ClassImbalance")] == [F]


def test_class_imbalance_alert_fields(feed):
    a, *_ = feed(labelled(20, lambda s: {"cat": 20.0, "dog": 1.0}), "ClassImbalance")
    assert (a.layer, a.tensor, a.threshold, a.severity) == ("(data)", "labels/dog", 10.0, "warning")
    assert a.summary.startswith("Class imbalance: class cat has ")
    assert "x the labels of class dog" in a.summary and "(run demo, rank 0)" in a.summary


def test_a_class_gone_from_a_short_window_is_missing(tmp_path, feed):
    path = tmp_path / "rules.toml"
    path.write_text("[ClassImbalance]\nwindow = 5\n")
    (a,) = feed(labelled(30, without(10, "7", 10), batch=640), "ClassImbalance",
              config=AggregatorConfig(keep_firing_s=0, rules=str(path)))
    assert (a.step, a.tensor, a.value) == (14, "labels/7", math.inf)
    assert a.summary.startswith("Class 7 is missing from the last 3200 training labels (5 reports) although it was "
                                "seen earlier in the run; class ")


# Inputs: `inputs.x` (an image batch) and its three channels, `inputs.input_ids` (token ids), `inputs.1` (the
# labels of an (x, y) batch), `inputs.hwc` (NHWC float images: more than 64 "channels", so none are sent).
INPUTS = ("inputs.x", "inputs.x[0]", "inputs.x[1]", "inputs.x[2]", "inputs.input_ids", "inputs.1", "inputs.hwc")


def registration() -> run_pb2.RunRegistration:
    reg = run_pb2.RunRegistration(run_id="demo", rank=0, world_size=1)
    for i, name in enumerate(INPUTS):
        reg.tensors.add(id=100 + i, name=name, kind=run_pb2.TENSOR_KIND_INPUT, module_path="(inputs)", order=0)
    return reg


def summary(n: int, mean: float, std: float, lo: float, hi: float) -> dict:
    return dict(count=n, sum=n * mean, sum_squares=n * (std * std + mean * mean), min=lo, max=hi)


def normalised(s: int, name: str) -> dict | None:
    """ImageNet-normalised pixels of a shuffled dataset: each batch's mean and std move a little."""
    if not name.startswith("inputs.x"):
        return None
    n = 64 * 224 * 224 * (3 if name == "inputs.x" else 1)
    return summary(n, 0.05 * math.sin(1.3 * s), 1.0 + 0.05 * math.cos(0.7 * s), -2.1, 2.6)


def raw(s: int, name: str) -> dict | None:
    """Raw 8-bit pixels as floats."""
    n = 64 * 224 * 224 * (3 if name == "inputs.x" else 1)
    return summary(n, 115 + 3 * math.sin(s), 70.0, 0.0, 255.0) if name.startswith("inputs.x") else None


def tokens(s: int, name: str) -> dict | None:
    """Character-level token ids (vocabulary 65) and CIFAR labels of the batch (0..9), beside normalised
    images."""
    if name == "inputs.input_ids":
        return summary(64 * 256, 40.0, 12.0, 0.0, 64.0)
    return summary(64, 4.5, 2.9, 0.0, 9.0) if name == "inputs.1" else normalised(s, name)


def hwc(s: int, name: str) -> dict | None:
    """Raw pixels in an NHWC float tensor: no per-channel summaries, so its dtype is unknown."""
    return summary(64 * 224 * 224 * 3, 115.0, 70.0, 0.0, 255.0) if name == "inputs.hwc" else normalised(s, name)


def feeding(steps: int, stats, phase=lambda s: report_pb2.PHASE_TRAIN) -> list:
    """stats(step, name) -> summary fields of that input (None: not in the report)."""
    out = []
    for s in range(steps):
        r = report(s, phase(s))
        for i, name in enumerate(INPUTS):
            fields = stats(s, name)
            if fields is not None:
                r.tensors.add(tensor_id=100 + i, **fields)
        out.append(r)
    return out


def from_step(step: int, then, before=normalised):
    return lambda s, name: then(s, name) if s >= step else before(s, name)


def twice(s: int, name: str) -> dict | None:
    """Normalisation applied twice: ((x - 0.45) / 0.225 - 0.45) / 0.225."""
    fields = normalised(s, name)
    if fields is None:
        return None
    n = fields["count"]
    return summary(n, -2.0, 4.4, -11.3, 9.6)


def shifted(s: int, name: str) -> dict | None:
    """Two stds darker, same spread."""
    fields = normalised(s, name)
    return None if fields is None else summary(fields["count"], -2.0, 1.0, -4.1, 0.6)


def mixup(s: int, name: str) -> dict | None:
    fields = normalised(s, name)
    return None if fields is None else summary(fields["count"], 0.0, 0.75, -2.1, 2.6)


def resized(s: int, name: str) -> dict | None:
    """Progressive resizing: 128 x 128 images, same statistics."""
    fields = normalised(s, name)
    return None if fields is None else dict(fields, count=fields["count"] // 3,
                                            sum=fields["sum"] / 3, sum_squares=fields["sum_squares"] / 3)


def blank(s: int, name: str) -> dict | None:
    fields = normalised(s, name)
    return None if fields is None else dict(count=fields["count"], zero_count=fields["count"], min=0.0, max=0.0)


def shrinking_constant(s: int, name: str) -> dict | None:
    """A constant input whose batches shrink from 1e6 to 1e5 elements at step 100: its float64 sums round
    differently, a "std" of 2.6e-4 in the reference and 8.6e-5 after, a ratio of 0.34 made of rounding."""
    if name != "inputs.input_ids":
        return normalised(s, name)
    return rounded_constant(123.456, 10**6 if s < 100 else 10**5)


def mask(s: int, name: str) -> dict | None:
    """A padding mask, all ones while the reference is taken, then with some padding."""
    if name != "inputs.input_ids":
        return normalised(s, name)
    return summary(64 * 256, 1.0 if s < 50 else 0.9, 0.0 if s < 50 else 0.3, 0.0 if s >= 50 else 1.0, 1.0)


DRIFT = [
    pytest.param(from_step(100, twice), {}, [(102, F, "inputs.x")], id="normalisation applied twice"),
    pytest.param(from_step(100, blank), {}, [(115, F, "inputs.x")], id="the loader returns blank images"),
    pytest.param(lambda s, n: twice(s, n) if 100 <= s < 130 else normalised(s, n), {},
                 [(102, F, "inputs.x"), (151, R, "inputs.x")], id="drifts, then comes back"),
    pytest.param(normalised, {"steps": 300}, [], id="a shuffled dataset: batch-to-batch noise"),
    pytest.param(from_step(100, mixup), {}, [], id="mixup from step 100: std 0.75x"),
    pytest.param(from_step(100, resized), {}, [], id="progressive resizing"),
    pytest.param(mask, {}, [], id="a constant input in the reference is not followed"),
    pytest.param(shrinking_constant, {}, [], id="a constant input with rounded sums is not followed either"),
    pytest.param(from_step(100, twice), {"phase": lambda s: EVAL if s >= 100 else report_pb2.PHASE_TRAIN}, [],
                 id="evaluation inputs (no augmentation) are not read"),
]


@pytest.mark.parametrize(("stats", "kwargs", "expected"), DRIFT)
def test_input_data_drift(stats, kwargs, expected, feed):
    alerts = feed(feeding(kwargs.pop("steps", 200), stats, **kwargs), "InputDataDrift", registration())
    assert [(a.step, a.status, a.tensor) for a in alerts] == expected


def test_input_drift_alert_fields(feed):
    a, *_ = feed(feeding(200, from_step(100, twice)), "InputDataDrift", registration())
    assert (a.layer, a.tensor, a.threshold, a.severity) == ("(inputs)", "inputs.x", 2.0, "warning")
    assert a.value == pytest.approx(2.06, abs=0.03)
    assert a.summary.startswith("Input inputs.x drifted from its reference (the first 50 training reports): over the "
                                "last 20 reports up to step 102 its std 2.1 is 2.1x the reference std 1 (limits 0.5x "
                                "to 2.0x); 3 more inputs too (run demo, rank 0)")
    later, *_ = feed(feeding(200, from_step(100, shifted)), "InputDataDrift", registration())
    assert (later.step, later.threshold) == (110, 1.0) and later.value == pytest.approx(1.1, abs=0.01)
    assert "its mean -1.1 is 1.1 reference stds from the reference mean 0.00061 (limit 1)" in later.summary


UNNORMALIZED = [
    pytest.param(raw, {}, [(2, F, "inputs.x")], id="raw 0..255 pixels"),
    pytest.param(lambda s, n: raw(s, n) if s < 20 else normalised(s, n), {}, [(2, F, "inputs.x"), (24, R, "inputs.x")],
                 id="fixed after a restart with normalisation"),
    pytest.param(lambda s, n: raw(s, n) if s % 10 == 5 else normalised(s, n), {"eval": lambda s: s % 10 == 5},
                 [(25, F, "inputs.x")], id="the validation loader forgot the transform"),
    pytest.param(normalised, {}, [], id="standardised: negative values"),
    pytest.param(lambda s, n: None if n == "inputs.input_ids" else summary(1000, 0.45, 0.25, 0.0, 1.0), {}, [],
                 id="ToTensor: [0, 1]"),
    pytest.param(tokens, {}, [], id="token ids of a 65-character vocabulary, labels in the batch: integers"),
    pytest.param(hwc, {}, [], id="NHWC images: no channels, not judged"),
    pytest.param(lambda s, n: raw(s, n) if s < 2 else normalised(s, n), {}, [], id="two odd reports"),
]


@pytest.mark.parametrize(("stats", "kwargs", "expected"), UNNORMALIZED)
def test_unnormalized_input(stats, kwargs, expected, feed):
    is_eval = kwargs.get("eval", lambda s: False)
    reports = feeding(60, stats, lambda s: EVAL if is_eval(s) else report_pb2.PHASE_TRAIN)
    alerts = feed(reports, "UnnormalizedInput", registration())
    assert [(a.step, a.status, a.tensor) for a in alerts] == expected


def test_unnormalized_alert_fields(feed):
    a, *_ = feed(feeding(5, raw), "UnnormalizedInput", registration())
    assert (a.layer, a.tensor, a.threshold, a.severity) == ("(inputs)", "inputs.x", 1.0, "warning")
    assert a.value == pytest.approx(115 + 3 * math.sin(2))
    assert a.summary.startswith("Input inputs.x looks unnormalised in training: values within [0, 255] with mean "
                                "118 in 3 consecutive reports up to step 2, as raw 8-bit pixels are")
    assert "3 more inputs too" in a.summary


def test_forget_drops_every_run_state():
    config = AggregatorConfig(keep_firing_s=0)
    state, engine = State(config, Counters()), RuleEngine(config)
    state.register("demo", registration())
    reports = feeding(120, from_step(100, twice)) + feeding(5, raw, lambda s: EVAL)
    reports += labelled(20, lambda s: {"0": 20.0, "1": 1.0})
    for seq, r in enumerate(reports, 1):
        r.sequence = seq
        engine.evaluate(state.apply("demo", r))
    rules = {r.name: r for r in engine.rules}
    assert rules["ClassImbalance"].runs and rules["InputDataDrift"].runs and rules["UnnormalizedInput"].phase
    engine.forget("demo")
    assert not rules["ClassImbalance"].runs and not rules["InputDataDrift"].runs
    assert not rules["UnnormalizedInput"].phase and not any(s.runs for s in rules["UnnormalizedInput"].streaks.values())
    assert engine.firing() == []
