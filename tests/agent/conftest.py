"""Collectors that cannot be reached, made of real sockets on 127.0.0.1 (no mocks of gRPC)."""

from __future__ import annotations

import socket

import pytest

CLOSED_PORT = "127.0.0.1:1"  # nothing listens (binding it needs root): every connect is refused at once


@pytest.fixture
def blackhole():
    """host:port of a socket that listens but never accepts: the kernel completes TCP connections into its
    backlog, the HTTP/2 handshake never happens, so an RPC waits until its deadline or its cancellation."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(params=["closed-port", "blackhole"])
def unreachable(request):
    """Each way a collector is unreachable: a refused connection, and one that never answers."""
    return CLOSED_PORT if request.param == "closed-port" else request.getfixturevalue("blackhole")
