"""A hand-driven protocol peer for the tests, built on netloader's own message classes."""

from __future__ import annotations

import os
import secrets
import socket
import threading
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


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on, found as a port scanner on the host would see them (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class FakeSource:
    """A source that speaks netloader's protocol for a real model, then misbehaves on its data connections.

    ``mode``: "wrong-tag" / "wrong-length" / "huge-length" (the first frame of every stream is not the one due,
    followed by bytes 0xAB), "stall" (heartbeats on, not a data byte), "no-heartbeat" (data never, silence).
    """

    def __init__(self, model: object, mode: str) -> None:
        from netloader.manifest import Identity, TensorSet
        from netloader.plan import PlanParams
        from netloader.serving import Transfers

        self.mode = mode
        tensors = TensorSet(model)  # type: ignore[arg-type]
        self.transfers = Transfers(
            tensors, Identity.build("test-model", 0, None), PlanParams(), transports=("streams",), streams=2,
            timeout=30, handshake_timeout=10, heartbeat_timeout=5, closing=threading.Event(),
        )
        self.plan, self.manifest_frame = self.transfers.plan_for(None)
        self.transfer = secrets.token_hex(16)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed = threading.Event()
        self.attaches = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            P.send_message(conn, P.Hello(proto=P.PROTOCOL_VERSION, server="fake", nonce=P.new_nonce(), auth=False),
                           timeout=10)
            P.expect(P.read_message(conn, timeout=10), P.Auth)
            P.send_message(conn, P.AuthOk(mac=None), timeout=10)
            request = P.read_message(conn, timeout=10)
            if isinstance(request, P.Load):
                conn.sendall(self.manifest_frame)
                P.expect(P.read_message(conn, timeout=10), P.Ready)
                P.send_message(conn, P.Rendezvous(transfer=self.transfer, timeout=30, streams=2), timeout=10)
                conn.settimeout(0.5)
                while not self.closed.is_set():
                    if self.mode != "no-heartbeat":
                        P.send_message(conn, P.Heartbeat(), timeout=10)
                    try:
                        if conn.recv(65536) == b"":
                            return
                    except TimeoutError:
                        pass
            elif isinstance(request, P.Attach):
                self.attaches += 1
                P.send_message(conn, P.Attached(stream=request.stream), timeout=10)
                op = self.plan.ops[request.stream]
                if self.mode in ("wrong-tag", "wrong-length", "huge-length"):
                    tag = request.stream + 1 if self.mode == "wrong-tag" else request.stream
                    length = {"wrong-length": op.nbytes + 1, "huge-length": 2**62}.get(self.mode, op.nbytes)
                    conn.sendall(P.DATA_HEADER.pack(tag, length) + b"\xab" * min(op.nbytes + 1, 1 << 20))
                conn.settimeout(1.0)
                while not self.closed.is_set():
                    try:
                        if conn.recv(65536) == b"":
                            return
                    except TimeoutError:
                        pass
        except (OSError, P.ProtocolError):
            pass
        finally:
            conn.close()
