"""Rank health in runs of several ranks: a rank persistently slower than its peers (StragglerRank) and a
rank that stopped reporting while its peers go on (RankStalled). Both read every rank's own reports
(JOINED: the engine hands them each rank's report, not the merged step) and compare it with its peers;
RankStalled measures silence on this aggregator's clock in `evaluate_idle(now)`. Both name the rank's host
where its registration gave one."""

from __future__ import annotations

import bisect
import functools
import math
from collections import deque

from gradwatch.aggregator.alerts.record import FIRING, Alert, fmt, iso, times
from gradwatch.aggregator.join import JoinedStep
from gradwatch.aggregator.pace import seconds_per_step
from gradwatch.aggregator.report import ReportView
from gradwatch.aggregator.rules.base import RUN_LAYER, WARNING, Rule
from gradwatch.aggregator.rules.loss import _At
from gradwatch.aggregator.runstate import RATE_WINDOW

MAX_NAMED = 8  # other ranks listed by number in one sentence


def _on(host: str) -> str:
    return f" on host {host}" if host else ""


def _others(ranks: list[int]) -> str:
    if not ranks:
        return ""
    listed = ", ".join(map(str, ranks[:MAX_NAMED])) + (", ..." if len(ranks) > MAX_NAMED else "")
    return f"; {len(ranks)} more rank{'s' if len(ranks) > 1 else ''} too ({listed})"


class _Peers:
    """The paces of a run's ranks, sorted, as of one report: refreshed when the run reaches a new step or
    after as many reports as it has ranks, so a report costs a lookup, not a sort over thousands of ranks."""

    __slots__ = ("step", "by_rank", "paces", "used")

    def __init__(self, step: int, by_rank: dict[int, float]):
        self.step = step
        self.by_rank = by_rank
        self.paces = sorted(by_rank.values())
        self.used = 0

    def median_without(self, rank: int) -> tuple[float, int] | None:
        """(median pace, ranks counted) over every rank but `rank`; None without peers."""
        xs = self.paces
        own = self.by_rank.get(rank)
        skip = bisect.bisect_left(xs, own) if own is not None else len(xs)
        n = len(xs) - (own is not None)
        if n == 0:
            return None

        def at(k: int) -> float:
            return xs[k] if k < skip else xs[k + 1]
        return (at(n // 2) if n % 2 else 0.5 * (at(n // 2 - 1) + at(n // 2))), n


class StragglerRank(Rule):
    """A rank whose seconds per step (from the capture times of its last 10 training reports, as
    gradwatch_rank_step_seconds shows it) exceed `factor` x the median over its peers in `window`
    consecutive reports of that rank. The median is over the other ranks' latest paces, so two ranks
    suffice; a rank that sent its end-of-run marker leaves the median, and its incident resolves.
    Ranks that wait for each other every step (DDP's and FSDP's collectives) share one pace: there the
    slowest rank slows the whole run (gradwatch_run_steps_per_second) and no rank stands out, so this
    rule names stragglers among ranks that do not synchronise every step (independent or asynchronous
    workers, local SGD between synchronisations). The alert names the first rank that straggled; the
    incident resolves when every straggling rank kept pace for resolve_after_steps reports. Defaults:
    factor 1.5, window 20."""

    name = "StragglerRank"
    DEFAULTS = {"factor": 1.5, "window": 20}
    LAYERS = False
    JOINED = True
    SEES_FINAL = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recent: dict[str, dict[int, deque[tuple[float, int]]]] = {}  # run -> rank -> (capture time, step)
        self.streak: dict[tuple[str, int], int] = {}
        self.peers: dict[str, _Peers] = {}

    def evaluate(self, view: ReportView) -> list[Alert]:
        ranks = self.recent.setdefault(view.run, {})
        if view.final:
            return self._finished(view, ranks)
        if not view.train:
            return []
        recent = ranks.get(view.rank)
        if recent is None:
            recent = ranks[view.rank] = deque(maxlen=RATE_WINDOW)
        if recent and view.step <= recent[-1][1]:
            if view.step == recent[-1][1]:
                return []
            recent.clear()  # a restart from a checkpoint: the pace starts over
        recent.append((view.time, view.step))
        pace = seconds_per_step(recent)
        if pace is None:
            return []
        peers = self.peers.get(view.run)
        if peers is None or view.step > peers.step or peers.used >= len(ranks):
            paces = {r: p for r, q in ranks.items() if (p := seconds_per_step(q)) is not None}
            peers = self.peers[view.run] = _Peers(view.step, paces)
        peers.used += 1
        found = peers.median_without(view.rank)
        if found is None or not found[0] > 0:
            return []
        median, n = found
        key = (view.run, view.rank)
        ratio = pace / median
        if ratio <= self.p["factor"]:
            self.streak.pop(key, None)
            return self.transition(view, False, None, lambda a: a.resolve(
                view.step, view.time, ratio,
                f"No rank straggles any more: each kept within {times(self.p['factor'])}x of its peers' median for "
                f"{self.incidents.resolve_after} consecutive reports (rank {view.rank}: {fmt(pace)} s per step against "
                f"{fmt(median)} s at step {view.step}); rank {a.rank} straggled from step {a.step} (run {view.run})"))
        streak = self.streak[key] = self.streak.get(key, 0) + 1
        if streak < self.p["window"]:
            return []
        return self.transition(view, True, lambda: self._fire(view, pace, median, n, ratio, streak), None)

    def _fire(self, view: ReportView, pace: float, median: float, n: int, ratio: float, streak: int) -> Alert:
        others = sorted(r for (run, r), s in self.streak.items()
                        if run == view.run and r != view.rank and s >= self.p["window"])
        sentence = (f"Rank {view.rank}{_on(view.host)} is a straggler: {fmt(pace)} s per step over its last "
                    f"{RATE_WINDOW} reports "
                    f"against a median of {fmt(median)} s over its {n} peer{'s' if n > 1 else ''} ({times(ratio)}x, "
                    f"limit {times(self.p['factor'])}x) in {streak} consecutive reports up to step {view.step}"
                    f"{_others(others)} (run {view.run})")
        return Alert(self.name, FIRING, view.run, view.step, view.rank, RUN_LAYER, "", ratio, self.p["factor"],
                     self.settings.severity or WARNING, sentence, iso(view.time))

    def _finished(self, view: ReportView, ranks: dict) -> list[Alert]:
        """The rank's end-of-run marker: it leaves the peers, and no longer holds its run's incident open."""
        ranks.pop(view.rank, None)
        self.streak.pop((view.run, view.rank), None)
        self.peers.pop(view.run, None)
        out = []
        for _ in range(self.incidents.resolve_after):  # the marker stands for the clean reports it will not send
            out += self.transition(view, False, None, lambda a: a.resolve(
                view.step, view.time, 0.0, f"Rank {view.rank} ended its run at step {view.step}; rank {a.rank} "
                                           f"straggled from step {a.step} (run {view.run})"))
        return out

    def evaluate_joined(self, joined: JoinedStep) -> list[Alert]:
        return []  # judged on each rank's reports

    @classmethod
    def check(cls, p):
        if not (math.isfinite(p["factor"]) and p["factor"] > 1):
            raise ValueError("factor: expected a ratio > 1 to the peers' median seconds per step")

    def forget(self, run: str) -> None:
        super().forget(run)
        self.recent.pop(run, None)
        self.peers.pop(run, None)
        for key in [k for k in self.streak if k[0] == run]:
            del self.streak[key]


class RankStalled(Rule):
    """A rank of a multi-rank run that stopped reporting while a peer goes on: no report from it for
    `timeout_s` seconds of this aggregator's clock, or for `min_silence_s` with a peer already more than
    `max_step_lag` steps past its last step, where the peer reported within half the rank's silence and
    reached a later step (peers that stopped with it mean the whole run stalled: StalledTraining's). A rank
    that sent its end-of-run marker is not stalled. Checked by `evaluate_idle(now)` at the discovery
    interval; the rank's next report (or its end-of-run marker) resolves it. A rank that keeps training
    but stops reporting (its agent lost the collector) looks the same: the alert says the rank is silent,
    not why. Only ranks that reported since this aggregator took the run are watched. Defaults: timeout_s
    300, max_step_lag 1000, min_silence_s 30."""

    name = "RankStalled"
    DEFAULTS = {"timeout_s": 300.0, "max_step_lag": 1000, "min_silence_s": 30.0}
    LAYERS = False
    JOINED = True
    SEES_FINAL = True
    RESOLVE_AFTER = 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # run -> rank -> [applied_at, step, final]: the rank's latest report on this aggregator's clock
        self.ranks: dict[str, dict[int, list]] = {}
        self.stalled: dict[str, set[int]] = {}  # run -> ranks in its open incident
        self.hosts: dict[str, dict[int, str]] = {}  # run -> rank -> host, where the registration named one

    def evaluate(self, view: ReportView) -> list[Alert]:
        self.ranks.setdefault(view.run, {})[view.rank] = [view.applied_at, view.step, view.final]
        if view.host:
            self.hosts.setdefault(view.run, {})[view.rank] = view.host
        stalled = self.stalled.get(view.run)
        if stalled:
            stalled.discard(view.rank)
        if (view.run, self.name) not in self.incidents.open:
            return []
        at = _At(view.run, view.rank, view.step, view.applied_at)
        alert = self.incidents.clear((view.run, self.name), at, lambda a: a.resolve(
            view.step, view.applied_at, 0.0,
            f"Rank {a.rank} {'ended its run' if view.final and view.rank == a.rank else 'reports again'} (silent "
            f"from step {a.step}) and no rank of the run is silent now; the latest report: step {view.step} from "
            f"rank {view.rank} (run {view.run})"))
        return [alert] if alert else []

    def evaluate_idle(self, now: float) -> list[Alert]:
        out = []
        quiet = min(self.p["timeout_s"], self.p["min_silence_s"])
        for run, ranks in self.ranks.items():
            if len(ranks) < 2:
                continue
            pending = self.stalled.get(run, set())
            candidates = [r for r, (seen, _, final) in ranks.items()
                          if not final and now - seen > quiet and r not in pending]
            if not candidates:
                continue
            found = self._stalled(ranks, candidates, now)
            if not found:
                continue
            found.sort(key=lambda f: (-f[1], f[0]))  # the longest silent first
            fire = functools.partial(self._fire, run, now, *found[0], sorted(f[0] for f in found[1:]))
            for rank, _, step, _, _, _ in found:
                alert = self.incidents.bad((run, self.name), _At(run, rank, step, now), fire)
                if (run, self.name) in self.incidents.open:  # not when the cooldown held it back
                    self.stalled.setdefault(run, set()).add(rank)
                if alert:
                    out.append(alert)
        return out

    def _stalled(self, ranks: dict[int, list], candidates: list[int], now: float) -> list[tuple]:
        """(rank, silence, its last step, the peers' latest step, the peer at it, by steps) of each stalled
        candidate. The peers that went on: those that reported within half its silence."""
        live = sorted(((seen, step, r) for r, (seen, step, final) in ranks.items() if not final), reverse=True)
        seen_desc = [-seen for seen, _, _ in live]
        ahead: list[tuple[int, int]] = []  # prefix maxima of (step, rank) over live, most recent first
        for _, step, r in live:
            ahead.append(max(ahead[-1], (step, r)) if ahead else (step, r))
        out = []
        for rank in candidates:
            seen, step, _ = ranks[rank]
            silent = now - seen
            k = bisect.bisect_right(seen_desc, -(now - silent / 2))  # peers seen at or after now - silent / 2
            if k == 0:
                continue
            peak, by = ahead[k - 1]
            if peak <= step:
                continue  # no peer went past it: the run stalled, or this rank leads
            if silent > self.p["timeout_s"]:
                out.append((rank, silent, step, peak, by, False))
            elif silent > self.p["min_silence_s"] and peak - step > self.p["max_step_lag"]:
                out.append((rank, silent, step, peak, by, True))
        return out

    def _fire(self, run: str, now: float, rank: int, silent: float, step: int, peak: int, by: int, by_steps: bool,
              others: list[int]) -> Alert:
        lag = peak - step
        if by_steps:
            value, threshold = float(lag), float(self.p["max_step_lag"])
            limit = f"more than {self.p['max_step_lag']} steps behind after {self.p['min_silence_s']:.0f} s"
        else:
            value, threshold = silent, self.p["timeout_s"]
            limit = f"limit {self.p['timeout_s']:.0f} s"
        host = _on(self.hosts.get(run, {}).get(rank, ""))
        sentence = (f"Rank {rank}{host} stopped reporting: nothing for {silent:.0f} s since step {step} while rank "
                    f"{by} went on to step {peak}, {lag} steps ahead ({limit}){_others(others)} (run {run})")
        return Alert(self.name, FIRING, run, step, rank, RUN_LAYER, "", value, threshold,
                     self.settings.severity or WARNING, sentence, iso(now))

    def evaluate_joined(self, joined: JoinedStep) -> list[Alert]:
        return []  # judged on each rank's reports and on the clock

    @classmethod
    def check(cls, p):
        for key in ("timeout_s", "min_silence_s"):
            if not (math.isfinite(p[key]) and p[key] > 0):
                raise ValueError(f"{key}: expected a number of seconds > 0")
        if p["min_silence_s"] > p["timeout_s"]:
            raise ValueError("min_silence_s: expected at most timeout_s")
        if p["max_step_lag"] < 1:
            raise ValueError("max_step_lag: expected an integer >= 1")

    def forget(self, run: str) -> None:
        super().forget(run)
        self.ranks.pop(run, None)
        self.stalled.pop(run, None)
        self.hosts.pop(run, None)
