"""A hand-driven protocol peer for the tests, built on netloader's own message classes."""

from __future__ import annotations

import socket
import time

from netloader import protocol as P


def connect(address: str) -> socket.socket:
    host, port = P.parse_address(address)
    return socket.create_connection((host, port), timeout=10)


def authenticate(address: str, token: str | None = None) -> socket.socket:
    sock = connect(address)
    hello = P.expect(P.read_message(sock, timeout=10), P.Hello)
    nonce = P.new_nonce()
    mac = P.client_mac(token, hello.nonce, nonce) if token else None
    P.send_message(sock, P.Auth(proto=P.PROTOCOL_VERSION, nonce=nonce, mac=mac), timeout=10)
    P.expect(P.read_message(sock, timeout=10), P.AuthOk)
    return sock


def send_frame(sock: socket.socket, body: bytes) -> None:
    sock.sendall(len(body).to_bytes(4, "big") + body)


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, float]:
    """Everything the peer sends until it closes; returns (data, seconds). Raises TimeoutError if it doesn't."""
    start = time.monotonic()
    data = b""
    sock.settimeout(timeout)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise TimeoutError("the server kept the connection open") from None
    return data, time.monotonic() - start
