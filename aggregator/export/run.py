"""What Redis knows of a run before its history is read: whether it knows the run at all, and what the run's
registration says (hyperparameters, labels, the layers' forward order), as the aggregator keeps it: rank 0's,
else the lowest rank's."""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from gradwatch.aggregator.history import TIERS
from gradwatch.streams import RUNS_KEY, history_steps_key, layers_key, registrations_key, tier_steps_key
from gradwatch.v1 import run_pb2

LATEST_SHOWN = 10  # runs named when the asked one is unknown


class RunNotFound(LookupError):
    """Redis holds neither a history nor a registration of the run."""


@dataclass
class RunInfo:
    """What the run's registrations say (rank 0's, else the lowest rank's, as the aggregator keeps them)."""

    run: str
    hyperparameters: dict[str, float | int | str | bool | None] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    world_size: int = 0
    agent_version: str = ""
    start_time: float | None = None
    order: dict[str, int] = field(default_factory=dict)  # layer -> forward order, where registered


def run_info(client, run: str) -> RunInfo:
    """The run's registration; RunNotFound (naming the latest runs Redis knows) when Redis has nothing of it."""
    keys = [registrations_key(run), history_steps_key(run), layers_key(run),
            *(tier_steps_key(run, width) for width in TIERS)]
    if not client.exists(*keys):  # one slot: every key is under the run's hash tag
        latest = [m.decode(errors="replace") for m in client.zrevrange(RUNS_KEY, 0, LATEST_SHOWN - 1)]
        known = f"; latest runs there: {', '.join(latest)}" if latest else "; Redis holds no run"
        raise RunNotFound(f"no run {run!r}: no history and no registration{known}")
    info = RunInfo(run)
    regs = {}
    for rank, raw in client.hgetall(registrations_key(run)).items():
        try:
            regs[int(rank)] = run_pb2.RunRegistration.FromString(raw)
        except (ValueError, DecodeError):  # a field written by something else: not a registration
            continue
    if regs:
        reg = regs[min(regs)]
        info.hyperparameters = {k: getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
                                for k, v in sorted(reg.hyperparameters.items())}
        info.labels = dict(sorted(reg.labels.items()))
        info.world_size = max(r.world_size for r in regs.values())
        info.agent_version = reg.agent_version
        info.start_time = reg.start_time.ToNanoseconds() / 1e9 if reg.HasField("start_time") else None
        for t in reg.tensors:
            layer = t.module_path or t.name
            info.order[layer] = min(info.order.get(layer, t.order), t.order)
    return info
