"""Per-tensor statistics of one step for the query API, derived from its summaries (single-rank reports, or a
multi-rank run's joined step merged over its ranks: aggregator/merge.py): each tensor's moments, the optimizer's
view of each parameter (state norms, the update as its effective step size), and one tensor's log2-magnitude
histograms over steps as a steps x buckets matrix.

NaN and Inf propagate: `mean` and `std` are those of all elements, NaN when any element is NaN or ±Inf (a summary
does not carry an Inf's sign), `norm` NaN or +Inf (report.sum_squares); `finite_mean`, `finite_std`, `min` and `max`
are over the finite elements (gradwatch.stats.moments), None when there is none. `layer_figures` gives the same
per layer (a layer's tensors of a kind taken as one), for per-layer series on /metrics.

Effective step size. With updates on (`updates:on` or `full`), the agent summarizes each watched parameter's
update Δw = w_after − w_before (kind UPDATE, the parameter's own name): its histogram is the distribution of |Δw|
over the tensor's elements, exactly what the optimizer moved each weight by, whatever the optimizer, learning-rate
schedule, weight decay or clipping. `update.ratio` is ‖Δw‖ / ‖w‖. Without updates, where Adam's moments are sent
(`optimizer_state:on`), `adam_step_estimate` is lr · rms(exp_avg) / (sqrt(mean(exp_avg_sq)) + 1e-8): the RMS step
had every element the tensor's average moments, with the first parameter group's learning rate, no bias
correction (early steps read high, by up to 1/sqrt(1 − β2^t)) and no weight decay: an estimate, labelled as such.
"""

from __future__ import annotations

import math

import numpy as np

from gradwatch.aggregator.merge import Merged, root
from gradwatch.aggregator.report import KIND_NAMES, TensorMeta, sum_squares
from gradwatch.stats import HIST_BUCKETS, summary_moments
from gradwatch.v1 import run_pb2

PARAMETER = run_pb2.TENSOR_KIND_PARAMETER
UPDATE = run_pb2.TENSOR_KIND_UPDATE
OPTIMIZER_STATE = run_pb2.TENSOR_KIND_OPTIMIZER_STATE
KIND_BY_NAME = {name: kind for kind, name in KIND_NAMES.items()}
ADAM_EPS = 1e-8  # torch.optim.Adam's default: the estimate's, whatever the optimizer was given
MAX_COLUMNS = 256  # a histogram matrix's steps, at most (the frames of a run are at most 256 anyway)

Pairs = list[tuple[TensorMeta, object]]  # (dictionary entry, TensorSummary or merge.Merged)


def figures(s) -> dict:
    """One summary's numbers (floats, None where undefined): see the module's docstring."""
    n, mean, var = summary_moments(s)
    bad = s.nan_count + s.inf_count
    finite = n > 0
    return {"count": s.count, "nan": s.nan_count, "inf": s.inf_count,
            "zero_fraction": s.zero_count / s.count if s.count else None,
            "mean": math.nan if bad else (mean if finite else None),
            "std": math.nan if bad else (math.sqrt(var) if finite else None),
            "finite_mean": mean if finite else None, "finite_std": math.sqrt(var) if finite else None,
            "min": s.min if finite else None, "max": s.max if finite else None,
            "norm": math.sqrt(sum_squares(s))}


def histogram(s) -> dict | None:
    """The summary's log2-magnitude histogram as the API spells it: `offset` (the first bucket; bucket i holds
    floor(log2|x|) = i − 40) and `counts`, trimmed to the non-empty run; None without one."""
    counts = list(s.histogram)
    first = next((i for i, c in enumerate(counts) if c), None)
    if first is None:
        return None
    last = max(i for i, c in enumerate(counts) if c)
    return {"offset": s.histogram_offset + first, "counts": counts[first:last + 1]}


def tensor_rows(tensors: dict[int, Pairs], kinds: set[int] | None = None, layers: set[str] | None = None,
                histograms: bool = False) -> list[dict]:
    """Every tensor of the step (of `kinds`, in `layers` when given), in forward order, then by kind and name."""
    pairs = [(meta, s) for kind, group in tensors.items() if kinds is None or kind in kinds
             for meta, s in group if layers is None or meta.layer in layers]
    pairs.sort(key=lambda p: (p[0].order, p[0].layer, p[0].kind_name, p[0].name))
    out = []
    for meta, s in pairs:
        row = {"name": meta.name, "kind": meta.kind_name, "layer": meta.layer, "shape": list(meta.shape),
               "dtype": meta.dtype, **figures(s)}
        if histograms:
            row["histogram"] = histogram(s)
        out.append(row)
    return out


def optimizer_rows(tensors: dict[int, Pairs], learning_rate: float | None,
                   layers: set[str] | None = None) -> list[dict]:
    """Per parameter with optimizer state or an update, in forward order: its norm, each state tensor's figures
    (`<parameter>.<key>`: exp_avg, exp_avg_sq, momentum_buffer, ...), the update with its histogram and
    ‖Δw‖ / ‖w‖, and the Adam estimate where both moments are there."""
    params = {meta.name: (meta, s) for meta, s in tensors.get(PARAMETER, ())}
    entries: dict[str, dict] = {}

    def entry(name: str, meta: TensorMeta) -> dict:
        e = entries.get(name)
        if e is None:
            p = params.get(name)
            e = entries[name] = {"parameter": name, "layer": (p[0] if p else meta).layer,
                                 "order": (p[0] if p else meta).order,
                                 "param_norm": math.sqrt(sum_squares(p[1])) if p else None,
                                 "states": {}, "update": None, "adam_step_estimate": None}
        return e

    for meta, s in tensors.get(OPTIMIZER_STATE, ()):
        name, _, key = meta.name.rpartition(".")  # "<parameter>.<key>": a state key has no dot
        if not name:
            name = key
        entry(name, meta)["states"][key] = {**figures(s), "rms": _rms(s)}
    for meta, s in tensors.get(UPDATE, ()):
        e = entry(meta.name, meta)
        f = figures(s)
        e["update"] = {**f, "rms": _rms(s), "absmax": max(abs(s.min), abs(s.max)) if f["min"] is not None else None,
                       "ratio": f["norm"] / e["param_norm"] if e["param_norm"] else None, "histogram": histogram(s)}
    for e in entries.values():
        m, v = e["states"].get("exp_avg"), e["states"].get("exp_avg_sq")
        if m and v and learning_rate is not None and v["mean"] is not None and m["rms"] is not None:
            e["adam_step_estimate"] = learning_rate * m["rms"] / (root(v["mean"]) + ADAM_EPS)  # NaN stays NaN
    rows = [e for e in entries.values() if layers is None or e["layer"] in layers]
    rows.sort(key=lambda e: (e.pop("order"), e["layer"], e["parameter"]))
    return rows


def layer_figures(tensors: dict[int, Pairs], kinds: set[int], layers) -> dict[tuple[str, str, str], dict]:
    """(layer, kind name, state key) -> `figures` of the layer's tensors of that kind taken as one (counts and sums
    add, min and max fold: merge.Merged), for per-layer series. Optimizer state is kept apart per state key
    (exp_avg, exp_avg_sq: the key after the parameter's name), every other kind has state key ""."""
    groups: dict[tuple[str, str, str], list] = {}
    for kind in kinds:
        for meta, s in tensors.get(kind, ()):
            if meta.layer in layers:
                state = meta.name.rpartition(".")[2] if kind == OPTIMIZER_STATE else ""
                groups.setdefault((meta.layer, meta.kind_name, state), []).append(s)
    return {key: figures(parts[0] if len(parts) == 1 else Merged(parts)) for key, parts in groups.items()}


def _rms(s) -> float | None:
    """sqrt(Σx² / n), NaN/Inf propagating; None for an empty tensor."""
    return math.sqrt(sum_squares(s) / s.count) if s.count else None


def histogram_matrix(frames: list[tuple[int, dict]], tensor: str, kind: int, first: int | None = None,
                     columns: int = MAX_COLUMNS) -> dict:
    """One tensor's histograms over the frames' steps as a matrix, at most `columns` columns: consecutive frames
    merge into one column (histograms add exactly over steps, as over ranks). values[i][j]: the fraction of
    column i's finite non-zero elements in bucket offset + j; each column's zero and NaN/Inf fractions of all its
    elements beside it. `steps[i]`..`last_steps[i]`: the steps merged into column i."""
    found = []
    for step, tensors in frames:
        if first is not None and step < first:
            continue
        s = next((s for meta, s in tensors.get(kind, ()) if meta.name == tensor), None)
        if s is not None:
            found.append((step, s))
    per = max(1, -(-len(found) // max(1, min(columns, MAX_COLUMNS))))
    cols = []
    for i in range(0, len(found), per):
        group = found[i:i + per]
        dense = np.zeros(HIST_BUCKETS, dtype=np.int64)
        count = zero = bad = 0
        for _, s in group:
            off = s.histogram_offset
            for j, c in enumerate(s.histogram):
                dense[min(max(off + j, 0), HIST_BUCKETS - 1)] += c
            count, zero, bad = count + s.count, zero + s.zero_count, bad + s.nan_count + s.inf_count
        cols.append((group[0][0], group[-1][0], dense, count, zero, bad))
    used = np.flatnonzero(np.sum([c[2] for c in cols], axis=0)) if cols else np.array([], dtype=np.int64)
    lo, hi = (int(used[0]), int(used[-1])) if used.size else (0, -1)
    values = []
    for _, _, dense, *_ in cols:
        total = int(dense.sum())
        values.append([float(c) / total if total else 0.0 for c in dense[lo:hi + 1]])
    return {"tensor": tensor, "kind": KIND_NAMES.get(kind, "unspecified"), "offset": lo,
            "steps": [c[0] for c in cols], "last_steps": [c[1] for c in cols], "values": values,
            "counts": [c[3] for c in cols],
            "zero_fraction": [c[4] / c[3] if c[3] else None for c in cols],
            "nonfinite_fraction": [c[5] / c[3] if c[3] else None for c in cols]}
