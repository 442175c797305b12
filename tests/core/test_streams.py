"""The Redis contract's list of a run's keys (core/streams.py `run_keys`): every key function of the module is in
it, every key shares the run's hash tag, and the lease and history keys agree with their mechanisms' modules.
A key added later without being listed fails here (and `gradwatch runs delete` would leave it behind)."""

from __future__ import annotations

import inspect

from redis.crc import key_slot

from gradwatch import streams

RUN = "run-1.a_b:c"


def key_functions() -> dict[str, object]:
    """Every function of gradwatch.streams that names a key of one run: `<name>_key(run_id[, width])`."""
    return {name: fn for name, fn in vars(streams).items()
            if inspect.isfunction(fn) and fn.__module__ == streams.__name__ and name.endswith("_key")}


def test_run_keys_cover_every_key_function():
    functions = key_functions()
    assert {"reports_key", "history_key", "tier_key", "lease_key"} <= set(functions)  # the scan itself works
    keys = streams.run_keys(RUN)
    for name, fn in functions.items():
        params = list(inspect.signature(fn).parameters)
        if params == ["run_id"]:
            assert fn(RUN) in keys, f"streams.{name} is not in run_keys: add it (and to durable_keys unless it " \
                                    f"expires on its own)"
        else:
            assert params == ["run_id", "width"], f"streams.{name}{params}: teach this test its arguments"
            for width in streams.HISTORY_TIERS:
                assert fn(RUN, width) in keys, f"streams.{name}(run, {width}) is not in run_keys"


def test_run_keys_share_one_slot_and_name_no_other_run():
    keys = streams.run_keys(RUN)
    assert len(keys) == len(set(keys))
    assert {key_slot(k.encode()) for k in keys} == {key_slot(RUN.encode())}
    assert all(k.startswith(f"gradwatch:{{{RUN}}}:") for k in keys)
    assert not set(keys) & set(streams.run_keys(RUN + "x"))
    assert streams.RUNS_KEY not in keys and streams.ALERTS_KEY not in keys


def test_durable_keys_are_those_without_an_expiry_of_their_own():
    own_ttl = set(streams.run_keys(RUN)) - set(streams.durable_keys(RUN))
    assert own_ttl == {streams.lease_key(RUN), streams.snapshot_requests_key(RUN), streams.snapshots_key(RUN)}
    assert set(streams.durable_keys(RUN)) < set(streams.run_keys(RUN))
