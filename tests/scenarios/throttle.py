"""A TCP link of limited bandwidth between a process and Redis: a proxy on 127.0.0.1 whose replies (upstream to
client) pass at most `rate` bytes per second over all its connections, what the client sends unthrottled.

Scenario tests make an aggregator slower than the collectors with it: its reads of the report streams then take
entry bytes / rate however fast the machine is, while its HTTP server answers every scrape (a SIGSTOPped process
answers none, and Prometheus would mark its series stale). `rate = None` lifts the limit at once.
"""

from __future__ import annotations

import asyncio
import threading
import time

CHUNK = 16 << 10  # small chunks: the client's every recv returns within its socket timeout however slow the link


class ThrottledLink:
    """`with ThrottledLink(host, port) as link:` then point the client at `link.port`; set `link.rate`."""

    def __init__(self, upstream_host: str, upstream_port: int, rate: float | None = None):
        self.upstream = (upstream_host, upstream_port)
        self.rate = rate  # bytes per second, None: unlimited (read by the proxy's loop at every chunk)
        self.port = 0
        self.relayed = 0  # bytes sent to clients
        self._free_at = 0.0  # monotonic time the link is free again (one bucket for every connection)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="throttled-link")
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> ThrottledLink:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the throttled link did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pump(client_r, upstream_w, throttled=False),
                             self._pump(upstream_r, client_w, throttled=True), return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, throttled: bool) -> None:
        try:
            while chunk := await reader.read(CHUNK):
                rate = self.rate
                if throttled and rate:
                    now = time.monotonic()
                    start = max(now, self._free_at)
                    self._free_at = start + len(chunk) / rate
                    await asyncio.sleep(self._free_at - now)
                writer.write(chunk)
                await writer.drain()
                if throttled:
                    self.relayed += len(chunk)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
