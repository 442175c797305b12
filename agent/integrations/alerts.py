"""A run's alerts as the aggregator's query API has them, read by the tuner integrations (optuna.py).

Two reads, both GET, with the aggregator's read token as `Authorization: Bearer` where one is given:

    /api/v1/runs/{run}          the step the aggregator has applied and judged, and the alerts firing now
                                (one consistent view: a report's alerts are decided when its step shows)
    /api/v1/runs/{run}/alerts   the run's transitions from the alert stream, resolved ones too: an alert
                                that fired and resolved between two looks

Only the standard library: this runs in the training job, which has the agent's dependencies only.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from gradwatch import endpoints

DEFAULT_URL = f"http://{endpoints.AGGREGATOR}"
TOKEN_ENV = "GRADWATCH_AGGREGATOR_READ_TOKEN"  # the token the aggregator is given is the one to send it
TIMEOUT_S = 5.0
FIRING = "firing"


class AggregatorError(RuntimeError):
    """The aggregator did not answer as it should: unreachable, a refused token, not a gradwatch aggregator."""


@dataclass
class RunAlerts:
    """What the aggregator says of one run: the step it has judged (None: it does not know the run yet) and its
    firing alerts, oldest first."""

    step: int | None
    firing: list[dict] = field(default_factory=list)


class AlertReader:
    def __init__(self, url: str | None = None, token: str | None = None, timeout_s: float = TIMEOUT_S):
        """url: the aggregator's HTTP address (default 127.0.0.1:4772); token: its read token (default
        $GRADWATCH_AGGREGATOR_READ_TOKEN; none: reads are open, as on a loopback port without one)."""
        url = (url or DEFAULT_URL).rstrip("/")
        self.url = url if "://" in url else f"http://{url}"
        self._token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout_s = timeout_s

    def __repr__(self) -> str:  # never the token
        return f"AlertReader({self.url!r})"

    def run(self, run: str) -> RunAlerts:
        data = self._get(f"/api/v1/runs/{urllib.parse.quote(run, safe='')}")
        if data is None:
            return RunAlerts(None)
        firing = [a for a in data.get("alerts") or [] if isinstance(a, dict) and a.get("status", FIRING) == FIRING]
        return RunAlerts(data.get("step"), firing)

    def transitions(self, run: str) -> list[dict]:
        """The run's alert transitions, firing and resolved, oldest first."""
        data = self._get(f"/api/v1/runs/{urllib.parse.quote(run, safe='')}/alerts")
        return [a for a in (data or {}).get("alerts") or [] if isinstance(a, dict)]

    def _get(self, path: str) -> dict | None:
        """The answer's `data`; None for a 404 (an unknown run)."""
        request = urllib.request.Request(self.url + path, headers={"Accept": "application/json"})
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                doc = json.load(resp)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            why = {401: f"the read token was refused or is missing ({TOKEN_ENV}, token=)",
                   403: "refused"}.get(e.code, e.reason)
            raise AggregatorError(f"{self.url}{path}: HTTP {e.code}: {why}") from None
        except (urllib.error.URLError, OSError) as e:
            raise AggregatorError(f"cannot reach the aggregator at {self.url} ({getattr(e, 'reason', e)})") from None
        except ValueError:
            raise AggregatorError(f"{self.url}{path}: not a JSON answer; is it a gradwatch aggregator?") from None
        if not isinstance(doc, dict) or doc.get("status") != "success" or not isinstance(doc.get("data"), dict):
            raise AggregatorError(f"{self.url}{path}: unexpected answer {str(doc)[:200]}")
        return doc["data"]
