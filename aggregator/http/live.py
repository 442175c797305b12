"""The live view's server side: the frames of each run's log2 histograms over time (the "update
animation" of a tensor), and a hub that samples the aggregator's view once a tick and pushes compact
updates to a bounded number of server-sent-event streams.

Frames are references to applied reports' summaries (never mutated), within a fixed budget of summaries
over all runs; a long run keeps frames spread over all of it, ever more thinly. A multi-rank step's merged
summaries would hold every rank's whole report, so a kept frame gets copies of its own (aggregator/frames.py
`detached`, in `settle`, outside the aggregator's lock): the budget is then what frames hold.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from gradwatch.aggregator.alerts.record import Alert
from gradwatch.aggregator.frames import detached
from gradwatch.aggregator.http.events import EventStream, sse
from gradwatch.aggregator.http.metrics import AggregatorView
from gradwatch.aggregator.http.views import layer_stats, num
from gradwatch.aggregator.report import KIND_NAMES
from gradwatch.aggregator.runstate import RunView
from gradwatch.logs import DedupLog

log = logging.getLogger("gradwatch.aggregator.http.live")

DEFAULT_TICK_S = 1.0
DEFAULT_MAX_STREAMS = 16       # concurrent event streams; each holds a connection and a task
MAX_FRAMES = 256               # histogram frames per run
MIN_FRAMES = 8
PERSIST_GAP = 8  # steps at least between two frames written to Redis (aggregator/frames.py says why)
FRAME_SUMMARY_BUDGET = 200_000  # summaries referenced by all frames of all runs together
MAX_STEP_ROWS = 500            # new steps per update
# Changed layers per update (about 100 bytes each): a larger model's changes go over the following ticks.
MAX_UPDATE_LAYERS = 2500


class _RunFrames:
    __slots__ = ("frames", "latest", "stride", "size", "added", "removed", "changed", "persisted", "fresh")

    def __init__(self) -> None:
        self.frames: list[tuple[int, dict]] = []  # (step, kind -> [(meta, summary)]), every stride-th step
        self.latest: tuple[int, dict] | None = None  # the newest report, until it becomes a frame
        self.stride = 1
        self.size = 0  # summaries in one frame (the latest report's)
        # Not yet in Redis (aggregator/frames.py): frames kept, steps thinned out, whether anything changed.
        self.added: list[tuple[int, dict]] = []
        self.removed: list[int] = []
        self.changed = False
        self.persisted = -PERSIST_GAP  # the step of the latest frame written to Redis
        self.fresh: list[tuple[int, dict]] = []  # frames kept since the last settle(): not detached yet


class FrameStore:
    """Histogram frames of every run, one per training report while they fit: when a run holds its share
    of the budget, every other frame goes and only every 2^k-th step is kept from then on, so the frames
    always span the whole run. Thread-safe: the consumer adds, HTTP threads read.

    What changed is taken by the consumer (`take_changes`) and written to Redis with the history
    (aggregator/frames.py); `load` reads the frames of a run this store does not hold from there."""

    def __init__(self, budget: int = FRAME_SUMMARY_BUDGET, max_frames: int = MAX_FRAMES,
                 load: Callable[[str], list[tuple[int, dict]]] | None = None):
        self.budget = budget
        self.max_frames = max_frames
        self.load = load
        self._runs: dict[str, _RunFrames] = {}
        self._lock = threading.Lock()

    def add(self, run: str, step: int, tensors: dict) -> None:
        if not tensors:
            return
        with self._lock:
            rf = self._runs.get(run)
            if rf is None:
                rf = self._runs[run] = _RunFrames()
            newest = rf.latest or (rf.frames[-1] if rf.frames else None)
            if newest is not None and step <= newest[0]:
                return  # a redelivery, or a step before the newest: frames stay in step order
            rf.size = _summaries(tensors)
            if not rf.frames or step - rf.frames[-1][0] >= rf.stride:
                rf.frames.append((step, tensors))
                rf.fresh.append((step, tensors))
                if step - rf.persisted >= PERSIST_GAP:  # Redis keeps every PERSIST_GAP-th step at least
                    rf.added.append((step, tensors))
                    rf.persisted = step
                rf.changed = True
                rf.latest = None
            else:
                rf.latest = (step, tensors)
            share = self.budget // max(1, len(self._runs)) // max(1, rf.size)
            cap = max(MIN_FRAMES, min(self.max_frames, share))
            while len(rf.frames) > cap:
                gone = {s for s, _ in rf.frames[1::2]}
                rf.frames = rf.frames[::2]
                rf.stride *= 2
                added = {a for a, _ in rf.added}
                rf.removed += [s for s in gone if s not in added]
                rf.added = [(s, t) for s, t in rf.added if s not in gone]

    def settle(self) -> None:
        """Detaches the frames kept since the last call from the reports they came from (aggregator/frames.py
        `detached`; a 2,000-layer, 64-rank step takes ~0.4 s): without a lock held while it works, so the consumer
        calls it (through take_changes) after releasing the aggregator's lock."""
        with self._lock:
            todo = []
            for rf in self._runs.values():
                if rf.fresh:
                    kept = {id(t) for _, t in rf.frames}  # what the thinning took since is not worth the work
                    todo.append((rf, [f for f in rf.fresh if id(f[1]) in kept]))
                    rf.fresh = []
        for rf, fresh in todo:
            done = {id(t): d for _, t in fresh if (d := detached(t)) is not t}  # `fresh` keeps the ids unique
            if done:
                with self._lock:
                    rf.frames = [(s, done.get(id(t), t)) for s, t in rf.frames]
                    rf.added = [(s, done.get(id(t), t)) for s, t in rf.added]

    def take_changes(self) -> dict[str, tuple[int, list[tuple[int, dict]], list[int]]]:
        """run -> (stride, frames kept, steps thinned out) since the last call: for Redis. The frames kept are
        settled first."""
        self.settle()
        out = {}
        with self._lock:
            for run, rf in self._runs.items():
                if rf.changed:
                    out[run] = (rf.stride, rf.added, rf.removed)
                    rf.added, rf.removed, rf.changed = [], [], False
        return out

    def restore(self, run: str, stride: int, frames: list[tuple[int, dict]]) -> None:
        """A run taken over or found again: its frames as Redis kept them, before any new one."""
        with self._lock:
            rf = self._runs.get(run)
            if frames and (rf is None or not rf.frames):
                rf = self._runs[run] = _RunFrames()
                rf.frames, rf.stride = list(frames), max(1, stride)
                rf.persisted = frames[-1][0]
                rf.size = _summaries(frames[-1][1])

    def get(self, run: str) -> list[tuple[int, dict]]:
        with self._lock:
            rf = self._runs.get(run)
            if rf is not None:
                return rf.frames + ([rf.latest] if rf.latest else [])
        if self.load is None:
            return []
        try:  # a run not followed here (finished, another replica's): as Redis has it, not kept
            return self.load(run)
        except Exception as e:  # Redis away: the frames are missing from this answer, not an error of the API
            log.warning("cannot read the frames of %s: %s", run, e)
            return []

    def forget(self, run: str) -> None:
        with self._lock:
            self._runs.pop(run, None)

    def runs(self) -> set[str]:
        with self._lock:
            return set(self._runs)


class LiveHub:
    """Samples `view()` every `tick_s` on a named daemon thread: records histogram frames and sends
    updates to the open event streams. `stop()` is idempotent and ends every stream."""

    def __init__(self, view: Callable[[], AggregatorView],
                 history: Callable[[str, int | None, int | None, int], list[dict] | None] | None = None,
                 tick_s: float = DEFAULT_TICK_S, max_streams: int = DEFAULT_MAX_STREAMS,
                 frames: FrameStore | None = None):
        self.view = view
        self.history = history
        self.tick_s = tick_s
        self.max_streams = max_streams
        # The consumer's store, fed with every report; else frames sampled here, one per tick.
        self.frame_store = frames if frames is not None else FrameStore()
        self._sample_frames = frames is None
        self._streams: set[EventStream] = set()
        self._lock = threading.Lock()  # streams: the event loop opens and closes them, the hub's thread writes
        self._sent: dict[str, dict] = {}  # run -> what the streams were last told: step, layers, alerts
        # Streams opened since the last tick: their runs (and the run list) are sent whole at the next one. A page
        # loads the run through the API and then connects: what changed in between reaches it only this way.
        self._opened: set[str | None] = set()
        self._runs_sent: list | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = DedupLog(log)

    def start(self) -> LiveHub:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gradwatch-live", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with self._lock:
            streams, self._streams = list(self._streams), set()
        for s in streams:
            s.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- streams ------------------------------------------------------------------------------------

    def open(self, run: str | None) -> EventStream | None:
        """A new stream for `run` (None: the run list only), read on the calling event loop; None when
        max_streams are open or the hub is stopping."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._stop.is_set() or len(self._streams) >= self.max_streams:
                return None
            stream = EventStream(run, loop)
            self._streams.add(stream)
            self._opened.add(run)
            return stream

    def close(self, stream: EventStream) -> None:
        with self._lock:
            self._streams.discard(stream)
        stream.close()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # -- the tick -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:  # the live view must never take the metrics port down
                self._errors.log(logging.ERROR, "tick", "live view update failed; continuing", exc_info=True)

    def tick(self) -> None:
        snap = self.view()
        runs = {r.run: r for r in snap.runs}
        if self._sample_frames:
            for run in self.frame_store.runs() - set(runs):
                self.frame_store.forget(run)
            for run in snap.runs:
                if run.step >= 0:
                    self.frame_store.add(run.run, run.step, run.tensors)
            self.frame_store.settle()
        with self._lock:
            streams = list(self._streams)
            opened, self._opened = self._opened, set()
        if opened:
            self._runs_sent = None
            for run in opened:
                self._sent.pop(run, None)
        for run in [r for r in self._sent if r not in runs]:
            del self._sent[run]
        if not streams:
            self._sent.clear()  # a stream opened later fetches everything first
            self._runs_sent = None
            return
        firing: dict[str, list[Alert]] = {}
        for a in snap.firing:
            firing.setdefault(a.run, []).append(a)
        overview = [[r.run, r.step, r.loss, len(firing.get(r.run, ()))] for r in snap.runs]
        if overview != self._runs_sent:
            self._runs_sent = overview
            event = sse("runs", {"runs": [{"run": r.run, "step": r.step if r.step >= 0 else None,
                                           "loss": num(r.loss), "last_report_time": r.last_report_time,
                                           "firing_alerts": len(firing.get(r.run, ()))}
                                          for r in snap.runs]})
            for s in streams:
                s.put(event)
        wanted = {s.run for s in streams if s.run is not None}
        for run in wanted:
            found = runs.get(run)
            update = self._update(found, firing.get(run, [])) if found is not None else None
            if update is None:
                continue
            event = sse("update", update)
            for s in streams:
                if s.run == run:
                    s.put(event)

    def _update(self, run: RunView, firing: list[Alert]) -> dict | None:
        """What changed in `run` since the last tick (at most MAX_UPDATE_LAYERS layers and MAX_STEP_ROWS new
        steps; layers left out are marked `more_layers` and follow at the next tick): None when nothing did."""
        sent = self._sent.setdefault(run.run, {"step": None, "row": None, "layers": {}, "alerts": None,
                                               "behind": False})
        alerts = sorted(a.to_json() for a in firing)
        # A multi-rank run's step moves with its first rank's report, its per-layer figures and history row when
        # the join closes the step: either is news.
        mark = (run.step, run.joined.step if run.joined is not None else None)
        if mark == sent["step"] and alerts == sent["alerts"] and not sent["behind"]:
            return None
        told = sent["layers"]
        changed: dict[str, dict] = {}
        behind = False
        for name, v in layer_stats(run).items():
            if told.get(name) != v:
                if len(changed) == MAX_UPDATE_LAYERS:
                    behind = True  # the rest goes with the next tick's update
                    break
                changed[name] = v
        rows: list[dict] = []
        if self.history is not None and mark != sent["step"]:
            # After the last row sent, not the last step: a multi-rank run's rows are its joined steps,
            # which come after the step its latest report moved to.
            first = None if sent["row"] is None else sent["row"] + 1
            for row in self.history(run.run, first, None, MAX_STEP_ROWS) or ():
                rows.append({"step": row["step"], "time": row["time"], "phase": row["phase"],
                             "loss": num(row["loss"]), "grad_norm": num(row["grad_norm"]),
                             "scalars": {k: num(v) for k, v in row.get("scalars", {}).items()}})
        update = {"run": run.run, "step": run.step if run.step >= 0 else None, "loss": num(run.loss),
                  "eval_loss": num(run.eval_loss), "grad_norm": num(run.grad_norm),
                  "learning_rate": num(run.learning_rate), "steps_per_second": num(run.steps_per_second),
                  "layers": changed, "steps": rows}
        if behind:
            update["more_layers"] = True
        if alerts != sent["alerts"]:
            update["alerts"] = [a.to_dict() for a in firing]
        told.update(changed)
        sent.update(step=mark, alerts=alerts, behind=behind, row=rows[-1]["step"] if rows else sent["row"])
        return update

    # -- histogram frames ---------------------------------------------------------------------------

    def frames(self, run: str, tensor: str, kind: str, first: int | None = None) -> list[dict]:
        """The log2 histograms of one tensor over time, oldest first: [{step, offset, counts, nonfinite}]
        (bucket offset + i holds floor(log2|x|) = offset + i - 40)."""
        out = []
        for step, tensors in self.frame_store.get(run):
            if first is not None and step < first:
                continue
            for k, group in tensors.items():
                if KIND_NAMES.get(k) != kind:
                    continue
                for meta, s in group:
                    if meta.name != tensor:
                        continue
                    bad = s.nan_count + s.inf_count
                    if s.histogram or bad:
                        counts = list(s.histogram)
                        lo = next((i for i, c in enumerate(counts) if c), 0)
                        hi = max((i for i, c in enumerate(counts) if c), default=-1)
                        out.append({"step": step, "offset": s.histogram_offset + lo, "counts": counts[lo:hi + 1],
                                    "nonfinite": bad})
                    break
        return out


def _summaries(tensors: dict) -> int:
    return sum(len(g) for g in tensors.values())
