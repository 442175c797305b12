"""Creates gradwatch's credentials in Kubernetes, filling in only what is missing; the Job gradwatch-secrets
(secrets.yaml) runs it with the gradwatch image's Python at every `kubectl apply` it is recreated by.

    Secret            keys                                   read by
    gradwatch-tokens  agent-token                            the collector (GRADWATCH_TOKEN) and the agents
                      collector-read-token                   the collector's /metrics, Prometheus
                      aggregator-read-token                  the aggregator's API, live view and /metrics, Prometheus
                      aggregator-api-token                   the aggregator's one write (snapshot requests)
    gradwatch-redis   one key per `user NAME on` line of     Redis (redis/aclfile.sh hashes them into its ACL
                      users.acl, holding that user's password  file) and each component, as its own user

Every value is 32 random bytes in hex: printable, no spaces, nothing to escape in a URL. A value that exists is
never changed, so bringing your own is creating the Secret (or some of its keys) before the first apply; an
empty value counts as missing. Standard library only; it talks to the API server with the pod's service
account (a Role that may create Secrets and read and patch these two only).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TOKENS_SECRET = "gradwatch-tokens"
TOKEN_KEYS = ("agent-token", "collector-read-token", "aggregator-read-token", "aggregator-api-token")
REDIS_SECRET = "gradwatch-redis"
LABELS = {"app.kubernetes.io/part-of": "gradwatch", "app.kubernetes.io/managed-by": "gradwatch-secrets"}
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Another writer between our read and our write (a second Job, a person) answers 409: read again and retry.
ATTEMPTS = 5
TIMEOUT_S = 10.0


def redis_users(acl_text: str) -> list[str]:
    """The users that log in: every `user NAME on ...` line of a Redis ACL file."""
    users = []
    for line in acl_text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "user" and words[2] == "on":
            users.append(words[1])
    return users


def new_value() -> str:
    return secrets.token_hex(32)


class Api:
    """The few calls to the API server's Secrets that this needs; (status, JSON body) back, errors included."""

    def __init__(self, base_url: str, token: str, namespace: str, context: ssl.SSLContext | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.namespace = namespace
        self.context = context

    def call(self, method: str, name: str | None = None, body: dict | None = None,
             content_type: str = "application/json") -> tuple[int, dict]:
        path = f"/api/v1/namespaces/{self.namespace}/secrets" + (f"/{name}" if name else "")
        request = urllib.request.Request(self.base_url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=self.context) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            try:
                return err.code, json.load(err)
            except ValueError:
                return err.code, {}


def ensure(api: Api, name: str, keys: list[str] | tuple[str, ...]) -> list[str]:
    """Makes Secret `name` hold every key of `keys`: creates it, or adds the keys it lacks (optimistic
    concurrency: the patch carries the resourceVersion it read). Returns the keys it added."""
    for _ in range(ATTEMPTS):
        status, secret = api.call("GET", name)
        if status == 404:
            body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": name, "labels": LABELS},
                    "data": {key: _b64(new_value()) for key in keys}}
            status, answer = api.call("POST", body=body)
            if status == 409:  # created meanwhile by someone else
                continue
            _expect(status, 201, f"create Secret {name}", answer)
            return list(keys)
        _expect(status, 200, f"read Secret {name}", secret)
        data = secret.get("data") or {}
        missing = [key for key in keys if not data.get(key)]
        if not missing:
            return []
        patch = {"metadata": {"resourceVersion": secret["metadata"]["resourceVersion"]},
                 "data": {key: _b64(new_value()) for key in missing}}
        status, answer = api.call("PATCH", name, patch, "application/merge-patch+json")
        if status == 409:  # changed since we read it
            continue
        _expect(status, 200, f"add {', '.join(missing)} to Secret {name}", answer)
        return missing
    raise RuntimeError(f"Secret {name} kept changing under us ({ATTEMPTS} attempts)")


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _expect(status: int, wanted: int, what: str, answer: dict) -> None:
    if status != wanted:
        raise RuntimeError(f"cannot {what}: HTTP {status} {answer.get('message', '')}".rstrip())


def in_cluster_api() -> Api:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise RuntimeError("not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is unset): the Job runs this script")
    host = f"[{host}]" if ":" in host else host
    context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
    return Api(f"https://{host}:{port}", (SERVICE_ACCOUNT / "token").read_text().strip(),
               (SERVICE_ACCOUNT / "namespace").read_text().strip(), context)


def main(argv: list[str] | None = None, api: Api | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-acl", required=True, help="users.acl: one Redis password per user that logs in")
    args = parser.parse_args(argv)
    users = redis_users(Path(args.redis_acl).read_text())
    api = api or in_cluster_api()
    started = time.monotonic()
    for name, keys in ((TOKENS_SECRET, TOKEN_KEYS), (REDIS_SECRET, users)):
        added = ensure(api, name, keys)
        # Key names only: the values never reach a log.
        print(f"Secret {api.namespace}/{name}: " + (f"generated {', '.join(added)}" if added else "complete"))
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, OSError) as err:
        print(f"gradwatch-secrets: {err}", file=sys.stderr)
        sys.exit(1)
