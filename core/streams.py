"""The Redis contract between collector and aggregator: key names, entry fields, the alert stream.

Key layout (every key of one run shares the hash tag {run_id}, so Redis Cluster keeps a run on one shard):

  gradwatch:{<run>}:reports        STREAM  one entry per StepReport ({"r": encoded report}) or per
                                           RunRegistration ({"g": encoded registration}); the aggregator
                                           trims what its group acknowledged (XTRIM MINID), the collector's
                                           MAXLEN ~ is a hard cap whose unread losses are counted
                                           (aggregator/ingest/retention.py)
  gradwatch:{<run>}:registrations  HASH    rank -> latest encoded RunRegistration of that rank
  gradwatch:{<run>}:snapshot-requests  LIST  encoded SnapshotRequests the aggregator queued (RPUSH, bounded,
                                           expiring); the collector pops them (LPOP) into Export responses
  gradwatch:{<run>}:snapshots      HASH    "<kind>:<tensor>" -> latest encoded Snapshot the agent sent, expiring
  gradwatch:{<run>}:dead           STREAM  entries of the reports stream the aggregator could not decode or
                                           process (their fields plus dead_error, dead_stream, dead_id),
                                           MAXLEN ~ bounded
  gradwatch:{<run>}:history        HASH    "<step>" / "<step>e" (evaluation) -> the aggregator's StepRecord of
                                           that step (history.proto; aggregator/history.py)
  gradwatch:{<run>}:history-steps  ZSET    the history's fields scored by step, for ranges
  gradwatch:{<run>}:history-10, -100 (+ -steps)  HASH/ZSET  older steps folded into 10- and 100-step buckets
  gradwatch:{<run>}:history-pins   ZSET    steps kept whole with their window (alerts' steps)
  gradwatch:{<run>}:history-generation  STRING  compactions so far: incremented in each fold's MULTI/EXEC, so a
                                           reader that sees it unchanged around its reads saw no row move
  gradwatch:{<run>}:history-ranges HASH    metric -> JSON {"min", "max", "set_at"}: a user's valid range of a metric
                                           (aggregator/ranges.py; the OutOfRange rule)
  gradwatch:{<run>}:layers         HASH    layer name -> the index StepRecords use for it
  gradwatch:{<run>}:lease, :applied        the aggregator's run lease and applied totals (aggregator/ingest/leases.py)
  gradwatch:runs                   ZSET    run id -> unix time the collector last wrote for it
  gradwatch:alerts                 STREAM  one entry per alert transition ({"alert": JSON}, its "run" inside),
                                           MAXLEN ~ bounded

On a Redis Cluster (the shared setting `redis_cluster`; docs/architecture.md#redis-cluster) no command may name
keys of two slots: each names one run's keys, or one of the cross-run keys (gradwatch:runs, gradwatch:alerts),
never both.

Entries hold the bytes the agent encoded: the collector never re-encodes a report. The aggregator's own
coordination keys (gradwatch:{<run>}:lease, :applied, gradwatch:aggregators) belong to its lease mechanism
and are described there (aggregator/ingest/leases.py); their names are here too, so that `run_keys` lists every
key of a run: what `gradwatch runs delete` removes and what retention expires (aggregator/lifecycle.py). A key
function added here must be listed there (tests/core/test_streams.py fails otherwise).
"""

from __future__ import annotations

import re

RUNS_KEY = "gradwatch:runs"
ALERTS_KEY = "gradwatch:alerts"
FIELD_REPORT = b"r"
FIELD_REGISTRATION = b"g"
FIELD_ALERT = b"alert"
AGGREGATOR_GROUP = "gradwatch-aggregator"

RUN_ID_CHARS, RUN_ID_MAX_CHARS = "A-Za-z0-9_.:-", 128
RUN_ID_RE = re.compile(rf"^[{RUN_ID_CHARS}]{{1,{RUN_ID_MAX_CHARS}}}$")
RUN_ID_RULE = f"1-{RUN_ID_MAX_CHARS} characters of [{RUN_ID_CHARS}]"  # what a refusal tells the agent
_NOT_RUN_ID_CHAR = re.compile(rf"[^{RUN_ID_CHARS}]")


# Connection options for every gradwatch Redis client: no optional CLIENT SETINFO or MAINT_NOTIFICATIONS
# handshake, so a least-privilege ACL user (deploy/redis/users.acl) logs no denial per connection.
def quiet_handshake() -> dict:
    from redis.maint_notifications import MaintNotificationsConfig

    return {"driver_info": None, "maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def cluster_url_problem(url: str) -> str | None:
    """Why `url` cannot name a node of a Redis Cluster (`redis_cluster`, shared by collector and aggregator),
    or None. A cluster is reached over TCP and has only database 0; redis-py would refuse both only when it
    connects. Each node hands the client the whole slot map: any one node is enough."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "unix":
        return "a Redis Cluster is reached over TCP: give a redis:// or rediss:// url of a node"
    if parts.path.strip("/") not in ("", "0"):
        return "a Redis Cluster has only database 0"
    return None


def reports_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:reports"


def registrations_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:registrations"


def history_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:history"


def history_steps_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:history-steps"


# The widths of the history's downsampled tiers (aggregator/history.py folds steps into them).
HISTORY_TIERS = (10, 100)


def tier_key(run_id: str, width: int) -> str:
    """The history's buckets of `width` steps (10, 100): bucket -> TierRecord."""
    return f"{history_key(run_id)}-{width}"


def tier_steps_key(run_id: str, width: int) -> str:
    return f"{history_key(run_id)}-{width}-steps"


def history_generation_key(run_id: str) -> str:
    """A counter the history's compaction increments in the transaction that moves rows into buckets: a reader that
    finds it unchanged around its reads saw no row move (aggregator/export/records.py)."""
    return f"{history_key(run_id)}-generation"


def pins_key(run_id: str) -> str:
    return f"{history_key(run_id)}-pins"


def frames_key(run_id: str) -> str:
    """The live view's histogram frames (aggregator/frames.py); under history* for the aggregator's ACL."""
    return f"{history_key(run_id)}-frames"


def ranges_key(run_id: str) -> str:
    """The valid ranges users marked for the run's metrics (aggregator/ranges.py); under history* for the
    aggregator's ACL, which reads and writes them."""
    return f"{history_key(run_id)}-ranges"


def layers_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:layers"


def snapshot_requests_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:snapshot-requests"


def snapshots_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:snapshots"


def dead_letter_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:dead"


def lease_key(run_id: str) -> str:
    """The aggregator replica holding the run (aggregator/ingest/leases.py): expires on its own (PX lease TTL)."""
    return f"gradwatch:{{{run_id}}}:lease"


def applied_key(run_id: str) -> str:
    """What the run's aggregator owners applied and acknowledged (aggregator/ingest/leases.py, retention.py)."""
    return f"gradwatch:{{{run_id}}}:applied"


def durable_keys(run_id: str) -> list[str]:
    """The run's keys that have no expiry of their own: history retention gives them one (aggregator/lifecycle.py).
    Not the lease (its TTL hands the run over when a replica dies), nor the snapshot keys (10 min, 1 h)."""
    tiers = [key for width in HISTORY_TIERS for key in (tier_key(run_id, width), tier_steps_key(run_id, width))]
    return [reports_key(run_id), registrations_key(run_id), dead_letter_key(run_id), history_key(run_id),
            history_steps_key(run_id), *tiers, history_generation_key(run_id), pins_key(run_id), frames_key(run_id),
            ranges_key(run_id), layers_key(run_id), applied_key(run_id)]


def run_keys(run_id: str) -> list[str]:
    """Every key of the run, all under its hash tag, so in one Redis Cluster slot: the durable ones and those that
    expire on their own. Not the cross-run keys (gradwatch:runs, gradwatch:alerts, gradwatch:aggregators)."""
    return [*durable_keys(run_id), lease_key(run_id), snapshot_requests_key(run_id), snapshots_key(run_id)]


# Pending snapshot requests per run, and how long requests and snapshots live in Redis.
MAX_SNAPSHOT_REQUESTS = 16
SNAPSHOT_REQUEST_TTL_MS = 10 * 60 * 1000
SNAPSHOT_TTL_MS = 60 * 60 * 1000


def valid_run_id(run_id: str) -> bool:
    """Run ids become parts of Redis keys and Prometheus label values: keep them short and plain."""
    return bool(RUN_ID_RE.match(run_id))


def run_id_part(text: str, max_chars: int = RUN_ID_MAX_CHARS) -> str:
    """`text` as (part of) a run id: each character the rule refuses becomes "-", then at most max_chars."""
    return _NOT_RUN_ID_CHAR.sub("-", text)[:max_chars]
