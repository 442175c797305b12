"""Exact cross-rank merge, end to end: every per-layer figure of a four-rank run equals the unsharded model's.

Four real ranks (gloo, CPU; DDP, then FSDP2 `fully_shard` with uneven and empty shards) train a small
transformer-like model and report every step through the real pipeline: a collector (gRPC on 127.0.0.1) into
a real Redis, read by a real aggregator serving /metrics and the JSON API. The reference is independent of
gradwatch: the same model from the same initial weights, trained in this process on the global batch (the
four ranks' micro-batches concatenated; the loss a mean over all of them, so its gradients are the ranks'
averaged ones), read in float64 where the agent summarizes (the optimizer's step pre-hook: the gradients of
step k, the parameters after k updates; the report carries step k).

Asserted, within a relative 1e-5 (FP32 training; reduction order differs across ranks):
- /api/v1/runs/{run}/steps?layers=1: one row per step, its "layers" (gradient norms) and "param_norms"
  (parameter norms) those of the reference for every layer, its "grad_norm" the global gradient norm;
- the last step's per-layer norms on /metrics, in /api/v1/runs/{run} and /api/v1/runs/{run}/layers.
The joined global gradient norm (merged by partition already) is checked first, so a mismatch in the per-layer
figures is the merge's and not the reference's.

Each rank runs this file as a script (tests/scenarios/distributed/ranks.py), as test_fsdp.py does.
"""

from __future__ import annotations

import json
import math
import sys
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
import torch
from torch import nn

WORLD_SIZE = 4
STEPS = 6
MICRO_BATCH, SEQ = 2, 8  # per rank and step
# Uneven FSDP shards over 4 ranks (Shard(0), chunks of ceil(rows / 4)): the embedding's 37 rows 10/10/10/7,
# LayerNorm's 10 elements 3/3/3/1, the head's 3 rows 1/1/1/0 (rank 3 holds an empty shard).
VOCAB, WIDTH, CLASSES = 37, 10, 3
LR, MOMENTUM = 0.2, 0.9
REL = 1e-5
JOB_TIMEOUT_S = 90  # a hang guard only: the job takes seconds
JOIN_TIMEOUT_S = 20  # the aggregator joins all steps within moments of the ranks' exit


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, 3 * WIDTH)
        self.act = nn.GELU()
        self.proj = nn.Linear(3 * WIDTH, WIDTH)

    def forward(self, x):
        return x + self.proj(self.act(self.fc(self.norm(x))))


class Tiny(nn.Module):
    """Layers (module paths): embed, blocks.{0,1}.{norm,fc,proj}, norm, head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_model() -> Tiny:
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    model = Tiny()
    with torch.no_grad():  # LayerNorm starts at ones and zeros: make its norms move from step 0
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    return model


def micro_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s tokens and per-token targets at `step`."""
    g = torch.Generator().manual_seed(10_000 + 100 * rank + step)
    return (torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g),
            torch.randint(0, CLASSES, (MICRO_BATCH, SEQ), generator=g))


def loss_of(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(tokens).reshape(-1, CLASSES), targets.reshape(-1))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # SGD: its update is linear in the gradient, so rounding differences stay as small as they start
    # (Adam's sign-like first steps can turn a 1e-7 difference into a whole learning rate).
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def run_id(mode: str) -> str:
    return f"merge-exact-{mode}"


def worker(rank: int, world_size: int, port: int, collector: str, mode: str) -> None:
    """One rank of the job (runs in a child process)."""
    import torch.distributed as dist

    import gradwatch
    from gradwatch.agent import AgentConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=30))
    try:
        net = make_model()
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(net)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in net.blocks:
                fully_shard(block)
            model = fully_shard(net)
        opt = make_optimizer(model)
        # Every step, and host slots to spare: on 2 cores the reader can fall behind and skip a step.
        config = AgentConfig(collector=collector, every=1, host_slots=32)
        watcher = gradwatch.watch(model, opt, run=run_id(mode), config=config)
        for step in range(STEPS):
            loss = loss_of(model, *micro_batch(rank, step))
            loss.backward()  # DDP all-reduces, FSDP2 reduce-scatters: both average over the ranks
            opt.step()       # the agent's pre-hook summarizes gradients and parameters first
            opt.zero_grad(set_to_none=True)
            watcher.step(loss=loss)
        watcher.close()
        c = watcher.counters
        if (c.exported, c.dropped, c.skipped_busy, c.internal_errors) != (STEPS, 0, 0, 0):
            raise SystemExit(f"rank {rank}: unexpected counters {c}")
        dist.barrier()  # no rank tears the group down while a peer still trains
    finally:
        dist.destroy_process_group()


# --- the reference: the unsharded model in this process ----------------------------------------------------


def reference() -> list[dict]:
    """Per step: {"grad": {layer: norm}, "param": {layer: norm}, "global": norm}, in float64 from the tensors.
    Layers are named as the agent names them: the module path owning the parameters in the unwrapped model
    (under DDP too: its wrapper's "module." is not part of a layer's name)."""
    model, out = make_model(), []
    opt = make_optimizer(model)
    owned: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        owned.setdefault(name.rpartition(".")[0], []).append(p)
    for step in range(STEPS):
        batches = [micro_batch(rank, step) for rank in range(WORLD_SIZE)]
        tokens, targets = (torch.cat(parts) for parts in zip(*batches, strict=True))
        loss_of(model, tokens, targets).backward()  # one mean over the global batch = the ranks' average
        grad = {layer: math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ps)) for layer, ps in owned.items()}
        param = {layer: math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in ps))
                 for layer, ps in owned.items()}
        out.append({"grad": grad, "param": param, "global": math.sqrt(sum(g * g for g in grad.values()))})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


# --- the pipeline: aggregator (with its HTTP port) and collector, over the session's Redis -----------------


@pytest.fixture
def pipeline(make_aggregator, start_collector):
    """Downstream first: a running aggregator serving /metrics and the API, then a collector. Yields
    (collector target, aggregator base URL)."""
    from gradwatch.aggregator.http.server import serve

    agg = make_aggregator().start()
    server, thread = serve("127.0.0.1", 0, agg.registry, agg.view, history=agg.history, topology=agg.topology,
                           live_tick_s=None)
    collector = start_collector()
    yield collector.target, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def api(base: str, path: str) -> dict | None:
    """The answer's "data", or None while the aggregator does not know the run yet (404)."""
    status, body = fetch(base + path)
    if status == 404:
        return None
    assert status == 200, (path, status, body[:500])
    return json.loads(body)["data"]


def joined_all(base: str, run: str) -> tuple[dict, list[dict]] | None:
    """(run detail, step rows) once the aggregator joined the last step of all ranks, else None."""
    detail = api(base, f"/api/v1/runs/{run}")
    joined = detail and detail["joined"]
    if not joined or joined["step"] != STEPS - 1:
        return None
    rows = api(base, f"/api/v1/runs/{run}/steps?layers=1")["steps"]
    return (detail, rows) if {r["step"] for r in rows} >= set(range(STEPS)) else None


def scrape(base: str, run: str) -> dict[str, dict[str, float]]:
    """{metric: {layer: value}} of the run's per-layer norms on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = fetch(base + "/metrics")
    assert status == 200
    out: dict[str, dict[str, float]] = {"gradwatch_layer_grad_norm": {}, "gradwatch_layer_param_norm": {}}
    for family in text_string_to_metric_families(body.decode()):
        if family.name in out:
            out[family.name].update({s.labels["layer"]: s.value for s in family.samples if s.labels["run"] == run})
    return out


def mismatches(where: str, got: dict | None, want: dict[str, float]) -> list[str]:
    """Lines naming each layer whose value is missing or off by more than REL (NaN/Inf arrive as strings)."""
    if got is None:
        return [f"{where}: missing"]
    out = [f"{where}: layers {sorted(got)} != {sorted(want)}"] if set(got) != set(want) else []
    for layer, expected in want.items():
        if layer not in got:
            continue
        value = float(got[layer]) if got[layer] is not None else math.nan
        rel = abs(value - expected) / expected
        if not rel <= REL:
            out.append(f"{where} {layer}: {value:.7g}, unsharded {expected:.7g} (relative error {rel:.2e})")
    return out


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch without distributed or gloo")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_every_layer_figure_of_a_four_rank_run_equals_the_unsharded_model(pipeline, tmp_path, mode):
    from gradwatch.cli.processes import wait_until
    from tests.scenarios.distributed.ranks import run_ranks

    target, base = pipeline
    run, ref = run_id(mode), reference()
    run_ranks(__file__, WORLD_SIZE, tmp_path, JOB_TIMEOUT_S, lambda rank: [target, mode])
    detail, rows = wait_until(lambda: joined_all(base, run), JOIN_TIMEOUT_S, f"all {STEPS} steps of {run} joined")

    # The reference first, against the one figure merged by partition today: the joined global gradient norm.
    joined = detail["joined"]
    assert (detail["world_size"], detail["ranks"], joined["reason"]) == (WORLD_SIZE, list(range(WORLD_SIZE)),
                                                                         "complete")
    assert joined["global_grad_norm"] == pytest.approx(ref[-1]["global"], rel=REL)

    # Every joined step: one row each, with every layer's gradient and parameter norm.
    bad = [f"steps: {n} rows of step {step}" for step in range(STEPS)
           if (n := sum(r["step"] == step for r in rows)) != 1]
    bad += [f"steps: a row of step {r['step']}, which the run never reached" for r in rows if r["step"] >= STEPS]
    for row in (r for r in rows if r["step"] < STEPS):
        step, want = row["step"], ref[row["step"]]
        bad += mismatches(f"steps[{step}].layers", row.get("layers"), want["grad"])
        bad += mismatches(f"steps[{step}].param_norms", row.get("param_norms"), want["param"])
        bad += mismatches(f"steps[{step}].grad_norm", {"global": row["grad_norm"]}, {"global": want["global"]})

    # The last step, wherever gradwatch shows per-layer figures.
    last = ref[-1]
    metrics = scrape(base, run)
    for kind in ("grad", "param"):
        bad += mismatches(f"/metrics gradwatch_layer_{kind}_norm", metrics[f"gradwatch_layer_{kind}_norm"], last[kind])
        bad += mismatches(f"runs/{run} layers[].{kind}_norm",
                          {x["layer"]: x[f"{kind}_norm"] for x in detail["layers"]}, last[kind])
    layers = api(base, f"/api/v1/runs/{run}/layers?histograms=0")
    if layers["step"] != STEPS - 1:
        bad.append(f"runs/{run}/layers: step {layers['step']}, not {STEPS - 1}")
    for kind in ("grad", "param"):
        bad += mismatches(f"runs/{run}/layers {kind}_norm", {x["layer"]: x[f"{kind}_norm"] for x in layers["layers"]},
                          last[kind])
    assert not bad, f"{len(bad)} figures differ from the unsharded model's:\n" + "\n".join(bad)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
