"""A synthetic run the size of a large model, written to Redis exactly as the collector writes it: a deep
transformer of `blocks` blocks of ten layers (`blocks.N.ln_1`, `blocks.N.attn.{q,k,v,o}_proj`, `blocks.N.ln_2`,
`blocks.N.mlp.{gate,up,down}_proj`, `blocks.N.mlp.act`) between `embed` and `head`, its module graph (the data
flow with the residual stream) in the registration, trained on `world_size` FSDP ranks: every parameter and
gradient SHARDED, each rank reporting its shard, so the aggregator joins and merges every step over all ranks.

    reg = DeepTransformer(run, blocks=200, world_size=64)     # 2,002 layers, 3,602 tensors per rank
    reg.publish(client, steps=range(20))                      # registrations, then 64 reports per step

Also a small GPT-2-shaped module list (`gpt2_like`) for the label-overlap checks of small models."""

from __future__ import annotations

import math
import time

import redis

from gradwatch.streams import FIELD_REGISTRATION, FIELD_REPORT, RUNS_KEY, registrations_key, reports_key
from gradwatch.v1 import report_pb2, run_pb2

PARAM, GRAD = run_pb2.TENSOR_KIND_PARAMETER, run_pb2.TENSOR_KIND_GRADIENT
BLOCK = (("ln_1", "LayerNorm"), ("attn.q_proj", "Linear"), ("attn.k_proj", "Linear"), ("attn.v_proj", "Linear"),
         ("attn.o_proj", "Linear"), ("ln_2", "LayerNorm"), ("mlp.gate_proj", "Linear"), ("mlp.up_proj", "Linear"),
         ("mlp.act", "SiLU"), ("mlp.down_proj", "Linear"))
HIST = [3, 40, 700, 9000, 40000, 15793]  # 65,536 values over six log2 buckets


def transformer_graph(blocks: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(module path, type) in forward order and the data-flow edges of a pre-norm transformer."""
    nodes = [("embed", "Embedding")]
    edges = []
    stream = "embed"  # the module whose output is the residual stream entering the block
    for b in range(blocks):
        p = f"blocks.{b}."
        nodes += [(p + name, kind) for name, kind in BLOCK]
        edges += [(stream, p + "ln_1")]
        edges += [(p + "ln_1", p + f"attn.{x}_proj") for x in "qkv"]
        edges += [(p + f"attn.{x}_proj", p + "attn.o_proj") for x in "qkv"]
        edges += [(p + "attn.o_proj", p + "ln_2"), (stream, p + "ln_2")]  # the residual add
        edges += [(p + "ln_2", p + "mlp.gate_proj"), (p + "ln_2", p + "mlp.up_proj"),
                  (p + "mlp.gate_proj", p + "mlp.act"), (p + "mlp.act", p + "mlp.down_proj"),
                  (p + "mlp.up_proj", p + "mlp.down_proj")]
        stream = p + "mlp.down_proj"
    nodes.append(("head", "Linear"))
    edges.append((stream, "head"))
    return nodes, edges


def gpt2_like(blocks: int = 2) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Hugging Face GPT-2's leaf modules (transformer.h.N.attn.c_attn, ...) and their data flow."""
    nodes = [("transformer.wte", "Embedding"), ("transformer.wpe", "Embedding"), ("transformer.drop", "Dropout")]
    edges = [("transformer.wte", "transformer.drop"), ("transformer.wpe", "transformer.drop")]
    stream = "transformer.drop"
    for b in range(blocks):
        p = f"transformer.h.{b}."
        block = [("ln_1", "LayerNorm"), ("attn.c_attn", "Conv1D"), ("attn.attn_dropout", "Dropout"),
                 ("attn.c_proj", "Conv1D"), ("attn.resid_dropout", "Dropout"), ("ln_2", "LayerNorm"),
                 ("mlp.c_fc", "Conv1D"), ("mlp.act", "NewGELUActivation"), ("mlp.c_proj", "Conv1D"),
                 ("mlp.dropout", "Dropout")]
        nodes += [(p + n, t) for n, t in block]
        chain = [stream] + [p + n for n, _ in block[:5]]
        edges += list(zip(chain, chain[1:], strict=False))
        edges += [(stream, p + "ln_2"), (p + "attn.resid_dropout", p + "ln_2")]
        chain = [p + n for n, _ in block[5:]]
        edges += list(zip(chain, chain[1:], strict=False))
        stream = p + "mlp.dropout"
    nodes += [("transformer.ln_f", "LayerNorm"), ("lm_head", "Linear")]
    edges += [(stream, "transformer.ln_f"), ("transformer.ln_f", "lm_head")]
    return nodes, edges


PARAMETER_FREE = {"SiLU", "Dropout", "NewGELUActivation"}


class DeepTransformer:
    """Registrations and reports of the synthetic run; `nan_at`: (step, layer) whose weight turns NaN.
    `graph`: (nodes, edges) of another model (gpt2_like()) instead of the deep transformer."""

    def __init__(self, run: str, blocks: int = 200, world_size: int = 64, nan_at: tuple[int, str] | None = None,
                 graph: tuple[list, list] | None = None):
        self.run, self.world_size, self.nan_at = run, world_size, nan_at
        self.nodes, self.edges = graph or transformer_graph(blocks)
        self.layers = [name for name, _ in self.nodes]
        # Parameter-free modules (activations, dropout) have no tensors here: they are graph nodes only.
        self.weighted = [(i, name) for i, (name, kind) in enumerate(self.nodes) if kind not in PARAMETER_FREE]
        self.start_ns = time.time_ns()

    def registration(self, rank: int) -> run_pb2.RunRegistration:
        reg = run_pb2.RunRegistration(run_id=self.run, rank=rank, world_size=self.world_size,
                                      agent_version="synthetic", host=f"node-{rank // 8}")
        reg.start_time.FromNanoseconds(self.start_ns)
        for k, (i, layer) in enumerate(self.weighted):
            for j, kind in enumerate((PARAM, GRAD)):
                reg.tensors.add(id=2 * k + j, name=f"{layer}.weight" + (".grad" if kind == GRAD else ""), kind=kind,
                                shape=[1024, 1024], dtype="bfloat16", module_path=layer, order=i,
                                partition=run_pb2.PARTITION_SHARDED)
        if rank == 0:
            for name, kind in self.nodes:
                reg.topology.nodes.add(module_path=name, module_type=kind)
            for s, t in self.edges:
                reg.topology.edges.add(source=s, target=t)
        return reg

    def report(self, step: int) -> report_pb2.StepReport:
        """Rank 0's shard; publish() sets the rank and sequence of the others (the same shard values)."""
        r = report_pb2.StepReport(run_id=self.run, rank=0, step=step, sequence=step + 1,
                                  phase=report_pb2.PHASE_TRAIN, loss=3.0 / (1 + 0.02 * step), learning_rates=[3e-4])
        r.capture_time.FromNanoseconds(time.time_ns())
        n = self.world_size
        for k, (i, layer) in enumerate(self.weighted):
            grad = 1e-3 * (1 + 0.5 * math.sin(i / 37 + step / 4)) * (1 + i / 400)
            for j, norm in enumerate((20.0 + i / 100, grad)):
                nan = self.nan_at is not None and step >= self.nan_at[0] and layer == self.nan_at[1] and j == 0
                part = norm / math.sqrt(n)  # a shard's norm: the squares of n shards add up to norm²
                r.tensors.add(tensor_id=2 * k + j, count=(1 << 20) // n, sum=0.0, sum_squares=part * part,
                              min=-part, max=part, nan_count=5 if nan else 0, histogram=HIST,
                              histogram_offset=28 + 8 * j)
        return r

    def publish_registrations(self, client: redis.Redis) -> None:
        pipe = client.pipeline(transaction=False)
        for rank in range(self.world_size):
            raw = self.registration(rank).SerializeToString()
            pipe.hset(registrations_key(self.run), str(rank), raw)
            pipe.xadd(reports_key(self.run), {FIELD_REGISTRATION: raw})
        pipe.zadd(RUNS_KEY, {self.run: time.time()})
        pipe.execute()

    def publish_step(self, client: redis.Redis, step: int) -> None:
        """Every rank's report of one step, in one pipeline (what the collectors write for one step)."""
        r = self.report(step)
        pipe = client.pipeline(transaction=False)
        for rank in range(self.world_size):
            r.rank, r.sequence = rank, step + 1
            pipe.xadd(reports_key(self.run), {FIELD_REPORT: r.SerializeToString()})
        pipe.zadd(RUNS_KEY, {self.run: time.time()})
        pipe.execute()

    def publish(self, client: redis.Redis, steps) -> None:
        self.publish_registrations(client)
        for step in steps:
            self.publish_step(client, step)
