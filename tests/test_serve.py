"""The listening socket both services bind themselves (``shared.serve.listener``).

Connections accepted from it must carry TCP_NODELAY as well as the N3 user timeout: the listener is made by
``uvicorn.Config.bind_socket`` without ``proto=IPPROTO_TCP``, so asyncio skipped setting TCP_NODELAY on the
accepted sockets and Nagle held small writes for the peer's delayed ACK (40 ms to the first token).
"""

from __future__ import annotations

import socket

import pytest
import uvicorn
from fastapi import FastAPI

from gkt.launcher import free_port
from shared.serve import listener

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options")


def test_accepted_connections_have_nodelay_and_the_user_timeout() -> None:
    sock = listener(uvicorn.Config(FastAPI(), host="127.0.0.1", port=free_port()), 30)
    assert sock is not None
    sock.listen()
    with sock, socket.create_connection(sock.getsockname()) as client:
        conn, _ = sock.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
            client.sendall(b"x")
            assert conn.recv(1) == b"x"


def test_without_a_user_timeout_uvicorn_binds_its_own_listener() -> None:
    assert listener(uvicorn.Config(FastAPI(), host="127.0.0.1", port=free_port()), 0) is None
