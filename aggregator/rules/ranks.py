"""Cross-rank rules: judged on steps the join closed (aggregator/join.py), not on single reports."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from gradwatch.aggregator.alerts.record import FIRING, Alert, fmt, iso
from gradwatch.aggregator.join import JoinedStep
from gradwatch.aggregator.report import ReportView, TensorMeta
from gradwatch.aggregator.rules.base import CRITICAL, Rule

TINY = 1e-30


def pct2(x: float) -> str:
    """Two significant digits: 0.01 %, 22 %."""
    return f"{100 * x:.2g} %" if math.isfinite(x) else "inf"


def ranks_text(ranks) -> str:
    """1 / 1 and 3 / 1, 2 and 3."""
    ranks = [str(r) for r in ranks]
    return ranks[0] if len(ranks) == 1 else f"{', '.join(ranks[:-1])} and {ranks[-1]}"


@dataclass(frozen=True, slots=True)
class Divergence:
    """The disagreement an alert reports: the rank it names, the tensor, and the evidence."""

    rank: int
    meta: TensorMeta
    n: int                      # ranks compared
    exact: bool                 # by checksum (bitwise), else by sum of squares within rel_tol
    value: float                # checksums: ranks off the majority; sums of squares: this rank's
    median: float = math.nan    # sums of squares: the median over the ranks
    odd: tuple[int, ...] = ()   # checksums: the ranks off the majority (all of them without one)
    majority: int = 0           # checksums: ranks holding the most common bytes (0: no strict majority)


class RankDivergence(Rule):
    """One rank disagrees with its peers about a tensor that every rank must hold identically: after
    DDP's all-reduce the gradients are the same bytes on every rank, and so are the parameters the
    optimizer then updates (replicated DTensor placements and HSDP replicas alike). Any difference is a
    fault: a desynchronised rank, faulty hardware or silent data corruption. Sharded and per-rank tensors
    (activations) are not compared.

    Where every rank sent the tensor's checksum (TensorSummary.checksum, the wrapping sum of its elements'
    bit patterns) they are compared exactly: a sign flip of one element, or a nudge far below any
    tolerance, changes it. A mismatch fires in `checksum_window` joined steps (default 1: the first). The
    alert names the first mismatching tensor in forward order and, with three or more ranks, the rank off
    the majority (the lowest of several); with two ranks, or no strict majority, it names every rank in
    its sentence and the highest in its rank field; value: the ranks off the majority.

    Where a rank sent no checksum (agents before it), the tensor's sums of squares are compared instead:
    a value that differs from the median over the ranks by more than rel_tol, in `window` consecutive
    joined steps. That alert names the rank farthest from the median and, on that rank, the first
    diverging tensor in forward order; with two ranks there is no majority and it names the higher;
    value: the relative difference. rel_tol 1e-4 only absorbs float reordering in an agent's reductions,
    so it misses a sign flip (the sum of squares keeps its value) and small nudges of few elements.
    Defaults: checksum_window 1, rel_tol 1e-4, window 2, kinds parameter and gradient."""

    name = "RankDivergence"
    DEFAULTS = {"rel_tol": 1e-4, "window": 2, "checksum_window": 1, "kinds": ["parameter", "gradient"]}
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
        if streak < self.p["checksum_window" if found.exact else "window"]:
            return []
        return self.transition(joined, True, lambda: self._fire(joined, found), None)

    def divergence(self, joined: JoinedStep) -> Divergence | None:
        """The disagreement to report: a checksum mismatch first, else the worst sum-of-squares divergence
        among tensors some rank sent without a checksum; None when the ranks agree."""
        ranks = sorted(joined.parts)
        first = joined.parts[ranks[0]]
        if all(p.values == first.values and p.keys == first.keys and p.checksums == first.checksums
               for p in joined.parts.values()):
            return None  # the common case, checked in C: every rank holds the same statistics
        checksums = {r: dict(zip(p.keys, p.checksums, strict=False)) for r, p in joined.parts.items()}
        mismatches: list[Divergence] = []
        unchecked: set[tuple[int, str]] = set()  # tensors some rank sent without a checksum
        for key, (meta, _) in first.replicated.items():
            if key[0] not in self._kinds or not self.layers(meta.layer):
                continue
            held = [(r, checksums[r][key]) for r in ranks if key in checksums[r]]
            if any(c is None for _, c in held):
                unchecked.add(key)
            elif len(held) >= 2 and any(c != held[0][1] for _, c in held):
                mismatches.append(self._mismatch(meta, held))
        if mismatches:
            return min(mismatches, key=lambda d: d.meta.order)  # stable: parameters before gradients
        return self._sum_squares(joined, ranks, unchecked) if unchecked else None

    @staticmethod
    def _mismatch(meta: TensorMeta, held: list[tuple[int, int]]) -> Divergence:
        n = len(held)
        top, count = Counter(c for _, c in held).most_common(1)[0]
        if n >= 3 and 2 * count > n:  # a strict majority: the ranks off it are the odd ones out
            odd = tuple(r for r, c in held if c != top)
            return Divergence(odd[0], meta, n, True, float(len(odd)), odd=odd, majority=count)
        ranks = tuple(r for r, _ in held)  # two ranks, or no majority: which is wrong cannot be told
        return Divergence(max(ranks), meta, n, True, float(n - count), odd=ranks)

    def _sum_squares(self, joined: JoinedStep, ranks: list[int], keys: set[tuple[int, str]]) -> Divergence | None:
        """The worst sum-of-squares disagreement over `keys` (tensors without checksums on every rank)."""
        tol = self.p["rel_tol"]
        worst: tuple[float, int, Divergence] | None = None
        for key, (meta, _) in joined.parts[ranks[0]].replicated.items():
            if key not in keys:
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
                if worst is None or (dev, -meta.order) > worst[:2]:
                    worst = (dev, -meta.order, Divergence(rank, meta, len(values), False, v, median))
        return worst[2] if worst else None

    def _fire(self, joined: JoinedStep, d: Divergence) -> Alert:
        what, blame = f"{d.meta.kind_name} {d.meta.name}", f"rank {d.rank}"
        if not d.exact:
            value = math.inf if math.isnan(d.value) else abs(d.value - d.median) / max(abs(d.median), TINY)
            threshold = self.p["rel_tol"]
            who = (f"Rank {d.rank} disagrees with its {d.n - 1} peers" if d.n > 2
                   else f"Ranks {min(joined.parts)} and {d.rank} disagree")
            head = (f"{who} at step {joined.step}: the sum of squares of {what} is {fmt(d.value)} against a median "
                    f"of {fmt(d.median)} over {d.n} ranks (relative difference {pct2(value)}, tolerance "
                    f"{pct2(threshold)})")
        else:
            value, threshold = d.value, 0.0
            if d.majority:
                who = (f"Rank {d.rank} disagrees with its {d.n - 1} peers" if len(d.odd) == 1
                       else f"Ranks {ranks_text(d.odd)} disagree with the majority")
                head = (f"{who} at step {joined.step}: {what} differs bitwise from the copy that {d.majority} of "
                        f"{d.n} ranks hold (its checksum differs)")
            elif d.n == 2:
                head = (f"Ranks {ranks_text(d.odd)} disagree at step {joined.step}: {what} differs bitwise between "
                        f"them (its checksums differ), and two ranks have no majority to tell which is wrong")
                blame = f"rank {d.odd[0]} or rank {d.rank}"
            else:
                head = (f"Ranks {ranks_text(d.odd)} disagree at step {joined.step}: {what} differs bitwise among "
                        f"them with no majority (the most common copy on {d.n - int(d.value)} of {d.n} ranks)")
                blame = "these ranks"
        sentence = (f"{head}; after all-reduce every rank must hold the same bytes, so suspect a desynchronised rank, "
                    f"faulty hardware or silent data corruption on {blame} (run {joined.run})")
        return Alert(self.name, FIRING, joined.run, joined.step, d.rank, d.meta.layer, d.meta.name, value,
                     threshold, self.settings.severity or CRITICAL, sentence, iso(joined.time))

    @classmethod
    def check(cls, p):
        if not (math.isfinite(p["rel_tol"]) and p["rel_tol"] > 0):
            raise ValueError("rel_tol: expected a relative tolerance > 0")
        if not p["checksum_window"] >= 1:
            raise ValueError("checksum_window: expected an integer >= 1")

    def forget(self, run: str) -> None:
        super().forget(run)
        self.streak.pop(run, None)
