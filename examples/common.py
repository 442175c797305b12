"""What the examples share: a whole gradwatch stack on this machine (embedded Redis, aggregator, collector,
on free ports, with the examples' rule settings), a tail of the alert stream that prints every alert as it
fires, and reads of the aggregator's JSON API.

Every example is a script (`python examples/NAME.py`) that exits 0 when what it demonstrates happened;
`--json FILE` also writes what it saw, for tests/examples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

import gradwatch
from gradwatch.cli.redis_server import free_port
from gradwatch.cli.runs import ApiError, get
from gradwatch.cli.stack import Stack, StackConfig
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT

RULES = Path(__file__).with_name("rules.toml")
ALERT_WAIT_S = 20.0  # generous: a loaded 2-core CI machine must not make an example flaky


class AlertTail(threading.Thread):
    """Reads the gradwatch:alerts stream from its start; prints each alert as it arrives."""

    def __init__(self, redis_url: str, out=sys.stdout):
        super().__init__(name="gradwatch-example-alerts", daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.out = out
        self.alerts: list[dict] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def run(self) -> None:
        last = b"0-0"
        while not self._stopping.is_set():
            try:
                entries = self.client.xread({ALERTS_KEY: last}, block=200, count=100)
            except redis.RedisError:
                time.sleep(0.2)
                continue
            for _, items in entries:
                for entry_id, fields in items:
                    last = entry_id
                    alert = json.loads(fields[FIELD_ALERT])
                    with self._lock:
                        self.alerts.append(alert)
                    mark = "ALERT" if alert.get("status") == "firing" else "resolved"
                    print(f"  >>> {mark} [{alert.get('severity')}] {alert.get('rule')} run {alert.get('run')} step "
                          f"{alert.get('step')}, layer {alert.get('layer')}: {alert.get('summary')}", file=self.out,
                          flush=True)

    def fired(self, run: str, rules: set[str] | None = None) -> list[dict]:
        """The firing alerts of a run seen so far (of these rules)."""
        with self._lock:
            return [a for a in self.alerts if a.get("run") == run and a.get("status") == "firing"
                    and (rules is None or a.get("rule") in rules)]

    def wait_for(self, run: str, rules: set[str], timeout: float = ALERT_WAIT_S) -> list[dict]:
        """Wait until every one of `rules` fired for `run` (or the timeout); returns the run's firing alerts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not rules <= {a["rule"] for a in self.fired(run)}:
            time.sleep(0.1)
        return self.fired(run)

    def stop(self) -> None:
        self._stopping.set()
        self.join(2)
        self.client.close()


class Local:
    """The running stack, as an example uses it."""

    def __init__(self, stack: Stack, alerts: AlertTail):
        self.stack = stack
        self.alerts = alerts
        self.collector = stack.config.collector_listen
        self.api = f"http://{stack.config.aggregator_metrics_listen}"

    def watch(self, model, optimizer=None, **kwargs):
        return gradwatch.watch(model, optimizer, collector=self.collector, **kwargs)

    def get(self, path: str) -> dict:
        return get(self.api, path)

    def run(self, run: str) -> dict:
        return self.get("/api/v1/runs/" + urllib.parse.quote(run, safe=""))

    def wait_step(self, run: str, step: int, timeout: float = ALERT_WAIT_S) -> dict:
        """The run as the aggregator has it once it applied `step` (reports are applied in order, and the
        rules judge each report as it is applied: after this, the run's alerts are decided)."""
        deadline = time.monotonic() + timeout
        seen = None
        while True:
            try:
                detail = self.run(run)
                seen = detail.get("step")
                if seen is not None and seen >= step:
                    return detail
            except ApiError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"the aggregator did not apply step {step} of run {run} within {timeout:.0f}s "
                                   f"(it is at step {seen})")
            time.sleep(0.1)

    def firing(self, run: str) -> list[dict]:
        """The run's firing alerts, as the API has them now."""
        return self.get("/api/v1/alerts?run=" + urllib.parse.quote(run, safe=""))["alerts"]

    def metric(self, family: str, **labels) -> float | None:
        """A sample of the aggregator's /metrics."""
        with urllib.request.urlopen(f"{self.api}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith(family + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return None


@contextmanager
def local_stack(rules: Path | None = RULES, out=sys.stdout) -> Iterator[Local]:
    """A whole stack on free ports, its Redis data in a temporary directory, gone afterwards."""
    # The examples start many runs of a few seconds: the aggregator looks for new runs five times a second
    # (default: once), or a short run's first alert waits for it.
    os.environ.setdefault("GRADWATCH_AGGREGATOR_DISCOVER_INTERVAL_S", "0.2")
    with tempfile.TemporaryDirectory(prefix="gradwatch-example-") as tmp:
        cfg = StackConfig(data_dir=tmp, collector_listen=f"127.0.0.1:{free_port()}",
                          collector_metrics_listen=f"127.0.0.1:{free_port()}",
                          aggregator_metrics_listen=f"127.0.0.1:{free_port()}",
                          rules=str(rules) if rules else None, log_level="ERROR")
        print("starting gradwatch (embedded redis, aggregator, collector)...", file=out, flush=True)
        with Stack(cfg) as stack:
            alerts = AlertTail(stack.redis_url, out)
            alerts.start()
            try:
                yield Local(stack, alerts)
            finally:
                alerts.stop()


def arguments(doc: str | None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="also write what happened to this file")
    args = parser.parse_args()
    # Models this small run fastest on one thread; a second one spin-waits for a core that the stack's
    # processes (or a busy CI machine) hold, and can make a step 40x slower.
    torch.set_num_threads(1)
    return args


def finish(args: argparse.Namespace, ok: bool, result: dict, why: str = "") -> int:
    """Write the result (--json), say whether the example showed what it meant to; the exit status."""
    if args.json is not None:
        args.json.write_text(json.dumps({"ok": ok, **result}, indent=2, default=str))
    print(f"\nOK: {why}" if ok else f"\nFAILED: {why}", flush=True)
    return 0 if ok else 1
