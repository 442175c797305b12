"""The statistics gauges on /metrics (metrics.py _statistics_families): a real torch model trained with Adam under
select="full", through a real agent, collector, Redis and aggregator, exports per layer the optimizer state norms,
the update's RMS, the output gradients' norm and the outputs' std, equal to the API's /optimizer and /tensors
figures of the same step (and to torch's own numbers); a run of the default agent exports none of them; a NaN is
exported as NaN, never 0; top-k and groups apply to them as to every per-layer series."""

from __future__ import annotations

import json
import math
import urllib.request
from collections import OrderedDict, defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.aggregator.http.budget import STATE_KEYS
from gradwatch.aggregator.http.metrics import AggregatorView
from gradwatch.aggregator.http.server import serve
from tests.aggregator.http.test_metrics_budget import NOW, run_view, scrape

torch = pytest.importorskip("torch")  # torch is never a hard dependency

STATE = "gradwatch_layer_optimizer_state_norm"
UPDATE_RMS = "gradwatch_layer_update_rms"
ACTIVATION_GRAD = "gradwatch_layer_activation_grad_norm"
ACTIVATION_STD = "gradwatch_layer_activation_std"
STATISTICS = (STATE, UPDATE_RMS, ACTIVATION_GRAD, ACTIVATION_STD)
LINEAR = ("fc1", "fc2")  # the layers with parameters; "act" has only outputs
STEPS = 6
POISON_STEP = 3


def train(run: str, collector: str, select: str | None, poison_step: int | None = None) -> dict[int, dict]:
    """Adam on a small MLP for STEPS steps, watched with `select`; at `poison_step` a NaN goes into fc2's weight.
    Returns, per step, torch's own figures: each layer's Adam moment norms and update RMS after the step."""
    import gradwatch
    from gradwatch.agent import AgentConfig

    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(8, 16), act=nn.Tanh(), fc2=nn.Linear(16, 4)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # Host slots to spare: every step's report must arrive (the agent skips one rather than block the step).
    config = AgentConfig(collector=collector, select=select or "", host_slots=64)
    truth: dict[int, dict] = {}
    with gradwatch.watch(model, optimizer, run=run, config=config) as watcher:
        for step in range(STEPS):
            if step == poison_step:
                with torch.no_grad():
                    model.fc2.weight[0, 0] = math.nan
            before = {name: p.detach().clone() for name, p in model.named_parameters()}
            loss = model(torch.randn(32, 8)).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            watcher.step(loss=loss)
            truth[step] = _figures(model, optimizer, before)
        assert watcher.flush(20)
    return truth


def _figures(model, optimizer, before: dict) -> dict:
    out: dict = {}
    for layer in LINEAR:
        params = [(f"{layer}.{n}", p) for n, p in getattr(model, layer).named_parameters()]
        for key in ("exp_avg", "exp_avg_sq"):
            states = [optimizer.state[p][key].double() for _, p in params]
            out[(layer, key)] = math.sqrt(sum(float(v.square().sum()) for v in states))
        delta = [(p.detach().double() - before[name].double()) for name, p in params]
        out[(layer, "update_rms")] = math.sqrt(sum(float(d.square().sum()) for d in delta)
                                               / sum(d.numel() for d in delta))
    return out


@pytest.fixture
def served(make_aggregator, run_all):
    """served() -> base URL of a fresh aggregator that read what was published, /metrics and the API on loopback."""
    started = []

    def start() -> str:
        agg = make_aggregator()
        run_all(agg)
        server, thread = serve("127.0.0.1", 0, agg.registry, agg.view, live_tick_s=None)
        started.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(5)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def api(base: str, path: str) -> dict:
    return json.loads(fetch(base + path))["data"]


def gauges(text: str, run: str) -> dict[str, dict[tuple, float]]:
    """family -> {(layer, state or ""): value} of `run`, parsed from the exposition Prometheus reads."""
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in STATISTICS and s.labels["run"] == run:
                out[s.name][(s.labels["layer"], s.labels.get("state", ""))] = s.value
    return out


def line(text: str, name: str, **labels: str) -> str:
    """The exposition's one line of the series `name{labels}`, as written (whatever the label order)."""
    (found,) = [row for row in text.splitlines() if row.startswith(name + "{")
                and sorted(row[len(name) + 1:row.rindex("}")].split(",")) == sorted(f'{k}="{v}"' for k, v in
                                                                                     labels.items())]
    return found


def number(x) -> float:
    return float(x)  # "NaN", "+Inf" as the API spells them


def same(got: float, want: float, rel: float = 1e-12) -> bool:
    """Equal, NaN equal to NaN only (never to 0)."""
    return math.isnan(want) and math.isnan(got) or got == pytest.approx(want, rel=rel, abs=0)


def api_figures(base: str, run: str) -> tuple[int, dict[tuple, float]]:
    """The API's figures of the run's latest step, put together per layer as one tensor (norms: root of summed
    squares; RMS: root of the summed squares over the summed counts)."""
    opt = api(base, f"/api/v1/runs/{run}/optimizer")
    assert opt["updates"] is True
    squares: dict[tuple, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for row in opt["parameters"]:
        for key, state in row["states"].items():
            squares[(STATE, row["layer"], key)] += number(state["norm"]) ** 2
        squares[(UPDATE_RMS, row["layer"], "")] += number(row["update"]["norm"]) ** 2
        counts[row["layer"]] += row["update"]["count"]
    want = {(family, layer, key): math.sqrt(sq) for (family, layer, key), sq in squares.items()}
    for layer, n in counts.items():
        want[(UPDATE_RMS, layer, "")] = math.sqrt(squares[(UPDATE_RMS, layer, "")] / n)
    tensors = api(base, f"/api/v1/runs/{run}/tensors?kind=activation,activation_gradient")
    assert tensors["step"] == opt["step"]
    grads: dict[str, float] = defaultdict(float)
    for row in tensors["tensors"]:
        if row["kind"] == "activation_gradient":
            grads[row["layer"]] += number(row["norm"]) ** 2
        else:  # one output per leaf module: the layer's std is the tensor's
            assert (ACTIVATION_STD, row["layer"], "") not in want
            want[(ACTIVATION_STD, row["layer"], "")] = number(row["std"])
    want.update({(ACTIVATION_GRAD, layer, ""): math.sqrt(sq) for layer, sq in grads.items()})
    return opt["step"], want


def test_full_run_gauges_equal_the_api_and_torch(start_collector, served):
    collector = start_collector()
    truth = train("full", collector.target, "full")
    train("plain", collector.target, None)  # the default agent: parameters and gradients only
    base = served()
    text = fetch(base + "/metrics")
    got = gauges(text, "full")

    step, want = api_figures(base, "full")
    assert step == STEPS - 1
    flat = {(family, *key): v for family, values in got.items() for key, v in values.items()}
    assert set(flat) == set(want)  # every layer with the kind, nothing else
    assert {k[1] for k in flat if k[0] == ACTIVATION_STD} == {"fc1", "act", "fc2"}
    assert {(k[1], k[2]) for k in flat if k[0] == STATE} == {(layer, s) for layer in LINEAR
                                                             for s in ("exp_avg", "exp_avg_sq")}
    for key, value in want.items():
        assert same(flat[key], value), (key, flat[key], value)
        assert math.isfinite(value) and value > 0, key
    # and what torch itself holds after the step (the agent summarizes in float32 on the device)
    for layer in LINEAR:
        for state in ("exp_avg", "exp_avg_sq"):
            assert flat[(STATE, layer, state)] == pytest.approx(truth[step][(layer, state)], rel=1e-5)
        assert flat[(UPDATE_RMS, layer, "")] == pytest.approx(truth[step][(layer, "update_rms")], rel=1e-5)

    # the default agent's run has its layer series, and none of these
    assert not gauges(text, "plain")
    assert line(text, "gradwatch_layer_grad_norm", run="plain", layer="fc1")


def test_a_nan_is_exported_as_nan_never_0(start_collector, served):
    """A NaN put into fc2's weight: its outputs, the output gradients from there back, Adam's moments and the update
    of fc2 read NaN, on /metrics as in the API."""
    collector = start_collector()
    train("nan", collector.target, "full", poison_step=POISON_STEP)
    base = served()
    text = fetch(base + "/metrics")
    got = {(family, *key): v for family, values in gauges(text, "nan").items() for key, v in values.items()}
    step, want = api_figures(base, "nan")
    assert step == STEPS - 1 and set(got) == set(want)
    for key, value in want.items():
        assert same(got[key], value), (key, got[key], value)
    for key in ((ACTIVATION_STD, "fc2", ""), (ACTIVATION_GRAD, "fc2", ""), (ACTIVATION_GRAD, "fc1", ""),
                (STATE, "fc2", "exp_avg"), (STATE, "fc2", "exp_avg_sq"), (UPDATE_RMS, "fc2", "")):
        assert math.isnan(got[key]), key
    # the exposition spells it NaN (Prometheus reads a NaN sample), not 0 and not missing
    assert line(text, ACTIVATION_STD, run="nan", layer="fc2").endswith(" NaN")
    assert line(text, STATE, run="nan", layer="fc2", state="exp_avg").endswith(" NaN")


# -- from a state's copy: which kinds give which gauges, the state-key bound, top-k and groups ------------------------

def families(samples: list, run: str) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for s in samples:
        if s.name in STATISTICS and s.labels["run"] == run:
            out[s.name] += 1
    return dict(out)


@pytest.mark.parametrize(("kinds", "expected"), [
    (("parameter", "gradient"), {}),  # the default agent: none
    (("parameter", "gradient", "optimizer_state"), {STATE: 2}),  # optimizer_state:on alone: Adam's two moments
    (("parameter", "gradient", "update"), {UPDATE_RMS: 1}),
    (("parameter", "gradient", "activation"), {ACTIVATION_STD: 1}),  # preset business
    (("parameter", "gradient", "activation_gradient"), {ACTIVATION_GRAD: 1}),
])
def test_each_gauge_comes_with_its_kind_only(kinds, expected):
    samples = scrape(AggregatorView([run_view("r", {"fc1": 1.0, "fc2": 2.0}, kinds=kinds)], now=NOW))
    assert families(samples, "r") == {name: 2 * n for name, n in expected.items()}


def test_state_keys_per_layer_are_bounded():
    """Parameters whose optimizer keeps different keys (Adafactor's factored moments beside a bias's unfactored
    one) give a layer more keys than Adam: the first STATE_KEYS in the report's order get a series."""
    keys = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg")
    samples = scrape(AggregatorView([run_view("r", {"fc1": 1.0}, kinds=("optimizer_state",), states=keys)], now=NOW))
    assert [s.labels["state"] for s in samples if s.name == STATE] == list(keys[:STATE_KEYS])


def test_top_k_and_groups_apply_to_the_statistics_gauges():
    norms = {f"blocks.{i // 2}.l{i % 2}": float(i + 1) for i in range(6)}
    kinds = ("parameter", "gradient", "update", "optimizer_state", "activation", "activation_gradient")
    view = AggregatorView([run_view("r", norms, kinds=kinds)], now=NOW)
    top = scrape(view, metrics_top_layers=2)
    assert {s.labels["layer"] for s in top if s.name in STATISTICS} == {"blocks.2.l0", "blocks.2.l1"}
    grouped = scrape(view, metrics_layer_group_depth=2)
    rms = {s.labels["layer"]: s.value for s in grouped if s.name == UPDATE_RMS}
    assert set(rms) == {"blocks.0", "blocks.1", "blocks.2"}
    # a group's update RMS is over its layers' updates as one (run_view: each tensor 100 values whose squares sum
    # to the layer's norm squared): blocks.0 = sqrt((1² + 2²) / 200)
    assert rms["blocks.0"] == pytest.approx(math.sqrt((1.0 + 4.0) / 200))
    assert rms["blocks.1"] == pytest.approx(math.sqrt((9.0 + 16.0) / 200))
    states = {(s.labels["layer"], s.labels["state"]) for s in grouped if s.name == STATE}
    assert states == {(g, k) for g in rms for k in ("exp_avg", "exp_avg_sq")}
