"""Cross-rank rules: judged on steps the join closed (aggregator/join.py), not on single reports."""

from __future__ import annotations

import math

from gradwatch.aggregator.alerts.record import FIRING, Alert, fmt, iso
from gradwatch.aggregator.join import JoinedStep
from gradwatch.aggregator.report import ReportView, TensorMeta
from gradwatch.aggregator.rules.base import CRITICAL, Rule

TINY = 1e-30


def pct2(x: float) -> str:
    """Two significant digits: 0.01 %, 22 %."""
    return f"{100 * x:.2g} %" if math.isfinite(x) else "inf"


class RankDivergence(Rule):
    """One rank disagrees with its peers about a tensor that every rank must hold identically: after
    DDP's all-reduce the gradients are the same bytes on every rank, and so are the parameters the
    optimizer then updates. A replicated tensor whose sum of squares differs from the median over the
    ranks by more than rel_tol, in `window` consecutive joined steps, means a desynchronised rank,
    faulty hardware or silent data corruption. Sharded and per-rank tensors (activations) are not
    compared. The alert names the rank farthest from the median and, on that rank, the first
    diverging tensor in forward order; with two ranks there is no majority and it names the higher.
    Defaults: rel_tol 1e-4 (identical inputs give identical statistics; the tolerance only absorbs
    float reordering in the agent's reductions), window 2, kinds parameter and gradient."""

    name = "RankDivergence"
    DEFAULTS = {"rel_tol": 1e-4, "window": 2, "kinds": ["parameter", "gradient"]}
    KIND_KEYS = ("kinds",)
    JOINED = True
    RESOLVE_AFTER = 3

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streak: dict[str, int] = {}
        self._kinds = frozenset(self.kinds())

    def evaluate(self, view: ReportView) -> list[Alert]:
        return []  # single reports hold no evidence: see evaluate_joined

    def evaluate_joined(self, joined: JoinedStep) -> list[Alert]:
        if len(joined.parts) < 2:
            return []
        found = self.divergence(joined)
        if found is None:
            self.streak.pop(joined.run, None)
            return self.transition(joined, False, None, lambda a: a.resolve(
                joined.step, joined.time, 0.0,
                f"Ranks agree again on every replicated tensor for {self.incidents.resolve_after} joined steps up to "
                f"step {joined.step}; rank {a.rank} diverged from step {a.step} (run {joined.run})"))
        streak = self.streak[joined.run] = self.streak.get(joined.run, 0) + 1
        if streak < self.p["window"]:
            return []
        return self.transition(joined, True, lambda: self._fire(joined, *found), None)

    def divergence(self, joined: JoinedStep) -> tuple[int, TensorMeta, float, float, int] | None:
        """(rank, tensor, its value, the median, ranks compared) of the worst disagreement, or None."""
        tol = self.p["rel_tol"]
        ranks = sorted(joined.parts)
        first = joined.parts[ranks[0]]
        if all(p.values == first.values and p.keys == first.keys for p in joined.parts.values()):
            return None  # the common case, checked in C: every rank holds the same statistics
        worst: tuple[float, int, int, TensorMeta, float, float, int] | None = None
        for key, (meta, _) in joined.parts[ranks[0]].replicated.items():
            if key[0] not in self._kinds or not self.layers(meta.layer):
                continue
            values = [(r, v[1]) for r in ranks if (v := joined.parts[r].replicated.get(key)) is not None]
            if len(values) < 2:
                continue
            finite = sorted(v for _, v in values if not math.isnan(v))
            if len(finite) == len(values) and finite[0] == finite[-1]:
                continue  # the common case: identical on every rank
            if not finite:
                continue  # NaN everywhere: NonFinite's business
            median = finite[len(finite) // 2] if len(finite) % 2 else 0.5 * (finite[len(finite) // 2 - 1]
                                                                               + finite[len(finite) // 2])
            for rank, v in values:
                dev = math.inf if math.isnan(v) else abs(v - median) / max(abs(median), TINY)
                if dev <= tol:
                    continue
                if len(values) == 2:
                    rank = max(r for r, _ in values)
                    v = dict(values)[rank]
                candidate = (dev, -meta.order, rank, meta, v, median, len(values))
                if worst is None or (dev, -meta.order) > worst[:2]:
                    worst = candidate
        if worst is None:
            return None
        _, _, rank, meta, value, median, n = worst
        return rank, meta, value, median, n

    def _fire(self, joined: JoinedStep, rank: int, meta: TensorMeta, value: float, median: float, n: int) -> Alert:
        rel = math.inf if math.isnan(value) else abs(value - median) / max(abs(median), TINY)
        who = (f"Rank {rank} disagrees with its {n - 1} peers" if n > 2
               else f"Ranks {min(joined.parts)} and {rank} disagree")
        sentence = (f"{who} at step {joined.step}: the sum of squares of {meta.kind_name} {meta.name} is {fmt(value)} "
                    f"against a median of {fmt(median)} over {n} ranks (relative difference {pct2(rel)}, tolerance "
                    f"{pct2(self.p['rel_tol'])}); after all-reduce every rank must hold the same values, so suspect "
                    f"a desynchronised rank, faulty hardware or silent data corruption on rank {rank} "
                    f"(run {joined.run})")
        return Alert(self.name, FIRING, joined.run, joined.step, rank, meta.layer, meta.name, rel,
                     self.p["rel_tol"], self.settings.severity or CRITICAL, sentence, iso(joined.time))

    @classmethod
    def check(cls, p):
        if not (math.isfinite(p["rel_tol"]) and p["rel_tol"] > 0):
            raise ValueError("rel_tol: expected a relative tolerance > 0")

    def forget(self, run: str) -> None:
        super().forget(run)
        self.streak.pop(run, None)
