"""Posts every alert transition to a generic webhook as JSON: the same object the gradwatch:alerts
stream holds (Alert.to_dict()), one per POST, with an optional bearer token. The queue, timeouts and
retries are push.JsonPusher's; the consumer never waits on the receiver."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from gradwatch.aggregator.alerts.push import JsonPusher, dumps
from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.counters import Counters

log = logging.getLogger("gradwatch.aggregator.alerts.webhook")


class WebhookPusher(JsonPusher):
    max_batch = 1  # receivers (chat bots, ticket systems) expect one event per request

    def __init__(self, url: str, counters: Counters, *, token: str | None = None, timeout_s: float = 5.0,
                 retries: int = 3, queue_size: int = 1_000):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        parts = urlsplit(url)
        # Only scheme and host in log lines: the path of a Slack-style webhook is its secret.
        super().__init__(url, counters, "webhook", log, thread_name="gradwatch-webhook", timeout_s=timeout_s,
                         retries=retries, queue_size=queue_size, headers=headers,
                         shown_as=f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}")

    def encode(self, batch: list[dict]) -> bytes:
        (body,) = batch
        return dumps(body)

    def enqueue(self, alert: Alert) -> None:
        body = alert.to_dict()
        with self._lock:
            self.put(body)
        self._wake.set()
