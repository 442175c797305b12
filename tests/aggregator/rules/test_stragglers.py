"""Rule tables for rank health: StragglerRank (per-rank pace against the peers' median) and RankStalled (a
rank silent while its peers go on). Ranks of one run go through a real State and RuleEngine, on a clock the
test moves (no Redis)."""

from __future__ import annotations

import math
import time
from datetime import datetime

import pytest

from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.aggregator.rules.catalogue import RuleEngine, load_rules
from gradwatch.aggregator.state import State
from gradwatch.settings import ConfigError
from gradwatch.v1 import report_pb2
from tests.fixtures.aggregator import T0, Build

F, R = "firing", "resolved"
RUN = "ranks"


class Job:
    """The ranks of one run reporting to a State and RuleEngine; `now` is the aggregator's clock."""

    def __init__(self, monkeypatch, world_size: int, **config):
        self.now = T0
        monkeypatch.setattr(time, "time", lambda: self.now)
        config = AggregatorConfig(keep_firing_s=0, **config)
        self.state, self.engine = State(config, Counters()), RuleEngine(config)
        self.build = Build()
        self.sequence: dict[int, int] = {}
        self.alerts = []
        self.world_size = world_size
        for rank in range(world_size):
            reg = self.build.registration(run=RUN, rank=rank)
            reg.world_size = world_size
            self.state.register(RUN, reg)

    def report(self, rank: int, step: int, t: float | None = None, final: bool = False) -> None:
        seq = self.sequence[rank] = self.sequence.get(rank, 0) + 1
        if final:
            r = report_pb2.StepReport(run_id=RUN, rank=rank, step=step, sequence=seq, final=True)
        else:
            r = self.build.report(step, run=RUN, rank=rank, seq=seq, t=self.now if t is None else t, tensors=False)
        view = self.state.apply(RUN, r)
        self.alerts += self.engine.evaluate(view)
        for joined in self.state.take_closed():
            self.alerts += self.engine.evaluate_joined(joined)

    def idle(self) -> None:
        self.alerts += self.engine.evaluate_idle(self.now)

    def of(self, rule: str) -> list:
        return [a for a in self.alerts if a.rule == rule]


# -- StragglerRank --------------------------------------------------------------------------------------


def run_paced(job: Job, steps: int, pace, finish: bool = False) -> None:
    """Every rank trains `steps` steps, step s of rank r taking pace(r, s) seconds; the reports arrive in
    capture order, the aggregator's clock at their capture time."""
    events = []
    for rank in range(job.world_size):
        t = T0
        for step in range(steps):
            t += pace(rank, step)
            events.append((t, rank, step))
    for t, rank, step in sorted(events):
        job.now = t
        job.report(rank, step)
    if finish:
        for rank in range(job.world_size):
            job.report(rank, steps - 1, final=True)


WORLD = 3


def slow(rank_paces: dict[int, float], base: float = 0.1, when=lambda step: True):
    return lambda rank, step: rank_paces.get(rank, base) if when(step) else base


def jitter(rank: int, step: int) -> float:
    """+-30 % per step, differently on each rank (deterministic)."""
    return 0.1 * (1 + 0.3 * math.sin(1.3 * step + 2.1 * rank))


STRAGGLER = [
    pytest.param(slow({1: 0.2}), 100, [(1, 20, F)], id="rank 1 at 2x its peers' seconds per step"),
    pytest.param(slow({1: 0.14}), 100, [], id="1.4x: within the factor"),
    pytest.param(slow({0: 0.2, 1: 0.2, 2: 0.2}), 100, [], id="lockstep: every rank equally slow"),
    pytest.param(jitter, 200, [], id="per-step jitter of +-30 %"),
    pytest.param(slow({2: 0.3}, when=lambda s: 40 <= s < 48), 100, [], id="a slowdown shorter than the window"),
    pytest.param(slow({0: 5.0, 1: 5.0, 2: 5.0}, when=lambda s: s == 50), 100, [],
                 id="a checkpoint pause on every rank"),
    pytest.param(slow({1: 0.2}, when=lambda s: s < 60), 120, [(1, 20, F), (1, 68, R)],
                 id="a straggler that catches up: resolved once its pace window is clean"),
]


@pytest.mark.parametrize(("pace", "steps", "expected"), STRAGGLER)
def test_straggler_rank(monkeypatch, pace, steps, expected):
    job = Job(monkeypatch, WORLD)
    run_paced(job, steps, pace)
    assert [(a.rank, a.step, a.status) for a in job.of("StragglerRank")] == expected


def test_straggler_alert_names_the_rank_its_pace_and_the_median(monkeypatch):
    job = Job(monkeypatch, WORLD)
    run_paced(job, 40, slow({2: 0.25}))
    (a,) = job.of("StragglerRank")
    assert (a.rank, a.layer, a.tensor, a.severity, a.threshold) == (2, "(run)", "", "warning", 1.5)
    assert a.value == pytest.approx(2.5)
    assert a.summary == ("Rank 2 on host test-host is a straggler: 0.25 s per step over its last 10 reports "
                         "against a median of 0.1 s over its 2 peers (2.5x, limit 1.5x) in 20 consecutive reports "
                         "up to step 20 (run ranks)")


def test_two_ranks_suffice_the_slower_is_named(monkeypatch):
    job = Job(monkeypatch, 2)
    run_paced(job, 40, slow({0: 0.3}))
    assert [(a.rank, a.status) for a in job.of("StragglerRank")] == [(0, F)]


def test_a_straggler_that_ends_its_run_resolves_and_leaves_the_median(monkeypatch):
    job = Job(monkeypatch, WORLD)
    run_paced(job, 40, slow({1: 0.3}), finish=True)
    assert [(a.rank, a.status) for a in job.of("StragglerRank")] == [(1, F), (1, R)]
    assert "Rank 1 ended its run" in job.of("StragglerRank")[-1].summary


def test_a_second_straggler_joins_the_open_incident(monkeypatch):
    """One alert per run: the second straggling rank is held in the incident, which resolves only when both
    keep pace again."""
    job = Job(monkeypatch, 5)
    run_paced(job, 120, lambda r, s: 0.3 if (r == 1 and s < 60) or (r == 3 and 10 <= s < 90) else 0.1)
    transitions = [(a.rank, a.status) for a in job.of("StragglerRank")]
    assert transitions == [(1, F), (1, R)]
    assert job.of("StragglerRank")[-1].step > 95  # after rank 3 caught up, not when rank 1 did


def test_a_restart_from_a_checkpoint_starts_the_paces_over(monkeypatch):
    """Every rank goes back to step 40 after a pause, rank 2 three seconds after the others: no straggler."""
    job = Job(monkeypatch, WORLD)
    events = [(T0 + 0.1 * step + 0.01 * rank, rank, step) for rank in range(WORLD) for step in range(80)]
    events += [(T0 + 20 + 3 * (rank == 2) + 0.1 * (step - 40), rank, step) for rank in range(WORLD)
               for step in range(40, 120)]
    for t, rank, step in sorted(events):
        job.now = t
        job.report(rank, step)
    assert job.of("StragglerRank") == []


def test_a_single_rank_is_never_a_straggler(monkeypatch):
    job = Job(monkeypatch, 1)
    run_paced(job, 50, lambda r, s: 0.1 if s < 25 else 1.0)
    assert job.of("StragglerRank") == []


# -- RankStalled ----------------------------------------------------------------------------------------


def run_clocked(job: Job, seconds: float, steps_per_s: float, silent=lambda rank, t: False, tick: float = 1.0,
                offsets=None) -> None:
    """Every `tick` seconds each rank reports its current step (steps_per_s since t=0), unless silent(rank,
    t); rank r reports offsets[r] seconds into each tick. The rules' idle check runs at the end of a tick."""
    offsets = offsets or {r: 0.0 for r in range(WORLD)}
    t = 0.0
    while t < seconds:
        for rank, dt in sorted(offsets.items(), key=lambda kv: kv[1]):
            if not silent(rank, t + dt):
                job.now = T0 + t + dt
                job.report(rank, int((t + dt) * steps_per_s))
        t += tick
        job.now = T0 + t
        job.idle()


STALLED = [
    pytest.param(10, lambda r, t: r == 2 and t >= 100, 400, [(2, 990, F, 201)],
                 id="10 steps/s: 1000 steps behind after 100 s"),
    pytest.param(1, lambda r, t: r == 2 and t >= 100, 500, [(2, 99, F, 400)], id="1 step/s: the timeout"),
    pytest.param(10, lambda r, t: r == 2 and 100 <= t < 150, 400, [], id="silent 50 s: neither limit"),
    pytest.param(10, lambda r, t: r == 2 and 100 <= t < 450, 600, [(2, 990, F, 201), (2, 4500, R, 450)],
                 id="resolved when it reports again"),
    pytest.param(10, lambda r, t: t >= 100, 3000, [], id="the whole run stopped: StalledTraining's"),
    pytest.param(10, lambda r, t: r == 2 and t >= 100 or r == 1 and t >= 101, 400, [(2, 990, F, 201)],
                 id="two ranks silent one second apart: one incident"),
]


@pytest.mark.parametrize(("steps_per_s", "silent", "seconds", "expected"), STALLED)
def test_rank_stalled(monkeypatch, steps_per_s, silent, seconds, expected):
    job = Job(monkeypatch, WORLD)
    run_clocked(job, seconds, steps_per_s, silent)
    assert [(a.rank, a.step, a.status, seconds_in(a)) for a in job.of("RankStalled")] == expected


def seconds_in(alert) -> int:
    """Seconds from the start of the job to the transition."""
    stamp = alert.ends_at or alert.starts_at
    return round(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - T0)


def test_rank_stalled_alert_names_the_rank_the_peer_ahead_and_the_others(monkeypatch):
    job = Job(monkeypatch, 4)
    run_clocked(job, 400, 10, lambda r, t: r in (1, 3) and t >= 100, offsets={0: 0.0, 1: 0.1, 2: 0.2, 3: 0.1})
    (a,) = job.of("RankStalled")
    assert (a.rank, a.step, a.layer, a.tensor, a.severity, a.value, a.threshold) == (
        1, 991, "(run)", "", "warning", 1001.0, 1000.0)
    assert a.summary == ("Rank 1 on host test-host stopped reporting: nothing for 101 s since step 991 while "
                         "rank 2 went on to step 1992, 1001 steps ahead (more than 1000 steps behind after 30 s); "
                         "1 more rank too (3) (run ranks)")


def test_rank_stalled_resolves_when_every_silent_rank_is_back(monkeypatch):
    job = Job(monkeypatch, WORLD)
    run_clocked(job, 600, 1, lambda r, t: (r == 2 and 100 <= t < 500) or (r == 1 and 200 <= t < 550))
    assert [(a.rank, a.status, seconds_in(a)) for a in job.of("RankStalled")] == [(2, F, 400), (2, R, 550)]
    assert job.of("RankStalled")[-1].summary == (
        "Rank 2 reports again (silent from step 99) and no rank of the run is silent now; the latest report: "
        "step 550 from rank 1 (run ranks)")


def test_a_rank_that_ended_its_run_is_not_stalled(monkeypatch):
    job = Job(monkeypatch, WORLD)
    run_clocked(job, 100, 10)
    job.report(2, 990, final=True)
    run_clocked(job, 2000, 10, lambda r, t: r == 2)
    assert job.of("RankStalled") == []


def test_the_end_of_run_marker_of_a_stalled_rank_resolves_it(monkeypatch):
    job = Job(monkeypatch, WORLD)
    run_clocked(job, 300, 10, lambda r, t: r == 2 and t >= 100)
    job.report(2, 990, final=True)
    assert [a.status for a in job.of("RankStalled")] == [F, R]
    assert job.of("RankStalled")[-1].summary.startswith("Rank 2 ended its run (silent from step 990)")


def test_export_batches_and_a_straggler_far_behind_are_not_stalls(monkeypatch):
    """At 500 steps/s with each rank exporting every 5 s at its own moment, peers are 2500 steps apart for
    seconds at a time; a rank that reports regularly is never stalled, however far behind in steps."""
    job = Job(monkeypatch, WORLD)
    run_clocked(job, 200, 500, tick=5.0, offsets={0: 0.0, 1: 2.5, 2: 4.9})
    assert job.of("RankStalled") == []


def test_a_single_rank_is_never_stalled(monkeypatch):
    job = Job(monkeypatch, 1)
    run_clocked(job, 50, 10, offsets={0: 0.0})
    job.now += 1e5
    job.idle()
    assert job.of("RankStalled") == []


BAD_SETTINGS = [
    ("[StragglerRank]\nfactor = 1.0\n", "[StragglerRank] factor: expected a ratio > 1"),
    ("[StragglerRank]\nwindow = 0\n", "window: expected an integer >= 1"),
    ("[RankStalled]\ntimeout_s = 0.0\n", "[RankStalled] timeout_s: expected a number of seconds > 0"),
    ("[RankStalled]\nmin_silence_s = 600.0\n", "[RankStalled] min_silence_s: expected at most timeout_s"),
    ("[RankStalled]\nmax_step_lag = 0\n", "[RankStalled] max_step_lag: expected an integer >= 1"),
]


@pytest.mark.parametrize(("text", "message"), BAD_SETTINGS)
def test_settings_out_of_range_are_start_up_errors(tmp_path, text, message):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_rules(AggregatorConfig(rules=str(path)))
