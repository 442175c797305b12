"""`gradwatch grafana generate|check|push`: the dashboards of dashboards.py as committed JSON files
(deploy/grafana/dashboards, drift-checked in CI) and their upload to a Grafana with grafana-client."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# In a checkout (editable install) the repository's folder, wherever the command runs; else relative.
_CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
DEFAULT_DIR = _CHECKOUT_DIR if _CHECKOUT_DIR.is_dir() else Path("deploy/grafana/dashboards")
DEFAULT_FOLDER_UID = "gradwatch"
DEFAULT_FOLDER_TITLE = "gradwatch"


def dashboards() -> dict[str, dict]:
    """file name -> dashboard JSON model, freshly generated."""
    from gradwatch.cli.dashboards import DASHBOARDS, render

    return {f"{uid}.json": render(build) for uid, build in DASHBOARDS.items()}


def encode(model: dict) -> str:
    return json.dumps(model, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generate(out_dir: Path = DEFAULT_DIR) -> list[Path]:
    """Writes every dashboard, removes JSON files of dashboards that no longer exist; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fresh = dashboards()
    for stale in set(p.name for p in out_dir.glob("*.json")) - set(fresh):
        (out_dir / stale).unlink()
    written = []
    for name, model in fresh.items():
        path = out_dir / name
        path.write_text(encode(model))
        written.append(path)
    return written


def drift(out_dir: Path = DEFAULT_DIR) -> list[str]:
    """File names whose committed JSON differs from what the code generates (missing and extra included)."""
    fresh = {name: encode(model) for name, model in dashboards().items()}
    committed = {p.name: p.read_text() for p in out_dir.glob("*.json")} if out_dir.is_dir() else {}
    return sorted(name for name in set(fresh) | set(committed) if fresh.get(name) != committed.get(name))


@dataclass
class PushResult:
    folder_uid: str
    dashboards: list[str]  # uids uploaded


def push(url: str, token: str | None, models: list[dict], folder_uid: str = DEFAULT_FOLDER_UID,
         folder_title: str = DEFAULT_FOLDER_TITLE, timeout_s: float = 10.0) -> PushResult:
    """Creates the folder if it is missing, then uploads every dashboard into it, overwriting older
    versions (POST /api/dashboards/db). token: a service-account token (Bearer), or None to use the
    user:password of the URL."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(url, credential=token or None, timeout=timeout_s)
    try:
        api.folder.get_folder(folder_uid)
    except GrafanaClientError as err:
        if err.status_code != 404:
            raise
        api.folder.create_folder(folder_title, uid=folder_uid)
    uploaded = []
    for model in models:
        body = {key: value for key, value in model.items() if key not in ("id", "version")}
        api.dashboard.update_dashboard({"dashboard": body, "folderUid": folder_uid, "overwrite": True,
                                        "message": "gradwatch grafana push"})
        uploaded.append(model["uid"])
    return PushResult(folder_uid, uploaded)


def expressions(model: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and Prometheus annotation of a dashboard JSON model."""
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    found.append((f"{panel.get('title')} [{target.get('refId')}]", target["expr"]))
            walk(panel.get("panels") or [])

    walk(model.get("panels") or [])
    for annotation in model.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append((f"annotation {annotation.get('name')}", annotation["expr"]))
    return found


def substitute(expr: str, values: dict[str, str], rate_interval: str = "1m") -> str:
    """PromQL with Grafana's template variables replaced (what Grafana sends for those values)."""
    values = {"__rate_interval": rate_interval, "__interval": rate_interval, **values}

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for template variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def main_generate(out_dir: Path, check: bool) -> int:
    if check:
        stale = drift(out_dir)
        if stale:
            print(f"gradwatch grafana: out of date in {out_dir}: {', '.join(stale)}\n"
                  f"  regenerate with: gradwatch grafana generate", flush=True)
            return 1
        print(f"gradwatch grafana: {out_dir} is up to date")
        return 0
    for path in generate(out_dir):
        print(f"wrote {path}")
    return 0


def main_push(url: str, token: str | None, folder_uid: str, from_dir: Path | None) -> int:
    if from_dir is not None:
        models = [json.loads(p.read_text()) for p in sorted(from_dir.glob("*.json"))]
    else:
        models = list(dashboards().values())
    result = push(url, token, models, folder_uid=folder_uid)
    shown = urlsplit(url)
    shown = f"{shown.scheme}://{shown.hostname}{f':{shown.port}' if shown.port else ''}{shown.path.rstrip('/')}"
    for uid in result.dashboards:
        print(f"pushed {uid}: {shown}/d/{uid} (folder {result.folder_uid})")  # without credentials of the URL
    return 0
