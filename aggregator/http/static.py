"""The live view's files (aggregator/http/ui): found only inside that folder, served with their content type,
an ETag, gzip where the client takes it, and cache headers (vendored libraries for a day, the page's
own files revalidated on every load, so an upgrade shows at once)."""

from __future__ import annotations

import gzip
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

UI_DIR = Path(__file__).resolve().parent / "ui"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
COMPRESSIBLE = {".html", ".js", ".css", ".svg", ".txt"}
# Only what the page loads: never node_modules, package files or the build script.
SERVED_DIRS = {(), ("vendor",)}
MAX_CACHED_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    gzipped: bytes | None
    content_type: str
    etag: str
    cache_control: str


class StaticFiles:
    """Keeps each file in memory, compressed once; a file changed on disk (a developer's edit) is read
    again."""

    def __init__(self, root: Path = UI_DIR):
        self.root = root.resolve()
        self._cache: dict[str, tuple[int, StaticFile]] = {}  # relative path -> (mtime ns, file)
        self._lock = threading.Lock()

    def get(self, relative: str) -> StaticFile | None:
        """The file at `relative` (a URL path below /ui/, "" for the page), or None when there is none or
        the path leaves the folder."""
        relative = relative or "index.html"
        parts = tuple(relative.split("/"))
        if any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
            return None
        if parts[:-1] not in SERVED_DIRS:
            return None
        suffix = Path(parts[-1]).suffix
        if suffix not in CONTENT_TYPES:
            return None
        path = self.root.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        mtime = path.stat().st_mtime_ns
        with self._lock:
            cached = self._cache.get(relative)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        body = path.read_bytes()
        gzipped = gzip.compress(body, 6, mtime=0) if suffix in COMPRESSIBLE and len(body) > 1024 else None
        cache = "public, max-age=86400" if parts[0] == "vendor" else "no-cache"
        item = StaticFile(body, gzipped, CONTENT_TYPES[suffix], f'"{hashlib.sha256(body).hexdigest()[:20]}"', cache)
        with self._lock:
            self._cache.pop(relative, None)
            if sum(len(f.body) + len(f.gzipped or b"") for _, f in self._cache.values()) < MAX_CACHED_BYTES:
                self._cache[relative] = (mtime, item)
        return item

    def warm(self) -> None:
        """Reads and compresses every served file now, so the first page load does not wait for it."""
        for parts in SERVED_DIRS:
            folder = self.root.joinpath(*parts)
            for path in sorted(folder.iterdir()) if folder.is_dir() else ():
                if path.is_file():
                    self.get("/".join((*parts, path.name)))
