"""`gradwatch runs list|compare|delete`: runs side by side, read from the aggregator's JSON API; and a run's data
deleted from Redis.

compare shows one column per run: hyperparameters and labels (from the runs' registrations), step,
training and validation loss, accuracy-like scalars of both phases, learning rate, gradient norm and
the firing alerts with their rules, so a sweep shows which trials diverged and why. Fields the
aggregator does not send (an older one) show as "-".

delete talks to Redis itself (aggregator/lifecycle.py), not to the aggregator: it needs a Redis user allowed to
UNLINK the run's keys, ZREM from gradwatch:runs and XDEL from gradwatch:alerts (the `admin` user of
deploy/redis/users.acl). Its Redis is the one `gradwatch up` uses: --redis-url, else GRADWATCH_REDIS_URL, else
the embedded Redis that `gradwatch up` runs with the data dir (--data-dir, GRADWATCH_UP_DATA_DIR, `.gradwatch`),
else the components' default.
"""

from __future__ import annotations

import json
import math
import sys
import urllib.error
import urllib.parse
import urllib.request

from gradwatch.cli.stack import DEFAULT_AGGREGATOR_METRICS_LISTEN

DEFAULT_URL = f"http://{DEFAULT_AGGREGATOR_METRICS_LISTEN}"
TIMEOUT_S = 5.0
MISSING = "-"


class ApiError(RuntimeError):
    """The aggregator could not answer; the message is one line for the command line."""


class RunNotFound(ApiError):
    pass


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if "://" in url else f"http://{url}"


def get(url: str, path: str) -> dict:
    """The `data` of a JSON API answer. Raises ApiError (RunNotFound for a 404)."""
    full = base_url(url) + path
    try:
        with urllib.request.urlopen(full, timeout=TIMEOUT_S) as resp:
            doc = json.load(resp)
    except urllib.error.HTTPError as e:
        try:
            message = json.load(e).get("error") or e.reason
        except (ValueError, OSError):
            message = e.reason
        raise (RunNotFound if e.code == 404 else ApiError)(f"{full}: HTTP {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ApiError(f"cannot reach the aggregator at {base_url(url)} ({reason}); is gradwatch up? "
                       f"(--url)") from None
    except ValueError:
        raise ApiError(f"{full}: not a JSON answer; is {base_url(url)} a gradwatch aggregator?") from None
    if not isinstance(doc, dict) or doc.get("status") != "success" or not isinstance(doc.get("data"), dict):
        raise ApiError(f"{full}: unexpected answer {str(doc)[:200]}")
    return doc["data"]


def list_runs(url: str) -> list[dict]:
    return list(get(url, "/api/v1/runs").get("runs") or [])


def run_detail(url: str, run: str) -> dict:
    return get(url, "/api/v1/runs/" + urllib.parse.quote(run, safe=""))


def fmt(value: object) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _accuracy_like(scalars: dict) -> list[str]:
    return [k for k in scalars if "acc" in k.lower()]


def alert_rules(detail: dict) -> list[str]:
    """The rules of a run's firing alerts, in the aggregator's order, without repeats."""
    out: list[str] = []
    for a in detail.get("alerts") or []:
        rule = str(a.get("rule", "?"))
        if rule not in out:
            out.append(rule)
    return out


def compare_rows(details: list[dict]) -> list[tuple[str, list[str]]]:
    """(field, one value per run) rows: hyperparameters, labels, progress, losses, scalars, alerts."""
    def union(key: str, pick=lambda d: d) -> list[str]:
        names: list[str] = []
        for d in details:
            for k in pick(d.get(key) or {}):
                if k not in names:
                    names.append(k)
        return sorted(names)

    rows: list[tuple[str, list[str]]] = []
    for name in union("hyperparameters"):
        rows.append((name, [fmt((d.get("hyperparameters") or {}).get(name)) for d in details]))
    for name in union("labels"):
        rows.append((f"label {name}", [fmt((d.get("labels") or {}).get(name)) for d in details]))
    rows.append(("step", [fmt(d.get("step")) for d in details]))
    rows.append(("loss", [fmt(d.get("loss")) for d in details]))
    rows.append(("eval loss", [fmt(d.get("eval_loss")) for d in details]))
    for key, label in (("scalars", ""), ("eval_scalars", "eval ")):
        for name in union(key, _accuracy_like):
            rows.append((f"{label}{name}", [fmt((d.get(key) or {}).get(name)) for d in details]))
    rows.append(("learning rate", [fmt(d.get("learning_rate")) for d in details]))
    rows.append(("grad norm", [fmt(d.get("grad_norm")) for d in details]))
    rows.append(("firing alerts", [fmt(d.get("firing_alerts", len(d.get("alerts") or []))) for d in details]))
    rows.append(("rules", [", ".join(alert_rules(d)) or MISSING for d in details]))
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


def compare_table(details: list[dict]) -> str:
    return table(["run", *[str(d.get("run", "?")) for d in details]],
                 [[name, *values] for name, values in compare_rows(details)])


def list_table(runs: list[dict]) -> str:
    header = ["run", "step", "loss", "eval loss", "learning rate", "grad norm", "steps/s", "firing alerts"]
    return table(header, [[str(r.get("run", "?")), *(fmt(r.get(k)) for k in (
        "step", "loss", "eval_loss", "learning_rate", "grad_norm", "steps_per_second", "firing_alerts"))]
        for r in runs])


def main_list(url: str, as_json: bool = False, out=None) -> int:
    out = out or sys.stdout
    runs = list_runs(url)
    if as_json:
        print(json.dumps(runs, indent=2), file=out)
    elif not runs:
        print(f"no runs at {base_url(url)}", file=out)
    else:
        print(list_table(runs), file=out)
    return 0


def main_compare(url: str, runs: list[str], as_json: bool = False, out=None, err=None) -> int:
    """Print the runs side by side; exit status 1 when one of them is unknown (the others are shown)."""
    out, err = out or sys.stdout, err or sys.stderr
    details, missing = [], []
    for run in runs:
        try:
            details.append(run_detail(url, run))
        except RunNotFound:
            missing.append(run)
    for run in missing:
        print(f"gradwatch runs compare: no run {run!r} at {base_url(url)} (see gradwatch runs list)", file=err)
    if as_json:
        print(json.dumps(details, indent=2), file=out)
    elif details:
        print(compare_table(details), file=out)
    return 1 if missing else 0


def redis_failure(me: str, e: Exception, shown: str, where: str, denied: str) -> str:
    """The one line a command that talks to Redis directly prints for a Redis error: `denied` says what the user
    lacked and which user to take instead."""
    import redis

    if isinstance(e, redis.exceptions.NoPermissionError):
        return f"{me}: the Redis user of {shown} may not {denied} ({e})"
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
        return (f"{me}: cannot reach Redis at {shown or 'the given URL'} ({where or '--redis-url'}): {e}; is gradwatch "
                f"up running? (--redis-url, --data-dir)")
    return f"{me}: Redis at {shown}: {e}"


def redis_target(redis_url: str | None = None, data_dir: str | None = None,
                 cluster: bool | None = None) -> tuple[str, str, bool]:
    """(url, where it came from, whether it names a Redis Cluster node) of the Redis `gradwatch up` uses, in the
    order the module docstring gives; `cluster` None: the shared GRADWATCH_REDIS_CLUSTER (never for the embedded
    Redis, as `gradwatch up` does)."""
    from dataclasses import fields

    from gradwatch import endpoints
    from gradwatch.aggregator.config import AggregatorConfig
    from gradwatch.cli.stack import StackConfig, embedded_redis_url
    from gradwatch.settings import read_env

    if cluster is None:
        others = [f.name for f in fields(AggregatorConfig) if f.name != "redis_cluster"]
        cluster = bool(read_env(AggregatorConfig, skip=others).get("redis_cluster", False))
    if redis_url:
        return redis_url, "--redis-url", cluster
    cfg = StackConfig.from_env(data_dir=data_dir)  # GRADWATCH_REDIS_URL and the data dir's variables
    if cfg.redis_url:
        return cfg.redis_url, StackConfig.env_name("redis_url"), cluster
    embedded = embedded_redis_url(cfg.data_dir)
    if embedded:
        return embedded, f"the embedded Redis of gradwatch up, data in {cfg.data_dir}", False
    return endpoints.REDIS_URL, f"the default: no gradwatch up is running with data in {cfg.data_dir}", cluster


def _confirm(prompt: str, stdin, err) -> bool:
    print(prompt, end="", file=err, flush=True)
    return stdin.readline().strip().lower() in ("y", "yes")


def main_delete(run: str, redis_url: str | None = None, cluster: bool | None = None, data_dir: str | None = None,
                force: bool = False, yes: bool = False, out=None, err=None, stdin=None) -> int:
    """Deletes everything Redis holds of `run` after a confirmation (unless `yes`); 0 when deleted, 1 when refused
    or failed, 2 when no one could be asked."""
    import redis
    from redis.cluster import RedisCluster

    from gradwatch.aggregator import lifecycle
    from gradwatch.aggregator.ingest.client import REDIS_ERRORS
    from gradwatch.collector.config import redact_url
    from gradwatch.streams import ALERTS_KEY, RUNS_KEY, quiet_handshake

    out, err, stdin = out or sys.stdout, err or sys.stderr, stdin or sys.stdin
    me = "gradwatch runs delete"
    url, where, cluster = redis_target(redis_url, data_dir, cluster)
    shown = redact_url(url)
    options = dict(socket_timeout=10, socket_connect_timeout=5, **quiet_handshake())
    client = None
    try:
        client = RedisCluster.from_url(url, **options) if cluster else redis.Redis.from_url(url, **options)
        data = lifecycle.inspect_run(client, run)
        if data.empty:
            print(f"{me}: no run {run!r} in Redis at {shown} ({where}): no key, no entry in {RUNS_KEY}, no "
                  f"alert", file=err)
            return 1
        age = data.age_s()
        if not force and age is not None and age < lifecycle.ACTIVE_S:
            print(f"{me}: {lifecycle.RunActive(run, age, lifecycle.ACTIVE_S)} (--force)", file=err)
            return 1
        last = "never indexed" if age is None else f"last report {lifecycle.ago(age)}"
        held = f", followed by aggregator {data.held_by}" if data.held_by else ""
        print(f"run {run} in Redis at {shown} ({where}): {last}{held}", file=out)
        for key in data.keys:
            print(f"  {key}", file=out)
        print(f"  {len(data.alerts)} entries of {ALERTS_KEY}", file=out)
        if not yes:
            if not stdin.isatty():
                print(f"{me}: not deleting without a confirmation: stdin is not a terminal; pass --yes", file=err)
                return 2
            if not _confirm(f"Delete run {run!r}? This cannot be undone. [y/N] ", stdin, err):
                print(f"{me}: nothing deleted", file=err)
                return 1
        done = lifecycle.delete_run(client, run, force=force)
    except lifecycle.RunActive as e:  # it reported between the look and the deletion
        print(f"{me}: {e} (--force)", file=err)
        return 1
    except REDIS_ERRORS as e:
        print(redis_failure(me, e, shown, where, f"delete the run: use a user allowed to UNLINK the run's keys, "
                            f"ZREM from {RUNS_KEY} and XDEL from {ALERTS_KEY}, such as the admin user of "
                            f"deploy/redis/users.acl (--redis-url redis://admin:PASSWORD@HOST:PORT/0)"), file=err)
        return 1
    finally:
        if client is not None:
            client.close()
    print(f"deleted run {run}: {len(done['keys'])} keys, {done['alerts']} alerts"
          + (f", its entry in {RUNS_KEY}" if done["index"] else ""), file=out)
    return 0
