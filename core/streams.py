"""The Redis contract between collector and aggregator: key names, entry fields, the alert stream.

Key layout (every key of one run shares the hash tag {run_id}, so Redis Cluster keeps a run on one shard):

  gradwatch:{<run>}:reports        STREAM  one entry per StepReport ({"r": encoded report}) or per
                                           RunRegistration ({"g": encoded registration}), MAXLEN ~ bounded
  gradwatch:{<run>}:registrations  HASH    rank -> latest encoded RunRegistration of that rank
  gradwatch:{<run>}:snapshot-requests  LIST  encoded SnapshotRequests the aggregator queued (RPUSH, bounded,
                                           expiring); the collector pops them (LPOP) into Export responses
  gradwatch:{<run>}:snapshots      HASH    "<kind>:<tensor>" -> latest encoded Snapshot the agent sent, expiring
  gradwatch:runs                   ZSET    run id -> unix time the collector last wrote for it
  gradwatch:alerts                 STREAM  one entry per alert transition ({"alert": JSON}), MAXLEN ~ bounded

Entries hold the bytes the agent encoded: the collector never re-encodes a report.
"""

from __future__ import annotations

import re

RUNS_KEY = "gradwatch:runs"
ALERTS_KEY = "gradwatch:alerts"
FIELD_REPORT = b"r"
FIELD_REGISTRATION = b"g"
FIELD_ALERT = b"alert"
AGGREGATOR_GROUP = "gradwatch-aggregator"

RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


# Connection options for every gradwatch Redis client: no optional CLIENT SETINFO or MAINT_NOTIFICATIONS
# handshake, so a least-privilege ACL user (deploy/redis/users.acl) logs no denial per connection.
def quiet_handshake() -> dict:
    from redis.maint_notifications import MaintNotificationsConfig

    return {"driver_info": None, "maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def reports_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:reports"


def registrations_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:registrations"


def snapshot_requests_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:snapshot-requests"


def snapshots_key(run_id: str) -> str:
    return f"gradwatch:{{{run_id}}}:snapshots"


# Pending snapshot requests per run, and how long requests and snapshots live in Redis.
MAX_SNAPSHOT_REQUESTS = 16
SNAPSHOT_REQUEST_TTL_MS = 10 * 60 * 1000
SNAPSHOT_TTL_MS = 60 * 60 * 1000


def valid_run_id(run_id: str) -> bool:
    """Run ids become parts of Redis keys and Prometheus label values: keep them short and plain."""
    return bool(RUN_ID_RE.match(run_id))
