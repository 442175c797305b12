"""`gradwatch grafana push` against a small real HTTP server standing in for Grafana: the requests
grafana-client makes (paths, auth header, bodies) and the answers to errors."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gradwatch.cli import grafana
from gradwatch.cli.main import main

UIDS = ["gradwatch-run-overview", "gradwatch-layers", "gradwatch-activations", "gradwatch-histograms",
        "gradwatch-runs-compared", "gradwatch-ingest"]


class FakeGrafana:
    """Records every request; answers GET /api/folders/<uid> from `folders`, POSTs with 200 (or the
    status queued in `fail`)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.folders: set[str] = set()
        self.fail: int | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _record(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                request = {"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"),
                           "body": body}
                fake.requests.append(request)
                return request

            def do_GET(self):
                request = self._record()
                uid = request["path"].removeprefix("/api/folders/")
                if request["path"].startswith("/api/folders/") and uid in fake.folders:
                    self._answer(200, {"uid": uid, "title": uid})
                else:
                    self._answer(404, {"message": "folder not found"})

            def do_POST(self):
                request = self._record()
                if fake.fail:
                    self._answer(fake.fail, {"message": "invalid API key"})
                elif request["path"] == "/api/folders":
                    fake.folders.add(request["body"]["uid"])
                    self._answer(200, {"uid": request["body"]["uid"], "title": request["body"]["title"]})
                elif request["path"] == "/api/dashboards/db":
                    uid = request["body"]["dashboard"]["uid"]
                    self._answer(200, {"status": "success", "uid": uid, "url": f"/d/{uid}", "version": 1})
                else:
                    self._answer(404, {"message": "not found"})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="fake-grafana",
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_grafana():
    fake = FakeGrafana()
    yield fake
    fake.close()


def test_push_creates_the_folder_then_uploads_every_dashboard(fake_grafana, capsys):
    assert main(["grafana", "push", "--url", fake_grafana.url, "--token", "glsa_secret"]) == 0
    requests = fake_grafana.requests
    assert [(r["method"], r["path"]) for r in requests] == [
        ("GET", "/api/folders/gradwatch"), ("POST", "/api/folders"),
        *[("POST", "/api/dashboards/db")] * len(UIDS)]
    assert {r["auth"] for r in requests} == {"Bearer glsa_secret"}
    assert requests[1]["body"] == {"title": "gradwatch", "uid": "gradwatch"}
    uploads = [r["body"] for r in requests[2:]]
    assert [u["dashboard"]["uid"] for u in uploads] == UIDS
    expected = grafana.dashboards()
    for upload in uploads:
        assert upload["folderUid"] == "gradwatch" and upload["overwrite"] is True
        assert upload["dashboard"] == expected[f"{upload['dashboard']['uid']}.json"]  # no id, no version
        assert "id" not in upload["dashboard"]
    out = capsys.readouterr().out
    assert f"pushed gradwatch-layers: {fake_grafana.url}/d/gradwatch-layers" in out


def test_push_into_an_existing_folder_from_committed_files_with_basic_auth(fake_grafana, kit, capsys):
    fake_grafana.folders.add("ml")
    url = fake_grafana.url.replace("http://", "http://admin:s3cret@")
    assert main(["grafana", "push", "--url", url, "--folder-uid", "ml",
                 "--from", str(kit.DEPLOY / "grafana" / "dashboards")]) == 0
    requests = fake_grafana.requests
    assert [(r["method"], r["path"]) for r in requests][:2] == [("GET", "/api/folders/ml"),
                                                                ("POST", "/api/dashboards/db")]
    assert {r["auth"] for r in requests} == {"Basic " + base64.b64encode(b"admin:s3cret").decode()}
    assert sorted(r["body"]["dashboard"]["uid"] for r in requests[1:]) == sorted(UIDS)
    assert {r["body"]["folderUid"] for r in requests[1:]} == {"ml"}
    assert "s3cret" not in capsys.readouterr().out  # the URL is printed without its credentials


def test_token_from_the_environment(fake_grafana, monkeypatch):
    monkeypatch.setenv("GRAFANA_TOKEN", "from-env")
    assert main(["grafana", "push", "--url", fake_grafana.url]) == 0
    assert {r["auth"] for r in fake_grafana.requests} == {"Bearer from-env"}


def test_refused_upload_is_a_clear_error(fake_grafana, capsys):
    fake_grafana.folders.add("gradwatch")
    fake_grafana.fail = 401
    assert main(["grafana", "push", "--url", fake_grafana.url, "--token", "wrong"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gradwatch grafana push:") and "401" in err
