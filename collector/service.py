"""The Export RPC: authenticate, admit, split, check each run id against the token's scope, validate, write to
Redis in one round trip, then answer.

The same round trip pops the snapshot requests the aggregator queued for the request's runs
(streams.snapshot_requests_key), which the answer carries to the agent, and stores the snapshots the agent
sent (latest per kind and tensor, streams.snapshots_key).

Requests arrive as raw bytes (no request deserializer), so what lands in Redis is exactly what the agent
encoded. The answer is sent only after Redis accepted the write: a failure is UNAVAILABLE, the agent
retries, and delivery is at-least-once end to end.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import grpc
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from redis.exceptions import RedisClusterException, RedisError

from gradwatch.collector.auth import FULL, Grant, Tokens
from gradwatch.collector.config import CollectorConfig
from gradwatch.collector.telemetry import CollectorMetrics
from gradwatch.collector.validate import registration_problem, report_problem, snapshot_problem
from gradwatch.collector.wire import WireError, split_export
from gradwatch.logs import DedupLog
from gradwatch.rpc import RETRY_INFO_KEY
from gradwatch.streams import (
    FIELD_REGISTRATION,
    FIELD_REPORT,
    MAX_SNAPSHOT_REQUESTS,
    RUNS_KEY,
    SNAPSHOT_TTL_MS,
    registrations_key,
    reports_key,
    snapshot_requests_key,
    snapshots_key,
)
from gradwatch.v1 import ingest_service_pb2
from gradwatch.v1.ingest_service_pb2 import ExportPartialSuccess, ExportResponse
from gradwatch.v1.report_pb2 import StepReport
from gradwatch.v1.run_pb2 import RunRegistration
from gradwatch.v1.snapshot_pb2 import Snapshot, SnapshotRequest

SERVICE_NAME = ingest_service_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name  # from the proto
# Refusal reasons quoted in partial_success.error_message: enough to debug an agent, bounded in size.
MAX_REASONS_IN_MESSAGE = 5
# A Redis outage fails every request: log it once per interval, count the rest.
REDIS_LOG_INTERVAL_S = 10.0
# Retryable refusals carry a google.rpc.RetryInfo (trailer gradwatch.rpc.RETRY_INFO_KEY), as OTLP servers do.
# After a failed Redis write: long enough for a restart or failover to make progress, short enough to catch up.
REDIS_RETRY_AFTER_S = 1.0
# Snapshots per Export call: an agent sends one per request it got, and requests are few (16 per run queued).
MAX_SNAPSHOTS_PER_REQUEST = 64
# A job sending runs outside its token's scope does so at every export: one line per interval and run prefix.
SCOPE_LOG_INTERVAL_S = 60.0

log = logging.getLogger("gradwatch.collector")


class _Refused(Exception):
    """The whole request is refused with a gRPC status (and counted under `reason`)."""

    def __init__(self, code: grpc.StatusCode, reason: str, details: str, retry_after_s: float | None = None):
        super().__init__(details)
        self.code, self.reason, self.details = code, reason, details
        self.retry_after_s = retry_after_s  # push-back: sent as RetryInfo when set

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        if self.retry_after_s is None:
            return ()
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(round(self.retry_after_s * 1e9))
        return ((RETRY_INFO_KEY, info.SerializeToString()),)


class ExportService:
    """Handles Export calls for one grpc.aio server; `rpc_handler()` is what the server registers."""

    def __init__(self, config: CollectorConfig, redis: aioredis.Redis, metrics: CollectorMetrics,
                 clock: Callable[[], float] = time.time, tokens: Tokens | None = None):
        self._config = config
        self._redis = redis
        self._metrics = metrics
        self._clock = clock
        self._inflight_bytes = 0
        # Read here when not given: validate() checked the file, so only a file changed since can fail.
        self._tokens = tokens if tokens is not None else Tokens.from_config(config.token, config.tokens_file)
        self._scope_log = DedupLog(log, SCOPE_LOG_INTERVAL_S)
        self._redis_log = DedupLog(log, REDIS_LOG_INTERVAL_S, suffix=" (%d more since the last message)")
        self._pop_log = DedupLog(log, math.inf)  # a missing ACL permission: said once, reports still flow

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Export": grpc.unary_unary_rpc_method_handler(
                self.export,
                request_deserializer=None,  # raw bytes: stored as encoded, never re-encoded
                response_serializer=ExportResponse.SerializeToString,
            )
        }

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, self.method_handlers())

    async def export(self, request: bytes, context: grpc.aio.ServicerContext) -> ExportResponse:
        started = time.perf_counter()
        self._metrics.received_bytes.inc(len(request))
        # Each outcome is counted before it is answered: whoever sees the answer also sees it counted.
        try:
            response = await self._export(request, context)
        except _Refused as refused:
            self._metrics.refused.labels(reason=refused.reason).inc()
            self._count(refused.code, started)
            await context.abort(refused.code, refused.details, refused.trailing_metadata())
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            self._count(grpc.StatusCode.CANCELLED, started)  # client gone or deadline passed; the agent retries
            raise
        except Exception:
            # Never crash on a request: a bug here is INTERNAL for this call and a log line, not an outage.
            log.exception("Export failed unexpectedly")
            self._count(grpc.StatusCode.INTERNAL, started)
            await context.abort(grpc.StatusCode.INTERNAL, "collector internal error; see the collector log")
            raise
        self._count(grpc.StatusCode.OK, started)
        return response

    def _count(self, code: grpc.StatusCode, started: float) -> None:
        self._metrics.requests.labels(code=code.name).inc()
        self._metrics.request_duration.observe(time.perf_counter() - started)

    async def _export(self, request: bytes, context: grpc.aio.ServicerContext) -> ExportResponse:
        grant = self._authenticate(context)
        size = len(request)
        if self._inflight_bytes + size > self._config.max_inflight_bytes:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "over_limit",
                           "collector over its in-flight byte limit; retry", self._config.retry_after_s)
        self._inflight_bytes += size
        self._metrics.inflight_bytes.set(self._inflight_bytes)
        try:
            return await self._process(request, grant)
        finally:
            self._inflight_bytes -= size
            self._metrics.inflight_bytes.set(self._inflight_bytes)

    def _authenticate(self, context: grpc.aio.ServicerContext) -> Grant:
        """What the request's token allows; without configured tokens, any run (loopback, or opted out)."""
        if not self._tokens.required:
            return FULL
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, credential = (value if isinstance(value, str) else "").partition(" ")
                if scheme.lower() == "bearer":
                    given = credential.strip()
                break
        # Constant-time comparison against every token (auth.Tokens): the timing says nothing about the guess.
        grant = self._tokens.grant(given) if given else None
        if grant is None:
            what = "wrong bearer token" if given else "missing bearer token (metadata authorization: Bearer <token>)"
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", f"{what}; set the agent's token")
        return grant

    def _out_of_scope(self, grant: Grant, what: str, index: int, run_id: str) -> _Refused:
        """The whole request is refused: a job must not write part of its batch into runs it may not write."""
        shown = repr(run_id[:self._config.max_string_bytes])
        self._scope_log.log(logging.WARNING, f"scope:{grant.prefix}", "refused an Export: its token allows %s, "
                            "the request has run %s", grant.shown, shown)
        return _Refused(grpc.StatusCode.PERMISSION_DENIED, "permission_denied",
                        f"{what} {index}: run {shown} is outside this token's scope: it may write only "
                        f"{grant.shown}; name the run to match, or use a token for it")

    async def _process(self, request: bytes, grant: Grant = FULL) -> ExportResponse:
        try:
            raw_registrations, raw_reports, raw_snapshots = split_export(request)
        except WireError as err:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed", f"malformed ExportRequest: {err}") from None
        limit = self._config.max_reports_per_request
        for what, items, most in (("reports", raw_reports, limit), ("registrations", raw_registrations, limit),
                                  ("snapshots", raw_snapshots, MAX_SNAPSHOTS_PER_REQUEST)):
            if len(items) > most:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "too_large",
                               f"request carries {len(items)} {what}, more than the limit of {most}; "
                               "send smaller batches")

        reasons: list[str] = []
        registrations = self._accepted(raw_registrations, RunRegistration, registration_problem, "registration",
                                       reasons, grant)
        reports = self._accepted(raw_reports, StepReport, report_problem, "report", reasons, grant)
        snapshots = self._accepted(raw_snapshots, Snapshot, lambda snap, _, most: snapshot_problem(snap, most),
                                   "snapshot", reasons, grant)
        rejected_registrations = len(raw_registrations) - len(registrations)
        rejected_reports = len(raw_reports) - len(reports)
        rejected_snapshots = len(raw_snapshots) - len(snapshots)
        for reason, count in (("invalid_registration", rejected_registrations), ("invalid_report", rejected_reports),
                              ("invalid_snapshot", rejected_snapshots)):
            if count:
                self._metrics.refused.labels(reason=reason).inc(count)

        response = ExportResponse()
        if registrations or reports or snapshots:
            response.snapshot_requests.extend(await self._write(registrations, reports, snapshots))
            self._metrics.registrations.inc(len(registrations))
            self._metrics.reports.inc(len(reports))
            self._metrics.summaries.inc(sum(len(report.tensors) for report, _ in reports))

        if not reasons:
            return response
        shown = "; ".join(reasons[:MAX_REASONS_IN_MESSAGE])
        if len(reasons) > MAX_REASONS_IN_MESSAGE:
            shown += f"; and {len(reasons) - MAX_REASONS_IN_MESSAGE} more"
        response.partial_success.CopyFrom(ExportPartialSuccess(
            rejected_reports=rejected_reports, rejected_registrations=rejected_registrations,
            rejected_snapshots=rejected_snapshots, error_message=shown))
        return response

    def _accepted(self, raws: list[bytes], message_type, problem, what: str, reasons: list[str],
                  grant: Grant = FULL) -> list:
        """(decoded, raw bytes) of the items that pass; the others' reasons are appended to `reasons`. An item
        of a run outside the token's scope refuses the whole request (PERMISSION_DENIED), valid or not."""
        accepted = []
        for index, raw in enumerate(raws):
            try:
                item = message_type.FromString(raw)
            except Exception as err:  # noqa: BLE001 - any decode failure refuses this item only
                reasons.append(f"{what} {index}: cannot decode ({err or type(err).__name__})")
                continue
            if not grant.allows(item.run_id):
                raise self._out_of_scope(grant, what, index, item.run_id)
            reason = problem(item, self._config.max_tensors_per_report, self._config.max_string_bytes)
            if reason is None:
                accepted.append((item, raw))
            else:
                reasons.append(f"{what} {index}: {reason}")
        return accepted

    async def _write(self, registrations: list[tuple[RunRegistration, bytes]],
                     reports: list[tuple[StepReport, bytes]],
                     snapshots: list[tuple[Snapshot, bytes]] = ()) -> list[SnapshotRequest]:
        """Writes in one round trip; returns the snapshot requests popped for the written runs."""
        # The aggregator trims each stream to what it applied; this cap only bites while no aggregator reads a run,
        # and what it trims unread the aggregator counts and alerts (docs/architecture.md#stream-retention).
        cap, cap_bytes = self._config.stream_maxlen, self._config.stream_max_bytes
        pipe = self._redis.pipeline(transaction=False)
        runs: set[str] = set()
        # Registrations first: the aggregator then knows a run's tensor names before its first report.
        for reg, raw in registrations:
            pipe.hset(registrations_key(reg.run_id), str(reg.rank), raw)
            pipe.xadd(reports_key(reg.run_id), {FIELD_REGISTRATION: raw}, maxlen=stream_cap(cap, cap_bytes, raw),
                      approximate=True)
            runs.add(reg.run_id)
        for report, raw in reports:
            pipe.xadd(reports_key(report.run_id), {FIELD_REPORT: raw}, maxlen=stream_cap(cap, cap_bytes, raw),
                      approximate=True)
            runs.add(report.run_id)
        for snap, raw in snapshots:
            key = snapshots_key(snap.run_id)
            pipe.hset(key, f"{snap.kind}:{snap.tensor}", raw)  # the latest per (kind, tensor) replaces the last
            pipe.pexpire(key, SNAPSHOT_TTL_MS)
        now = self._clock()
        for run_id in runs:
            pipe.zadd(RUNS_KEY, {run_id: now})
        # Piggybacked: the pops cost no round trip. A request popped for an answer the agent never gets is
        # lost, and the user asks again (snapshots are pictures, not data).
        popped = sorted(runs | {snap.run_id for snap, _ in snapshots})
        for run_id in popped:
            pipe.lpop(snapshot_requests_key(run_id), MAX_SNAPSHOT_REQUESTS)
        try:
            async with asyncio.timeout(self._config.redis_timeout_s):
                results = await pipe.execute(raise_on_error=False)
            writes = results[:len(results) - len(popped)]
            failed = next((r for r in writes if isinstance(r, Exception)), None)
            if failed is not None:
                raise failed
        # RedisClusterException: a cluster client that reaches no node to learn the slot map from (not a RedisError).
        except (RedisError, RedisClusterException, OSError, TimeoutError) as err:
            self._metrics.redis_errors.inc()
            self._redis_log.log(logging.WARNING, "write",
                                "redis write failed: %s; answering UNAVAILABLE so agents retry", err)
            detail = str(err) or type(err).__name__
            raise _Refused(grpc.StatusCode.UNAVAILABLE, "redis_error", f"redis write failed: {detail}; retry",
                           REDIS_RETRY_AFTER_S) from None
        finally:
            await pipe.reset()
        return self._requests(results[len(results) - len(popped):])

    def _requests(self, popped: list) -> list[SnapshotRequest]:
        requests = []
        for result in popped:
            if isinstance(result, Exception):  # e.g. an ACL from before snapshots: reports still flow
                self._metrics.redis_errors.inc()
                self._pop_log.log(logging.WARNING, "pop", "cannot pop snapshot requests (%s); reports still flow. "
                                  "Does the collector's Redis user lack the snapshot keys of deploy/redis/users.acl?",
                                  result)
                continue
            for raw in result or ():
                try:
                    requests.append(SnapshotRequest.FromString(raw))
                except Exception:  # noqa: BLE001 - a garbled request is skipped, never fatal
                    self._metrics.redis_errors.inc()
        return requests


def stream_cap(entries: int, max_bytes: int, raw: bytes) -> int:
    """The `MAXLEN ~` of one entry: stream_maxlen, or fewer where entries this size would pass stream_max_bytes
    (an entry's bytes in Redis: its payload plus about 100 of stream overhead)."""
    return max(1, min(entries, max_bytes // (len(raw) + 100)))
