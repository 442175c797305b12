"""Scoped tokens: the tokens file as read at start-up, and a real collector on 127.0.0.1 writing to a real
Redis refusing, with PERMISSION_DENIED and a count, every request that names a run outside its token's prefix."""

from __future__ import annotations

import grpc
import pytest

from gradwatch.agent.export.exporter import Exporter
from gradwatch.collector.auth import FULL, Grant, Tokens, read_tokens_file
from gradwatch.collector.config import CollectorConfig
from gradwatch.settings import ConfigError
from gradwatch.streams import RUNS_KEY, snapshot_requests_key, snapshots_key
from gradwatch.v1.ingest_service_pb2 import ExportRequest
from gradwatch.v1.ingest_service_pb2_grpc import IngestServiceStub
from gradwatch.v1.snapshot_pb2 import SnapshotRequest
from tests.collector.test_service import entries, registration, report
from tests.collector.test_snapshots import snapshot

TEAM_A = "a" * 32
TEAM_B = "b" * 32
ANYONE = "c" * 32
FULL_TOKEN = "full-token-0123456789"


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# team tokens\n\n{TEAM_A} teamA-\n   {TEAM_B}   teamB-   # team B's jobs\n{ANYONE} *\n")
    return str(path)


@pytest.fixture
def scoped(start_collector, tokens_file):
    return start_collector(tokens_file=tokens_file)


def export(collector, request: ExportRequest, token: str | None):
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(collector.target) as channel:
        return IngestServiceStub(channel).Export(request, metadata=metadata, timeout=5)


def refused(collector, request: ExportRequest, token: str | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        export(collector, request, token)
    return info.value


# --- the file ---------------------------------------------------------------------------------------

def test_the_file_is_read_with_comments_and_blank_lines(tokens_file):
    assert [(token, grant, line) for token, grant, line in read_tokens_file(tokens_file)] == [
        (TEAM_A, Grant("teamA-"), 3), (TEAM_B, Grant("teamB-"), 4), (ANYONE, FULL, 5)]


@pytest.mark.parametrize(("text", "message"), [
    (f"{TEAM_A}\n", "line 1: expected `<token> <run-id-prefix>` (`*` for any run), found 1 field"),
    (f"# ok\n{TEAM_A} teamA- extra\n", "line 2: expected `<token> <run-id-prefix>`"),
    ("short teamA-\n", "line 1: the token is shorter than 16 characters"),
    (f"{TEAM_A}\u00e9 teamA-\n", "line 1: the token is not printable ASCII"),
    (f"{TEAM_A} team/A\n", "line 1: the prefix must be the start of a run id"),
    (f"{TEAM_A} teamA-\n{TEAM_A} teamB-\n", "line 2: the token of line 1 again"),
    ("# nothing but comments\n\n", "has no tokens"),
])
def test_a_bad_line_is_named_by_number_never_by_its_token(tmp_path, text, message):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        CollectorConfig(tokens_file=str(path)).validate()
    assert message in str(info.value) and str(path) in str(info.value)
    assert TEAM_A not in str(info.value)


def test_a_missing_file_and_the_full_token_repeated_are_refused(tmp_path, tokens_file):
    with pytest.raises(ConfigError, match="No such file"):
        Tokens.from_config(None, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="line 3: the full token .* again") as info:
        CollectorConfig(token=TEAM_A, tokens_file=tokens_file).validate()
    assert TEAM_A not in str(info.value)


def test_grants():
    tokens = Tokens([(FULL_TOKEN, FULL), (TEAM_A, Grant("teamA-"))])
    assert tokens.required and tokens.scoped == 1
    assert tokens.grant(FULL_TOKEN) is FULL and tokens.grant(TEAM_A) == Grant("teamA-")
    assert tokens.grant(TEAM_A[:-1]) is None and tokens.grant("") is None
    assert Grant("teamA-").allows("teamA-1") and not Grant("teamA-").allows("teamB-1")
    assert not Tokens([]).required


# --- a real collector -------------------------------------------------------------------------------

def test_a_token_for_another_prefix_is_permission_denied_and_counted(scoped, redis_client):
    error = refused(scoped, ExportRequest(registrations=[registration("teamA-1")], reports=[report(0, "teamA-1")]),
                    TEAM_B)

    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "run 'teamA-1' is outside this token's scope" in error.details()
    assert "runs whose id starts with 'teamB-'" in error.details() and TEAM_B not in error.details()
    assert redis_client.keys("*") == []
    assert scoped.metrics.value("gradwatch_collector_refused_total", reason="permission_denied") == 1
    assert scoped.metrics.value("gradwatch_collector_requests_total", code="PERMISSION_DENIED") == 1


def test_the_agents_exporter_is_refused_for_good(scoped, redis_client):
    exporter = Exporter(scoped.target, token=TEAM_B, timeout_s=5)
    try:
        result = exporter.export(ExportRequest(reports=[report(0, "teamA-1")]))
    finally:
        exporter.shutdown()
    assert not result.ok and not result.retryable and result.code == "PERMISSION_DENIED"
    assert entries(redis_client, "teamA-1") == []
    assert scoped.metrics.value("gradwatch_collector_refused_total", reason="permission_denied") == 1


def test_the_allowed_prefix_is_written(scoped, redis_client):
    response = export(scoped, ExportRequest(registrations=[registration("teamA-1")],
                                            reports=[report(0, "teamA-1"), report(1, "teamA-1")]), TEAM_A)
    assert not response.HasField("partial_success")
    assert len(entries(redis_client, "teamA-1")) == 3
    assert redis_client.zscore(RUNS_KEY, "teamA-1") is not None
    assert scoped.metrics.value("gradwatch_collector_refused_total", reason="permission_denied") == 0


@pytest.mark.parametrize("request_", [
    ExportRequest(reports=[report(0, "teamA-1"), report(0, "teamB-1")]),          # the second report
    ExportRequest(registrations=[registration("teamB-1")], reports=[report(0, "teamA-1")]),  # a registration
    ExportRequest(reports=[report(0, "teamA-1")], snapshots=[snapshot(run_id="teamB-1")]),  # a snapshot
    ExportRequest(reports=[report(0, "teamA-1"), report(0, "teamB-1", tensors=[])]),  # foreign and invalid too
], ids=["report", "registration", "snapshot", "invalid"])
def test_one_foreign_run_anywhere_in_a_batch_refuses_all_of_it(scoped, redis_client, request_):
    error = refused(scoped, request_, TEAM_A)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "'teamB-1'" in error.details()
    assert redis_client.keys("*") == []


def test_snapshot_requests_of_another_teams_run_stay_queued(scoped, redis_client):
    key = snapshot_requests_key("teamA-1")
    redis_client.rpush(key, SnapshotRequest(id="r1", run_id="teamA-1", tensor="fc").SerializeToString())
    refused(scoped, ExportRequest(reports=[report(0, "teamA-1")]), TEAM_B)
    assert redis_client.llen(key) == 1  # not popped into the answer of a job that may not write the run
    response = export(scoped, ExportRequest(reports=[report(0, "teamA-1")]), TEAM_A)
    assert [r.id for r in response.snapshot_requests] == ["r1"] and redis_client.llen(key) == 0


def test_star_and_the_full_token_write_any_run(start_collector, tokens_file, redis_client):
    collector = start_collector(token=FULL_TOKEN, tokens_file=tokens_file)
    export(collector, ExportRequest(reports=[report(0, "teamA-1")]), ANYONE)
    response = export(collector, ExportRequest(reports=[report(0, "other")], snapshots=[snapshot(run_id="teamB-1")]),
                      FULL_TOKEN)
    assert not response.HasField("partial_success")
    assert len(entries(redis_client, "teamA-1")) == 1 and len(entries(redis_client, "other")) == 1
    assert redis_client.hlen(snapshots_key("teamB-1")) == 1


@pytest.mark.parametrize("token", [None, "x" * 32, TEAM_A[:-1]])
def test_without_a_known_token_it_is_unauthenticated(scoped, redis_client, token):
    error = refused(scoped, ExportRequest(reports=[report(0, "teamA-1")]), token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert redis_client.keys("*") == []
    assert scoped.metrics.value("gradwatch_collector_refused_total", reason="unauthenticated") == 1
