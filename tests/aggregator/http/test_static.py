"""The live view's files: found only inside aggregator/http/ui, with content types, ETags, gzip and cache
headers, over a real HTTP port."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from email.message import Message

import pytest
from prometheus_client import CollectorRegistry

from gradwatch.aggregator.http.metrics import AggregatorView
from gradwatch.aggregator.http.server import serve
from gradwatch.aggregator.http.static import UI_DIR, StaticFiles


@pytest.fixture(scope="module")
def base():
    server, thread = serve("127.0.0.1", 0, CollectorRegistry(), AggregatorView, poll_s=0.02)
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def request(url: str, headers: dict | None = None, follow: bool = True) -> tuple[int, Message, bytes]:
    opener = urllib.request.build_opener(*([] if follow else [NoRedirect()]))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
            return resp.status, resp.headers, resp.read()  # header names: any case
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_root_and_ui_redirect_to_the_page(base):
    for path in ("/", "/ui"):
        status, headers, _ = request(base + path, follow=False)
        assert status == 302 and headers["Location"] == "/ui/"
    status, headers, body = request(base + "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'src="app.js"' in body and b"vendor/echarts.min.js" in body


def test_files_carry_types_etags_and_cache_headers(base):
    status, headers, body = request(f"{base}/ui/app.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache" and headers["X-Content-Type-Options"] == "nosniff"
    assert body == (UI_DIR / "app.js").read_bytes()
    status, again, body = request(f"{base}/ui/app.js", {"If-None-Match": headers["ETag"]})
    assert status == 304 and body == b"" and again["ETag"] == headers["ETag"]
    status, headers, body = request(f"{base}/ui/vendor/echarts.min.js", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip" and headers["Cache-Control"].endswith("86400")
    assert gzip.decompress(body) == (UI_DIR / "vendor" / "echarts.min.js").read_bytes()
    assert request(f"{base}/ui/favicon.svg")[1]["Content-Type"] == "image/svg+xml"


@pytest.mark.parametrize("path", ["/ui/../api.py", "/ui/%2e%2e/api.py", "/ui/..%2fapi.py", "/ui/vendor/../../api.py",
                                  "/ui/package.json", "/ui/build.sh", "/ui/node_modules/echarts/package.json",
                                  "/ui/.gitignore", "/ui/nope.js", "/ui//etc/passwd", "/ui/vendor/",
                                  "/ui/vendor/LICENSE-echarts.txt/x"])
def test_nothing_outside_the_page_is_served(base, path):
    status, headers, _ = request(base + path)
    assert status == 404 and headers["Content-Type"] == "application/json"


def test_a_changed_file_is_read_again(tmp_path):
    (tmp_path / "index.html").write_text("one")
    files = StaticFiles(tmp_path)
    assert files.get("").body == b"one"
    (tmp_path / "index.html").write_text("two!")
    assert files.get("index.html").body == b"two!"
    (tmp_path / "secret.py").write_text("x")
    assert files.get("secret.py") is None  # no content type for it: never served
