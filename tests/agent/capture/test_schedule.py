"""Schedules as tables of due steps, parse() accepting and refusing specs, and Burst across threads."""

from __future__ import annotations

import math
import threading

import pytest

from gradwatch.agent.capture.schedule import Burst, Schedule, any_of, dense_then_every, every, log_spaced, parse


def due_steps(schedule: Schedule, n: int) -> list[int]:
    return [step for step in range(n) if schedule.due(step)]


@pytest.mark.parametrize(("schedule", "n", "expected"), [
    (every(1), 6, [0, 1, 2, 3, 4, 5]),
    (every(3), 12, [0, 3, 6, 9]),
    (every(4, offset=2), 16, [2, 6, 10, 14]),
    (every(5, offset=12), 25, [12, 17, 22]),
    (dense_then_every(4, 5), 21, [0, 1, 2, 3, 5, 10, 15, 20]),
    (dense_then_every(0, 4), 13, [0, 4, 8, 12]),
    (dense_then_every(10, 3), 13, list(range(10)) + [12]),
    (log_spaced(), 130, [0, 1, 2, 4, 8, 16, 32, 64, 128]),
    (log_spaced(10), 10_001, [0, 1, 10, 100, 1000, 10_000]),
    (log_spaced(1.5), 131, [0, 1, 2, 3, 5, 8, 11, 17, 26, 38, 58, 86, 130]),
    (log_spaced(per_decade=3), 1001, [0, 1, 2, 5, 10, 22, 46, 100, 215, 464, 1000]),
    (log_spaced(per_decade=5), 101, [0, 1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100]),
    (any_of(every(10), dense_then_every(3, 1000)), 31, [0, 1, 2, 10, 20, 30]),
    (any_of(every(7, offset=1), log_spaced()), 17, [0, 1, 2, 4, 8, 15, 16]),
])
def test_due_steps(schedule, n, expected):
    assert due_steps(schedule, n) == expected
    assert isinstance(schedule, Schedule)


@pytest.mark.parametrize("schedule", [every(3), dense_then_every(2, 5), log_spaced()])
def test_negative_steps_are_never_due(schedule):
    assert not any(schedule.due(step) for step in range(-20, 0))


@pytest.mark.parametrize(("base", "per_decade"), [(2.0, None), (1.1, None), (3.7, None), (1.01, None), (1000, None),
                                                  (2.0, 1), (2.0, 7), (2.0, 40)])
def test_log_spaced_matches_its_definition(base, per_decade):
    schedule = log_spaced(base, per_decade=per_decade)
    b = 10.0 ** (1.0 / per_decade) if per_decade else float(base)
    defined = {0} | {math.floor(b ** i + 0.5) for i in range(int(math.log(100_000) / math.log(b)) + 2)}
    assert set(due_steps(schedule, 100_000)) == {s for s in defined if s < 100_000}


@pytest.mark.parametrize("exponent", [20, 40, 52, 62])
def test_log_spaced_far_out(exponent):
    schedule = log_spaced(2)
    step = 2 ** exponent
    assert schedule.due(step) and not schedule.due(step - 1) and not schedule.due(step + 1)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: every(0), "every must be an integer >= 1"),
    (lambda: every(2.5), "every must be an integer >= 1"),
    (lambda: every(True), "every must be an integer >= 1"),
    (lambda: every(3, offset=-1), "offset must be an integer >= 0"),
    (lambda: dense_then_every(-1, 5), "dense must be an integer >= 0"),
    (lambda: dense_then_every(5, 0), "every must be an integer >= 1"),
    (lambda: log_spaced(1.0), "base must be a finite number > 1"),
    (lambda: log_spaced(math.inf), "base must be a finite number > 1"),
    (lambda: log_spaced(per_decade=0), "per_decade must be an integer >= 1"),
    (lambda: log_spaced(3.0, per_decade=4), "base or per_decade, not both"),
    (lambda: any_of(), "at least one schedule"),
    (lambda: Burst(every(1), 0), "burst must be an integer >= 1"),
    (lambda: Burst(Burst(every(1), 3), 3), "cannot wrap another Burst"),
])
def test_factories_refuse_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(("spec", "n", "expected"), [
    ("every:1", 4, [0, 1, 2, 3]),
    ("every:10", 31, [0, 10, 20, 30]),
    (" every : 10 ", 21, [0, 10, 20]),
    ("every:10,offset:3", 24, [3, 13, 23]),
    ("offset:3,every:10", 24, [3, 13, 23]),
    ("dense:5,every:10", 21, [0, 1, 2, 3, 4, 10, 20]),
    ("every:10,dense:5", 21, [0, 1, 2, 3, 4, 10, 20]),
    ("log:2", 20, [0, 1, 2, 4, 8, 16]),
    ("log:1.5", 12, [0, 1, 2, 3, 5, 8, 11]),
    ("log:3/decade", 101, [0, 1, 2, 5, 10, 22, 46, 100]),
    ("every:1000|log:2", 1001, [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]),
    ("every:50+burst:20", 101, [0, 50, 100]),
    ("dense:3,every:50|log:10 + burst:5", 101, [0, 1, 2, 10, 50, 100]),
])
def test_parse_valid(spec, n, expected):
    schedule = parse(spec)
    assert due_steps(schedule, n) == expected
    again = parse(schedule.spec)  # the canonical spec describes the same schedule
    assert again.spec == schedule.spec and due_steps(again, n) == expected


@pytest.mark.parametrize(("spec", "canonical"), [
    ("every:10", "every:10"),
    ("offset:0,every:10", "every:10"),
    ("every:10,dense:5", "dense:5,every:10"),
    ("log:2", "log:2"),
    ("log:1.0000001", "log:1.0000001"),
    ("log: 4 /decade", "log:4/decade"),
    ("every:7|log:2+burst:3", "every:7|log:2+burst:3"),
])
def test_spec_is_canonical(spec, canonical):
    assert parse(spec).spec == canonical


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty schedule spec"),
    ("   ", "empty schedule spec"),
    ("every", "'every' is not name:value"),
    ("every:", "'every:' is not name:value"),
    ("every:0", "every must be an integer >= 1, got '0'"),
    ("every:-5", "every must be an integer >= 1, got '-5'"),
    ("every:2.5", "every must be an integer >= 1, got '2.5'"),
    ("every:ten", "every must be an integer >= 1, got 'ten'"),
    ("every:10,offset:x", "offset must be an integer >= 0, got 'x'"),
    ("every:10,every:20", "'every' given twice"),
    ("dense:100", r"dense:K needs the rate after it, e.g. dense:100,every:10"),
    ("dense:100,log:2", "unknown form 'dense:100,log:2'"),
    ("sometimes:3", "unknown form 'sometimes:3'"),
    ("log:1", "log base must be a number > 1"),
    ("log:nan", "log base must be a number > 1"),
    ("log:two", "log base must be a number > 1"),
    ("log:0/decade", "log N/decade must be an integer >= 1"),
    ("every:10|", "'' is not name:value"),
    ("every:50+burst:0", "burst must be an integer >= 1, got '0'"),
    ("every:50+burst", "after '\\+' expected burst:L"),
    ("every:50+every:2", "after '\\+' expected burst:L"),
    ("every:50+burst:2+burst:3", "at most one \\+burst:L"),
    ("+burst:20", "'' is not name:value"),
])
def test_parse_invalid(spec, message):
    with pytest.raises(ValueError, match=message) as caught:
        parse(spec)
    assert repr(spec) in str(caught.value)


def test_parse_refuses_non_strings():
    with pytest.raises(ValueError, match="empty schedule spec"):
        parse(None)


def test_burst_without_trigger_follows_the_base_schedule():
    burst = parse("every:5+burst:3")
    assert isinstance(burst, Burst)
    assert due_steps(burst, 16) == [0, 5, 10, 15]
    assert burst.triggers == 0 and burst.last_trigger_step is None


def test_burst_starts_at_the_next_due_call_and_lasts_length_steps():
    burst = Burst(every(100), 3)
    assert [burst.due(s) for s in range(0, 3)] == [True, False, False]
    burst.trigger(1)  # the anomaly was at step 1; the reader noticed it while step 3 was under way
    assert [burst.due(s) for s in range(3, 9)] == [True, True, True, False, False, False]
    assert burst.in_burst(5) and not burst.in_burst(6)
    assert burst.triggers == 1 and burst.last_trigger_step == 1
    assert burst.due(100)  # the base schedule still applies after the burst


def test_trigger_during_a_burst_extends_it():
    burst = Burst(every(100), 4)
    burst.trigger(0)
    assert [burst.due(s) for s in range(1, 4)] == [True, True, True]  # burst covers 1..4
    burst.trigger(2)
    assert [burst.due(s) for s in range(4, 10)] == [True, True, True, True, False, False]  # now covers 4..7


def test_repeated_triggers_before_a_due_call_start_one_burst():
    burst = Burst(every(100), 2)
    for step in range(5):
        burst.trigger(step)
    assert due_steps(burst, 10) == [0, 1]
    assert burst.triggers == 5 and burst.last_trigger_step == 4


def test_trigger_from_another_thread():
    burst = Burst(every(1000), 5)
    assert due_steps(burst, 10) == [0]
    reader = threading.Thread(target=burst.trigger, args=(8,), name="gradwatch-reader-test")
    reader.start()
    reader.join()
    assert [burst.due(s) for s in range(10, 17)] == [True] * 5 + [False, False]
    assert burst.last_trigger_step == 8


def test_concurrent_triggers_are_all_counted_while_the_training_thread_runs():
    burst = Burst(every(1000), 1)
    start = threading.Barrier(6)  # four readers, the trainer, this thread
    stop = threading.Event()

    def reader():
        start.wait()
        for step in range(2000):
            burst.trigger(step)

    def training():
        start.wait()
        step = 1
        while not stop.is_set():
            burst.due(step)
            step += 1

    threads = [threading.Thread(target=reader) for _ in range(4)]
    trainer = threading.Thread(target=training)
    for thread in [*threads, trainer]:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join()
    stop.set()
    trainer.join()
    assert burst.triggers == 4 * 2000
    burst.due(10**9 + 1)  # sees whatever triggers the training thread had not seen yet
    burst.trigger(0)
    assert burst.due(10**9 + 3) and not burst.due(10**9 + 4) and burst.triggers == 4 * 2000 + 1
