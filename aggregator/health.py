"""Per-layer health derived from one report's summaries at scrape (or query) time, not per report:
update/weight ratios, dead and saturated activation fractions, and log2-magnitude histograms merged
per layer. A scrape every 15 s costs far less here than the same work on every one of hundreds of
reports per second."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gradwatch.aggregator.report import UNITS, sum_squares
from gradwatch.aggregator.rules.activations import saturated_fraction
from gradwatch.stats import HIST_BUCKETS, HIST_MIN_EXPONENT, moments
from gradwatch.v1 import run_pb2

PARAMETER = run_pb2.TENSOR_KIND_PARAMETER
UPDATE = run_pb2.TENSOR_KIND_UPDATE
ACTIVATION = run_pb2.TENSOR_KIND_ACTIVATION
HIST_KINDS = (run_pb2.TENSOR_KIND_GRADIENT, PARAMETER, ACTIVATION, UPDATE)
# The agent's log2 buckets (gradwatch.stats): bucket i holds floor(log2|x|) == i + HIST_MIN_EXPONENT (the
# first also everything smaller, the last everything larger). Exported in groups of 4 so a histogram of 64
# buckets is 16 series.
GROUP = 4
# Upper bound of each exported group: group g covers buckets 4g..4g+3, i.e. |x| < 2^(4g + 4 + HIST_MIN_EXPONENT).
BOUNDS = tuple(2.0 ** (GROUP * (g + 1) + HIST_MIN_EXPONENT) for g in range(HIST_BUCKETS // GROUP - 1)) + (math.inf,)


@dataclass(frozen=True, slots=True)
class LayerHealth:
    update_ratio: float | None        # ||update|| / ||weight||, from UPDATE and PARAMETER summaries
    # units that never fired since the previous report / units, where the agent counts unit activity
    # (ReLU/ReLU6 modules); else the zero fraction of ReLU-like (min >= 0) activations
    dead_fraction: float | None
    saturated_fraction: float | None  # fraction with |y| >= 0.5 of activations bounded by [-1, 1]
    activation_mean: float | None = None  # over the layer's finite activation values
    activation_var: float | None = None


def layer_health(tensors: dict, layers) -> dict[str, LayerHealth]:
    """tensors: kind -> [(TensorMeta, TensorSummary)] of one report; layers: the layers to report."""
    param: dict[str, float] = {}
    update: dict[str, float] = {}
    for meta, s in tensors.get(PARAMETER, ()):
        param[meta.layer] = param.get(meta.layer, 0.0) + sum_squares(s)  # NaN/Inf in, NaN/Inf out: never a ratio
    for meta, s in tensors.get(UPDATE, ()):
        update[meta.layer] = update.get(meta.layer, 0.0) + sum_squares(s)
    zeros: dict[str, list[int]] = {}
    dead_units: dict[str, list[int]] = {}  # layer -> [units that never fired, units]
    sat: dict[str, list[float]] = {}
    sums: dict[str, list] = {}  # layer -> [count, NaN, Inf, sum, sum of squares, min, max]: merged summaries
    for meta, s in tensors.get(ACTIVATION, ()):
        n = s.count
        if not n:
            continue
        m = sums.setdefault(meta.layer, [0, 0, 0, 0.0, 0.0, math.inf, -math.inf])
        m[0] += n
        m[1] += s.nan_count
        m[2] += s.inf_count
        m[3] += s.sum
        m[4] += s.sum_squares
        m[5] = min(m[5], s.min)
        m[6] = max(m[6], s.max)
        if s.min >= 0:
            z = zeros.setdefault(meta.layer, [0, 0])
            z[0] += s.zero_count
            z[1] += n
        if s.min >= -1.0 and s.max <= 1.0 and s.zero_count < n:
            f = sat.setdefault(meta.layer, [0.0, 0])
            f[0] += saturated_fraction(s) * n
            f[1] += n
    for meta, s in tensors.get(UNITS, ()):
        if s.count:
            units = dead_units.setdefault(meta.layer, [0, 0])
            units[0] += s.zero_count
            units[1] += s.count
    out = {}
    for layer in set(update) | set(zeros) | set(sat) | set(sums) | set(dead_units):
        if layer not in layers:
            continue
        p, u = param.get(layer), update.get(layer)
        ratio = math.sqrt(u) / math.sqrt(p) if u is not None and p else None
        z, f, m = dead_units.get(layer) or zeros.get(layer), sat.get(layer), sums.get(layer)
        mean = var = None
        if m:
            n, mean, var = moments(*m)
            if not n:
                mean = var = None
        out[layer] = LayerHealth(ratio, z[0] / z[1] if z else None, f[0] / f[1] if f else None, mean, var)
    return out


def merge_histograms(tensors: dict, layers, budget: int) -> list[tuple[str, str, list[int], float]]:
    """(layer, kind, the 64 bucket counts, sum of values) per (layer, kind) for the first `budget` pairs
    in forward order: log2 histograms add exactly over a layer's tensors."""
    merged: dict[tuple[str, int], tuple[list[int], list[float], int]] = {}
    for kind in HIST_KINDS:
        for meta, s in tensors.get(kind, ()):
            if meta.layer not in layers or not len(s.histogram):
                continue
            key = (meta.layer, kind)
            entry = merged.get(key)
            if entry is None:
                if len(merged) >= budget:
                    continue
                entry = merged[key] = ([0] * HIST_BUCKETS, [0.0], meta.order)
            counts = entry[0]
            off = s.histogram_offset
            for i, c in enumerate(s.histogram):
                if 0 <= off + i < HIST_BUCKETS:
                    counts[off + i] += c
            entry[1][0] += s.sum
    return [(layer, run_pb2.TensorKind.Name(kind).removeprefix("TENSOR_KIND_").lower(), counts, total[0])
            for (layer, kind), (counts, total, _) in sorted(merged.items(), key=lambda kv: (kv[1][2], kv[0]))]


def layer_histograms(tensors: dict, layers, budget: int) -> list[tuple[str, str, list[int], float]]:
    """As merge_histograms, in 16 cumulative groups of 4 buckets (upper bounds BOUNDS), for Prometheus."""
    out = []
    for layer, kind, counts, total in merge_histograms(tensors, layers, budget):
        cumulative, acc = [], 0
        for g in range(HIST_BUCKETS // GROUP):
            acc += sum(counts[GROUP * g:GROUP * (g + 1)])
            cumulative.append(acc)
        out.append((layer, kind, cumulative, total))
    return out
