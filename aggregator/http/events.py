"""Server-sent events: their encoding, and one client's bounded queue of them, the bridge between the live
view's hub (a thread, live.py) and the client's answer (a task on the HTTP port's event loop)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque

STREAM_QUEUE = 8  # events waiting for a slow client; beyond it the oldest go, a resync is asked


def sse(event: str, data: dict) -> bytes:
    body = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return f"event: {event}\ndata: {body}\n\n".encode()


class EventStream:
    """One client's queue of encoded events: the hub's thread puts, the client's answer on the event loop
    takes. A client slower than the hub loses the oldest events and is told to fetch everything again."""

    def __init__(self, run: str | None, loop: asyncio.AbstractEventLoop):
        self.run = run
        self._loop = loop
        self._events: deque[bytes] = deque()
        self._lock = threading.Lock()  # held for a few appends only: never blocks the loop
        self._wake = asyncio.Event()  # set on the loop's thread only (asyncio.Event is not thread-safe)
        self.closed = False

    def put(self, event: bytes) -> None:
        with self._lock:
            if len(self._events) >= STREAM_QUEUE:
                self._events.clear()
                self._events.append(sse("resync", {}))
            self._events.append(event)
        self._notify()

    async def take(self, timeout: float) -> list[bytes] | None:
        """The waiting events (maybe none after `timeout`); None once the hub has closed the stream."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass
        self._wake.clear()
        with self._lock:
            events, self._events = list(self._events), deque()
        return None if self.closed and not events else events

    def close(self) -> None:
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:
            pass  # the loop is closed: the server has stopped and nobody reads this stream any more
