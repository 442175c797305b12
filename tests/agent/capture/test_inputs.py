"""Input batches and labels: per-channel statistics and sums of cubes against float64 references (NaN,
Inf, denormals), names and keys, micro-batch merges, the schedule, and class counts between reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.agent.capture.inputs import channels_of, flatten, label_scalars
from gradwatch.agent.capture.slots import TensorSlot
from gradwatch.agent.export.encode import step_report
from gradwatch.agent.stats.layout import COL_CUBE
from gradwatch.agent.stats.summarize import Summarizer
from gradwatch.stats import Stats
from gradwatch.v1 import run_pb2
from tests.agent.capture.test_updates import assert_matches, dictionary
from tests.agent.stats.test_summarize import nasty, to_stats

X, Y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)


@pytest.mark.parametrize(("batch", "keys"), [
    (X, ["0"]),
    ((X, Y), ["0", "1"]),
    ([X, "a caption", 3], ["0"]),  # non-tensors are skipped
    ({"pixel_values": X, "labels": Y}, ["pixel_values", "labels"]),
    ({"a": (X, {"b": Y})}, ["a.0", "a.1.b"]),
    ("text", []),
])
def test_flatten_names_the_tensors_of_a_batch(batch, keys):
    assert [k for k, _ in flatten(batch)] == keys


@pytest.mark.parametrize(("tensor", "channels"), [
    (torch.zeros(4, 3, 8, 8), 3),              # NCHW images: dim 1
    (torch.zeros(4, 2, 100), 2),               # NCL signals
    (torch.zeros(4, 10), 10),                  # 2-D features: the last dim
    (torch.zeros(4, 64, dtype=torch.float64), 64),
    (torch.zeros(4, 65), 0),                   # over the cap: whole-tensor statistics only
    (torch.zeros(4, 100, 3), 0),
    (torch.zeros(4, 10, dtype=torch.long), 0),  # token ids
    (torch.zeros(4, 10, dtype=torch.bool), 0),  # masks
    (torch.zeros(4), 0),
])
def test_which_tensors_get_per_channel_statistics(tensor, channels):
    assert channels_of(tensor, 64) == channels


def channel_reference(x: torch.Tensor) -> list[np.ndarray]:
    """Each channel's values (dim 1), as float64 numpy arrays."""
    return [x.select(1, c).double().numpy() for c in range(x.shape[1])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, 3, 7, 5), (40, 5), (9, 2, 11)])
@pytest.mark.parametrize("chunk", [1 << 22, 50])
def test_channel_statistics_match_float64_reference(dtype, shape, chunk):
    n = int(np.prod(shape))
    x = nasty(n, seed=4).reshape(shape).to(dtype)  # NaN, +-Inf, zeros, denormals, magnitudes over 40 octaves
    channels = shape[1]
    s = Summarizer(1 + channels, torch.device("cpu"), True, chunk)
    s.summarize_channels(0, 1, x)
    stats = to_stats(s.buffer.numpy(), [x] + [x.select(1, c) for c in range(channels)])
    assert_matches(stats[0], x.double().numpy())
    for got, values in zip(stats[1:], channel_reference(x), strict=True):
        assert_matches(got, values)


def test_accumulate_merges_into_the_rows():
    a, b = nasty(60, seed=5).reshape(4, 3, 5), nasty(30, seed=6).reshape(2, 3, 5)
    s = Summarizer(4, torch.device("cpu"), True, 1 << 22)
    s.summarize_channels(0, 1, a, cubes=True)
    s.summarize_channels(0, 1, b, accumulate=True, cubes=True)
    both = torch.cat([a, b])
    stats = to_stats(s.buffer.numpy(), [both] + [both.select(1, c) for c in range(3)])
    assert_matches(stats[0], both.double().numpy())
    for got, values in zip(stats[1:], channel_reference(both), strict=True):
        assert_matches(got, values)
    assert sum_cubes(s.buffer.numpy(), [both] + [both.select(1, c) for c in range(3)]) == pytest.approx(
        [cubes_reference(both.double().numpy())] + [cubes_reference(v) for v in channel_reference(both)], rel=1e-12)


def cubes_reference(values: np.ndarray) -> float:
    """Sum of cubes of the finite values, in float64."""
    f = values[np.isfinite(values)].astype(np.float64)
    return float((f * f * f).sum())


def sum_cubes(rows: np.ndarray, tensors, kind: int = run_pb2.TENSOR_KIND_INPUT) -> list[float | None]:
    """The encoded sum_cubes of each row (None where the report leaves it unset)."""
    slots = [TensorSlot(i, f"t{i}", kind, "m", 0, tuple(t.shape), "float32", t.numel()) for i, t in enumerate(tensors)]
    report = step_report("r", 0, 0, 1, 0.0, 1, rows, slots, True, {}, [])
    return [s.sum_cubes if s.HasField("sum_cubes") else None for s in report.tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 22, 50])
def test_sums_of_cubes_match_float64_reference(dtype, chunk):
    x = nasty(6 * 3 * 7, seed=8).reshape(6, 3, 7).to(dtype)  # NaN, +-Inf (never summed), cubes up to 1e115
    flat = nasty(1001, seed=9).to(dtype)
    tokens = torch.randint(-50, 50, (7, 11))
    s = Summarizer(6, torch.device("cpu"), True, chunk)
    s.summarize_channels(0, 1, x, cubes=True)
    s.summarize(4, flat, cubes=True)
    s.summarize(5, tokens, cubes=True)
    tensors = [x] + [x.select(1, c) for c in range(3)] + [flat, tokens]
    expected = [cubes_reference(x.double().numpy())] + [cubes_reference(v) for v in channel_reference(x)] + [
        cubes_reference(flat.double().numpy()), cubes_reference(tokens.double().numpy())]
    assert sum_cubes(s.buffer.numpy(), tensors) == pytest.approx(expected, rel=1e-12)
    assert all(np.isfinite(expected))


def test_rows_without_cubes_hold_zero_and_other_kinds_send_none():
    x = nasty(4 * 3 * 5, seed=10).reshape(4, 3, 5)
    s = Summarizer(5, torch.device("cpu"), True, 1 << 22)
    s.summarize_channels(0, 1, x)
    s.summarize(4, x)
    assert not s.buffer[:, COL_CUBE].any()
    s.summarize(4, x, cubes=True)
    rows = s.buffer.numpy()
    for kind in (run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_GRADIENT, run_pb2.TENSOR_KIND_ACTIVATION):
        assert sum_cubes(rows, [x] * 5, kind) == [None] * 5
    assert sum_cubes(rows, [x] * 5)[4] == pytest.approx(cubes_reference(x.numpy()), rel=1e-12)


def inputs_of(report, names) -> dict[str, Stats]:
    return {names[s.tensor_id].name: Stats.from_proto(s) for s in report.tensors
            if names[s.tensor_id].kind == run_pb2.TENSOR_KIND_INPUT}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 4))


def test_inputs_of_a_dict_batch_with_images_tokens_and_wide_features(ingest):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    w = gradwatch.watch(model, opt, run="inp-1", collector=ingest.target)
    images = nasty(4 * 3 * 36, seed=7).reshape(4, 3, 6, 6)
    tokens = torch.randint(0, 50, (4, 9))
    wide = torch.randn(4, 100)
    w.observe_inputs({"image": images, "ids": tokens, "wide": wide, "note": "ignored"})
    model(torch.nan_to_num(images, 0.0, 0.0, 0.0)).sum().backward()
    opt.step()
    w.close()
    names = dictionary(ingest)
    info = {t.name: t for t in names.values() if t.kind == run_pb2.TENSOR_KIND_INPUT}
    assert set(info) == {"inputs.image", "inputs.image[0]", "inputs.image[1]", "inputs.image[2]", "inputs.ids",
                         "inputs.wide"}
    assert {(t.module_path, t.order, t.partition) for t in info.values()} == {
        ("(inputs)", 0, run_pb2.PARTITION_PER_RANK)}
    assert list(info["inputs.image"].shape) == [4, 3, 6, 6] and info["inputs.ids"].dtype == "int64"
    got = inputs_of(ingest.reports[0], names)
    assert_matches(got["inputs.image"], images.double().numpy())
    for c, values in enumerate(channel_reference(images)):
        assert_matches(got[f"inputs.image[{c}]"], values)
    assert_matches(got["inputs.ids"], tokens.double().numpy())
    assert_matches(got["inputs.wide"], wide.double().numpy())
    cubes = {names[t.tensor_id].name: t.sum_cubes if t.HasField("sum_cubes") else None
             for t in ingest.reports[0].tensors}
    assert cubes["inputs.image"] == pytest.approx(cubes_reference(images.double().numpy()), rel=1e-12)
    for c, values in enumerate(channel_reference(images)):
        assert cubes[f"inputs.image[{c}]"] == pytest.approx(cubes_reference(values), rel=1e-12)
    assert cubes["inputs.ids"] == pytest.approx(cubes_reference(tokens.double().numpy()), rel=1e-12)
    assert cubes["inputs.wide"] == pytest.approx(cubes_reference(wide.double().numpy()), rel=1e-12)
    others = [t for t in ingest.reports[0].tensors if names[t.tensor_id].kind != run_pb2.TENSOR_KIND_INPUT]
    assert {names[t.tensor_id].kind for t in others} >= {run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_GRADIENT}
    assert not [t for t in others if t.HasField("sum_cubes")]  # parameters and gradients carry no third moment
    assert w.counters.internal_errors == 0


def test_inputs_on_due_steps_only_and_micro_batches_merge(ingest, monkeypatch):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = AgentConfig(collector=ingest.target, every=2, burst_steps=0)
    w = gradwatch.watch(model, opt, run="inp-2", config=cfg)
    calls = []
    original = Summarizer.summarize_channels
    monkeypatch.setattr(Summarizer, "summarize_channels", lambda self, *a, **k: (calls.append(1),
                                                                               original(self, *a, **k)))
    seen = []
    for _ in range(4):
        batches = [torch.randn(2, 3, 6, 6), torch.randn(5, 3, 6, 6)]
        seen.append(torch.cat(batches))
        for x in batches:
            w.observe_inputs(x)
            model(x).sum().backward()
        opt.step()
        opt.zero_grad()
    w.close()
    assert len(calls) == 2 * 2  # two due steps, two micro-batches each
    names = dictionary(ingest)
    assert [r.step for r in ingest.reports] == [0, 2]
    for report, both in zip(ingest.reports, seen[::2], strict=True):
        got = inputs_of(report, names)
        assert got["inputs.0"].count == 7 * 3 * 36 and got["inputs.0[1]"].count == 7 * 36
        assert_matches(got["inputs.0"], both.double().numpy())
        assert_matches(got["inputs.0[2]"], both[:, 2].double().numpy())
        cubes = {names[t.tensor_id].name: t.sum_cubes for t in report.tensors}
        assert cubes["inputs.0"] == pytest.approx(cubes_reference(both.double().numpy()), rel=1e-12)
        assert cubes["inputs.0[2]"] == pytest.approx(cubes_reference(both[:, 2].double().numpy()), rel=1e-12)


def test_labels_count_every_batch_since_the_last_report(ingest):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cfg = AgentConfig(collector=ingest.target, every=3, burst_steps=0, labels_max_classes=5)
    w = gradwatch.watch(model, opt, run="inp-3", config=cfg)
    labels = [torch.tensor([0, 1, 1]), torch.tensor([1, -100, 2]), torch.tensor([7, 2, 9]),  # -100: ignored
              torch.tensor([0, 0, 0]), None, torch.tensor([[1], [1]]), torch.tensor([2])]
    for y in labels:
        w.observe_inputs(torch.randn(3, 3, 6, 6), labels=y)
        model(torch.randn(3, 3, 6, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
    w.close()
    reports = ingest.reports
    assert [r.step for r in reports] == [0, 3, 6]

    def labels_of(r):
        return {k: v for k, v in r.scalars.items() if k.startswith("labels")}

    assert labels_of(reports[0]) == {"labels/0": 1.0, "labels/1": 2.0}
    # Steps 1-3; 7 and 9 are over the 5 classes counted one by one. Classes up to the highest seen so far
    # are all sent, absent ones as 0.
    assert labels_of(reports[1]) == {"labels/0": 3.0, "labels/1": 1.0, "labels/2": 2.0, "labels_overflow": 2.0}
    assert labels_of(reports[2]) == {"labels/0": 0.0, "labels/1": 2.0, "labels/2": 1.0}
    assert w.counters.internal_errors == 0


def test_float_labels_are_not_counted_and_break_nothing(ingest):
    model = make_model()
    w = gradwatch.watch(model, run="inp-4", collector=ingest.target)
    w.observe_inputs(torch.randn(2, 3, 6, 6), labels=torch.tensor([0.5, 1.0]))
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    w.step()
    w.close()
    assert not [k for k in ingest.reports[0].scalars if k.startswith("labels")]
    assert w.counters.internal_errors == 0


def test_label_scalars_table():
    counts = np.array([0, 3, 0, 0, 1, 5.0])  # 5 classes, then overflow
    assert label_scalars(counts, 5, -1) == ({"labels/0": 0.0, "labels/1": 3.0, "labels/2": 0.0, "labels/3": 0.0,
                                             "labels/4": 1.0, "labels_overflow": 5.0}, 4)
    assert label_scalars(np.zeros(6), 5, 2) == ({}, 2)  # no labels since the last report: nothing sent
    assert label_scalars(np.array([0, 1.0, 0, 0, 0, 0]), 5, 3)[0] == {
        "labels/0": 0.0, "labels/1": 1.0, "labels/2": 0.0, "labels/3": 0.0}
