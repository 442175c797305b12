"""Step-time overhead of the gradwatch agent beside other telemetry approaches, side by side, one process.

Model: a GPT-2-shaped decoder (reference figures and targets: docs/architecture.md#performance-targets);
`--small` (default on a CPU) shrinks it so the CPU run takes a minute. Every variant collects
statistics of every parameter and gradient on every logged step.

Variants:
  base               no telemetry
  item_sync          hand-rolled per-tensor norm / absmax / isfinite with .item() (3 host syncs per tensor)
  gradwatch          gradwatch.watch(model, opt): full statistics + log2 histogram, every step, exported
                     over gRPC to an in-process collector stub on 127.0.0.1; the NaN/Inf origin check off
                     (GRADWATCH_AGENT_ORIGIN=0), as every gradwatch_* variant below but one
  gradwatch_origin   the same with the origin check on (the default: every leaf module's output and output
                     gradient, every step): its cost is this variant's median over gradwatch's
  gradwatch_torch    the same with the plain-torch statistics path instead of the fused CPU kernel
                     (GRADWATCH_KERNELS=torch: what a machine without a C++ compiler gets)
  gradwatch_nohist   the same without histograms
  gradwatch_every10  the same, every 10th step
  tb_hist            TensorBoard add_histogram per tensor (only if tensorboard is installed)
  wandb_all          wandb.watch(model, log="all", log_freq=1), offline (only if wandb is installed)

Run: python benchmarks/agent_overhead.py [--small|--full] [--burst 4] [--rounds 30] [--variants a,b] [--out f.json]
Prints medians and the ratio of each variant's overhead to gradwatch's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent import futures

import grpc
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.agent import AgentConfig
from gradwatch.v1 import ingest_service_pb2, ingest_service_pb2_grpc


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, seq, d, h, layers):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList([Block(d, h) for _ in range(layers)])
        self.lnf = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.lnf(x))


class NullIngest(ingest_service_pb2_grpc.IngestServiceServicer):
    """Accepts and discards: measures the agent, not a collector."""

    def __init__(self):
        self.reports = 0
        self.bytes = 0

    def Export(self, request, context):
        self.reports += len(request.reports)
        self.bytes += request.ByteSize()
        return ingest_service_pb2.ExportResponse()


class ItemSync:
    def __init__(self, model):
        self.named = list(model.named_parameters())

    def after_backward(self):
        return {n: (p.grad.norm().item(), p.grad.abs().max().item(), bool(torch.isfinite(p.grad).all().item()))
                for n, p in self.named}


class TBHist:
    def __init__(self, model, logdir):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(logdir)
        self.named = list(model.named_parameters())
        self.step = 0

    def after_backward(self):
        for n, p in self.named:
            self.writer.add_histogram("param/" + n, p.detach(), self.step)
            self.writer.add_histogram("grad/" + n, p.grad.detach(), self.step)
        self.step += 1


class Variant:
    """One model, optimizer and telemetry; `run(n)` times n training steps. All variants live side by side
    in the process, so the measurement can interleave them in short bursts."""

    def __init__(self, name, cfg, dev, target, tmpdir):
        self.name, self.dev, self.cfg = name, dev, cfg
        torch.manual_seed(0)
        self.model = GPT(**cfg["model"]).to(dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, fused=(dev == "cuda"))
        B, T, V = cfg["batch"], cfg["model"]["seq"], cfg["model"]["vocab"]
        self.x = torch.randint(0, V, (B, T), device=dev)
        self.y = torch.randint(0, V, (B, T), device=dev)
        self.tele, self.watcher, self.wb = None, None, None
        if name == "item_sync":
            self.tele = ItemSync(self.model)
        elif name == "tb_hist":
            self.tele = TBHist(self.model, os.path.join(tmpdir, "tb"))
        elif name == "wandb_all":
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wb = wandb.init(project="gradwatch-bench", dir=tmpdir, mode="offline")
            wandb.watch(self.model, log="all", log_freq=1)
        elif name.startswith("gradwatch"):
            # "sync": the fused kernel is built (or loaded from the cache) before the first step, not during them.
            agent = AgentConfig(collector=target, every=10 if name.endswith("every10") else 1,
                                histogram=not name.endswith("nohist"),
                                kernels="torch" if name.endswith("_torch") else "sync",
                                origin=name.endswith("_origin"))
            self.watcher = gradwatch.watch(self.model, self.opt, run=f"bench-{name}", config=agent)

    def run(self, n):
        V, times = self.cfg["model"]["vocab"], []
        for _ in range(n):
            if self.dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(self.dev, dtype=torch.bfloat16):
                loss = F.cross_entropy(self.model(self.x).float().view(-1, V), self.y.view(-1))
            loss.backward()
            if self.tele is not None:
                self.tele.after_backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=False)
            if self.watcher is not None:
                self.watcher.step(loss=loss)
            if self.wb is not None:
                self.wb.log({"loss": loss.detach()})  # commits the step's histograms, as a user's loop would
            if self.dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    def close(self):
        if self.wb is not None:
            self.wb.finish()
        if self.watcher is None:
            return {}
        self.watcher.close()
        c = self.watcher.counters
        return {"exported": c.exported, "dropped": c.dropped, "skipped_busy": c.skipped_busy}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="small model (default on a CPU)")
    size.add_argument("--full", action="store_true", help="GPT-2-small shape (default on a GPU)")
    ap.add_argument("--variants",
                    default="base,item_sync,gradwatch,gradwatch_origin,gradwatch_torch,gradwatch_nohist,gradwatch_every10,"
                            "tb_hist,wandb_all")
    ap.add_argument("--burst", type=int, default=4, help="steps per variant and round (a third for tb/wandb)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds over all variants")
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    small = a.small or (dev == "cpu" and not a.full)
    cfg = (dict(model=dict(vocab=2048, seq=128, d=128, h=4, layers=4), batch=8) if small
           else dict(model=dict(vocab=50304, seq=1024, d=768, h=12, layers=12), batch=8))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sink = NullIngest()
    ingest_service_pb2_grpc.add_IngestServiceServicer_to_server(sink, server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    model = GPT(**cfg["model"])
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({os.cpu_count()} cores)",
           "torch": torch.__version__, "cfg": cfg, "params": sum(p.numel() for p in model.parameters()),
           "tensors": 2 * len(list(model.parameters())), "variants": {}}
    del model
    print(json.dumps({k: res[k] for k in ("device", "torch", "params", "tensors")}), flush=True)
    order = a.variants.split(",")
    samples: dict[str, list[float]] = {}
    extras: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {}
        for v in order:
            try:
                variants[v] = Variant(v, cfg, dev, target, tmp)
            except ImportError as err:
                print(f"{v:18s} skipped: {err}", flush=True)
        for v in variants.values():
            v.run(3)  # warm-up: allocator, autotuning, the first export
        # Short bursts of every variant in a shuffled order, round after round: a slow phase of the machine
        # (other tenants, frequency) lands on all variants alike instead of on whichever ran then.
        rng = random.Random(0)
        for rnd in range(a.rounds):
            names = list(variants)
            rng.shuffle(names)
            for v in names:
                burst = a.burst if v not in ("tb_hist", "wandb_all") else max(1, a.burst // 3)
                samples.setdefault(v, []).extend(variants[v].run(burst))
                time.sleep(0.05)  # background work (exports, wandb's writer) drains here, not into the next burst
            if (rnd + 1) % max(1, a.rounds // 5) == 0:
                print(f"round {rnd + 1}/{a.rounds}: " + ", ".join(
                    f"{v} {statistics.median(samples[v]) * 1e3:.1f}" for v in variants) + " ms (medians so far)",
                    flush=True)
        for v, variant in variants.items():
            extras[v] = variant.close()
    for v, times in sorted(samples.items(), key=lambda item: order.index(item[0])):
        res["variants"][v] = {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3,
                              "n": len(times), **extras[v]}
    server.stop(0)
    base = res["variants"]["base"]["median_ms"]
    gw = res["variants"].get("gradwatch", {}).get("median_ms")
    print(f"\nbaseline {base:.2f} ms; bytes on the wire per report: "
          f"{sink.bytes / max(sink.reports, 1):.0f} B for {res['tensors']} tensors")
    for k, r in res["variants"].items():
        r["overhead_pct"] = 100 * (r["median_ms"] - base) / base
        ratio = ""
        if gw and k not in ("gradwatch", "base") and gw - base > 0:
            ratio = f"   {(r['median_ms'] - base) / (gw - base):6.1f}x gradwatch's added cost"
        print(f"{k:18s} overhead {r['overhead_pct']:8.1f} %{ratio}")
    origin = res["variants"].get("gradwatch_origin", {}).get("median_ms")
    if gw and origin:
        res["origin_check_pct"] = 100 * (origin - gw) / gw
        print(f"origin check: gradwatch_origin over gradwatch {res['origin_check_pct']:+.2f} % median step time")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
