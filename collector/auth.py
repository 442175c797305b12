"""Who may write which runs: the collector's bearer tokens and the run-id prefix each one allows.

    token        (GRADWATCH_TOKEN)                    any run
    tokens_file  (GRADWATCH_COLLECTOR_TOKENS_FILE)    one `<token> <run-id-prefix>` a line; `*`: any run

    # team A's jobs write runs named teamA-...
    3f9c...e1  teamA-
    77ab...02  teamB-
    c0de...99  *          # a trusted job: any run

The file is read once, at start-up (a change needs a restart). A bad line is a ConfigError naming the file and
the line number, never the line's text: it holds a secret. A request's token is hashed and compared with every
configured one in constant time (no early exit), so neither the answer nor its timing says how close a guess
was or which line matched. The Export service then checks every run id in the request against the prefix
(service.py), before anything is written.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from gradwatch.settings import ConfigError
from gradwatch.streams import RUN_ID_RULE, valid_run_id

ANY_RUN = "*"
# Scoped tokens are new, so they may ask more than the full token (kept as it was): long enough that guessing
# is hopeless whatever the rate of tries (`openssl rand -hex 32` gives 64 characters).
MIN_SCOPED_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Grant:
    """What a token allows: runs whose id starts with `prefix`; None: any run."""

    prefix: str | None

    def allows(self, run_id: str) -> bool:
        return self.prefix is None or run_id.startswith(self.prefix)

    @property
    def shown(self) -> str:
        """The scope in words, for refusals (the prefix is no secret; the token never appears)."""
        return "any run" if self.prefix is None else f"runs whose id starts with {self.prefix!r}"


FULL = Grant(None)


def bad_token(token: str) -> str | None:
    """Why `token` cannot be a bearer token, or None: gRPC metadata is ASCII, and it travels as "Bearer <token>"."""
    if not token.strip():
        return "empty or blank"
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        return "not printable ASCII without spaces"
    return None


def read_tokens_file(path: str) -> list[tuple[str, Grant, int]]:
    """(token, grant, line number) of each line of a tokens file; ConfigError on the first bad line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
        raise ConfigError(f"tokens file {path!r}: {why}") from None
    out: list[tuple[str, Grant, int]] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        comment = next((i for i, f in enumerate(fields) if f.startswith("#")), len(fields))
        fields = fields[:comment]
        where = f"tokens file {path!r}, line {number}"
        if len(fields) != 2:
            raise ConfigError(f"{where}: expected `<token> <run-id-prefix>` (`{ANY_RUN}` for any run), found "
                              f"{len(fields)} field{'s' if len(fields) != 1 else ''}")
        token, prefix = fields
        if (why := bad_token(token)) is not None:
            raise ConfigError(f"{where}: the token is {why}")
        if len(token) < MIN_SCOPED_TOKEN_CHARS:
            raise ConfigError(f"{where}: the token is shorter than {MIN_SCOPED_TOKEN_CHARS} characters "
                              "(make one with `openssl rand -hex 32`)")
        if prefix != ANY_RUN and not valid_run_id(prefix):
            raise ConfigError(f"{where}: the prefix must be the start of a run id ({RUN_ID_RULE}), or "
                              f"`{ANY_RUN}` for any run")
        if token in seen:
            raise ConfigError(f"{where}: the token of line {seen[token]} again (one scope per token)")
        seen[token] = number
        out.append((token, FULL if prefix == ANY_RUN else Grant(prefix), number))
    if not out:
        raise ConfigError(f"tokens file {path!r} has no tokens (lines `<token> <run-id-prefix>`)")
    return out


class Tokens:
    """The configured tokens as digests; `grant(given)` says what a presented token allows."""

    def __init__(self, entries: list[tuple[str, Grant]]):
        self._entries = [(_digest(token), grant) for token, grant in entries]

    @classmethod
    def from_config(cls, token: str | None, tokens_file: str | None) -> Tokens:
        """The full token and the file's scoped ones; ConfigError if the file is bad or repeats the full token."""
        entries = [(token, FULL)] if token is not None else []
        for scoped, grant, number in read_tokens_file(tokens_file) if tokens_file is not None else ():
            if token is not None and hmac.compare_digest(scoped.encode(), token.encode()):
                raise ConfigError(f"tokens file {tokens_file!r}, line {number}: the full token (GRADWATCH_TOKEN) "
                                  "again; give each scope its own token")
            entries.append((scoped, grant))
        return cls(entries)

    @property
    def required(self) -> bool:
        """Whether requests must carry a token (any is configured)."""
        return bool(self._entries)

    @property
    def scoped(self) -> int:
        """How many tokens allow less than every run."""
        return sum(grant.prefix is not None for _, grant in self._entries)

    def grant(self, given: str) -> Grant | None:
        """The grant of the configured token equal to `given`, None if none is."""
        presented = _digest(given)
        found = None
        for digest, grant in self._entries:  # every entry, always: the time says nothing about which matched
            if hmac.compare_digest(presented, digest):
                found = grant
        return found


def _digest(token: str) -> bytes:
    # Fixed-length digests: compare_digest's time then depends on neither the guess's length nor its content.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
