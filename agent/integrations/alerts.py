"""A run's alerts as the aggregator's query API has them, and the decision the tuner integrations (optuna.py,
ray_tune.py) take on them: stop a trial once an alert of chosen rules fired for its run.

Two reads, both GET, with the aggregator's read token as `Authorization: Bearer` where one is given:

    /api/v1/runs/{run}          the step the aggregator has applied and judged, and the alerts firing now
                                (one consistent view: a report's alerts are decided when its step shows)
    /api/v1/runs/{run}/alerts   the run's transitions from the alert stream, resolved ones too: an alert
                                that fired and resolved between two looks

StopOnAlerts, the decision shared by the Optuna pruner and the Ray Tune stopper: wait (at most wait_s) until the
aggregator has judged the trial's last reported step, then match the run's firing alerts by rule; when more
than one step was judged since the last look, the transitions too. An alert found is final. The aggregator
out of reach or refusing: no stop, one warning, counted in `errors`; gave up waiting: counted in `late`.

Only the standard library: this runs in the training job, which has the agent's dependencies only.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from gradwatch import endpoints

DEFAULT_URL = f"http://{endpoints.AGGREGATOR}"
TOKEN_ENV = "GRADWATCH_AGGREGATOR_READ_TOKEN"  # the token the aggregator is given is the one to send it
TIMEOUT_S = 5.0
FIRING = "firing"
DEFAULT_RULES = ("ExplodingGradient", "NonFinite")
DEFAULT_WAIT_S = 5.0
POLL_S = 0.01  # between two reads of the run while waiting for the aggregator: a local HTTP GET each

log = logging.getLogger("gradwatch.agent")

_watchers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # run -> its Watcher in this process


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


def watching(run: str, watcher) -> None:
    """Note the run's watcher as living in this process: a decision on the run flushes it first (watch_trial)."""
    _watchers[run] = watcher


def sentence(alert: dict) -> str:
    """An alert as the reason a trial stopped."""
    return f"gradwatch: {alert.get('rule')} at step {alert.get('step')}: {alert.get('summary')}"


class StopOnAlerts:
    """The decision of a pruner or stopper: whether an alert of `rules` fired for a trial's run."""

    def __init__(self, rules: Iterable[str] = DEFAULT_RULES, *, url: str | None = None, token: str | None = None,
                 wait_s: float = DEFAULT_WAIT_S, acting: str = "stopping"):
        """rules: the alert rules that stop; url: the aggregator's HTTP address (default 127.0.0.1:4772); token:
        its read token (default $GRADWATCH_AGGREGATOR_READ_TOKEN); wait_s: how long a decision waits for the
        aggregator to judge the trial's latest report (0: never); acting: what the warnings call it."""
        self.rules = frozenset(rules)
        if not self.rules:
            raise ValueError("rules: name at least one alert rule, e.g. ExplodingGradient")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.reader = AlertReader(url, token)
        self.wait_s = wait_s
        self.errors = 0  # looks that failed: the aggregator unreachable or refusing
        self.late = 0  # looks that gave up waiting for the aggregator after wait_s
        self._acting = acting
        self._lock = threading.Lock()
        self._alerts: dict[str, dict] = {}  # run -> the alert that stopped it
        self._judged: dict[str, int] = {}  # run -> the aggregator's step at the last look
        self._runs: dict[Hashable, str] = {}  # trial (the tuner's key) -> its run, for _alert_of()
        self._warned: set[str] = set()

    def __getstate__(self) -> dict:  # picklable without its lock: Ray Tune saves its run config, stopper included
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _decide(self, trial: Hashable, run: str, step: int | None = None) -> dict | None:
        """The alert of `rules` that fired for the trial's run, or None. `step`: the step of the run's last report
        that has left for the collector, waited for (at most wait_s) before looking; without one, the run's
        watcher in this process, if any, is flushed and its last reported step waited for."""
        with self._lock:
            self._runs[trial] = run
            if run in self._alerts:
                return self._alerts[run]
        try:
            found = self._look(run, step)
        except AggregatorError as e:
            self.errors += 1
            self._warn(str(e), f"gradwatch: cannot ask the aggregator about run {run!r} (no {self._acting} on "
                               f"its alerts meanwhile): {e}")
            return None
        if found is not None:
            with self._lock:
                found = self._alerts.setdefault(run, found)
        return found

    def _alert_of(self, trial: Hashable) -> dict | None:
        """The alert that stopped the trial (the aggregator's JSON: rule, step, layer, summary, ...), or None."""
        with self._lock:
            return self._alerts.get(self._runs.get(trial, ""))

    def _look(self, run: str, step: int | None) -> dict | None:
        deadline = time.monotonic() + self.wait_s
        target = step if self.wait_s > 0 else None
        if target is None and self.wait_s > 0 and (watcher := _watchers.get(run)) is not None:
            watcher.flush(self.wait_s)  # every step made so far leaves for the collector
            target = watcher.reported_step
        state = self.reader.run(run)
        while target is not None and (state.step is None or state.step < target) and not self._match(state.firing):
            if time.monotonic() >= deadline:
                self.late += 1
                self._warn("late", f"gradwatch: the aggregator had not judged step {target} of run {run!r} within "
                                   f"{self.wait_s:g} s (wait_s); {self._acting} decisions may lag")
                break
            time.sleep(POLL_S)
            state = self.reader.run(run)
        if (found := self._match(state.firing)) is not None or state.step is None:
            return found
        # Judged since the last look: more than one report, so an alert may have fired and resolved in between.
        last = self._judged.get(run)
        self._judged[run] = state.step
        if last is None or state.step - last > 1:
            return self._match([a for a in self.reader.transitions(run) if a.get("status") == FIRING])
        return None

    def _match(self, alerts: list[dict]) -> dict | None:
        chosen = [a for a in alerts if a.get("rule") in self.rules]
        return min(chosen, key=lambda a: a.get("step", 0)) if chosen else None

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)
