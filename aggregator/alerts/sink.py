"""Where alert transitions go: the gradwatch:alerts stream (synchronously, before the entries that
raised them are acked), the log, and Alertmanager and a webhook when configured (asynchronously)."""

from __future__ import annotations

import logging
import time

import redis

from gradwatch.aggregator.alerts.alertmanager import AlertmanagerPusher
from gradwatch.aggregator.alerts.record import FIRING, Alert
from gradwatch.aggregator.alerts.webhook import WebhookPusher
from gradwatch.aggregator.config import AggregatorConfig
from gradwatch.aggregator.counters import Counters
from gradwatch.streams import ALERTS_KEY, FIELD_ALERT

log = logging.getLogger("gradwatch.aggregator.alerts.sink")


class AlertSink:
    def __init__(self, client: redis.Redis, config: AggregatorConfig, counters: Counters):
        self.client = client
        self.maxlen = config.alert_stream_maxlen
        self.counters = counters
        self.pusher: AlertmanagerPusher | None = None
        if config.alertmanager_url:
            self.pusher = AlertmanagerPusher(
                config.alertmanager_url, counters,
                generator_url=config.generator_url or config.metrics_url(),
                timeout_s=config.alertmanager_timeout_s, retries=config.alertmanager_retries,
                queue_size=config.alertmanager_queue_size, resend_s=config.alertmanager_resend_s)
        self.webhook: WebhookPusher | None = None
        if config.webhook_url:
            self.webhook = WebhookPusher(config.webhook_url, counters, token=config.webhook_token,
                                         timeout_s=config.webhook_timeout_s, retries=config.webhook_retries,
                                         queue_size=config.webhook_queue_size)

    def write(self, alerts: list[Alert]) -> None:
        """XADDs every transition in one round trip; raises redis.RedisError so the caller retries
        before it acks. Only then are they logged, counted and handed to Alertmanager and the webhook."""
        if not alerts:
            return
        pipe = self.client.pipeline(transaction=False)
        for alert in alerts:
            pipe.xadd(ALERTS_KEY, {FIELD_ALERT: alert.to_json()}, maxlen=self.maxlen, approximate=True)
        pipe.execute()
        for alert in alerts:
            if alert.status == FIRING:
                self.counters.add_alert(alert.rule)
                log.warning("alert firing: %s run=%s layer=%s step=%d rank=%d severity=%s: %s", alert.rule,
                            alert.run, alert.layer, alert.step, alert.rank, alert.severity, alert.summary)
            else:
                log.info("alert resolved: %s run=%s layer=%s step=%d", alert.rule, alert.run, alert.layer,
                         alert.step)
            if self.pusher is not None:
                self.pusher.enqueue(alert)
            if self.webhook is not None:
                self.webhook.enqueue(alert)

    def forget(self, run: str) -> None:
        if self.pusher is not None:
            self.pusher.forget(run)

    def _pushers(self) -> list:
        return [p for p in (self.pusher, self.webhook) if p is not None]

    def force_flush(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True
        for p in self._pushers():
            ok = p.force_flush(None if deadline is None else max(0.0, deadline - time.monotonic())) and ok
        return ok

    def shutdown(self, timeout: float = 5.0) -> None:
        for p in self._pushers():
            p.begin_shutdown()  # both stop retrying at once; then each gets what is left of the budget
        deadline = time.monotonic() + timeout
        for p in self._pushers():
            p.shutdown(max(0.0, deadline - time.monotonic()))
