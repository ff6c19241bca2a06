"""The control connection while a transfer runs: heartbeats both ways, a reader thread, and (for
torch.distributed) the keys of the group's rendezvous.

Once the transfer starts, each side sends a ``heartbeat`` every ``interval`` seconds and reads everything the peer
sends on a thread of its own. :meth:`Channel.check` (called by the executors between messages and every 50 ms
while they wait) raises as soon as the peer closed the connection, sent something invalid, or has been silent for
``heartbeat_timeout`` seconds, so a partitioned or stopped peer is given up within that, whatever the transfer's
``timeout``. The error says which it was: silence while the peer's host still acknowledges our packets is a
stopped or hung process; silence with our packets unacknowledged is a cut network (from the kernel's TCP_INFO).

The socket's timeout is set once here and never changed, because the reader and the senders share it.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import os
import select
import socket
import struct
import threading
import time
from typing import Any

from .errors import ProtocolError, TransferError, TransferTimeoutError
from .protocol import Error, Heartbeat, StoreSet, _Message, decode, encode

#: read size of the reader thread
_CHUNK = 65536
#: TCP_INFO fields used: tcpi_unacked (offset 24) and tcpi_last_ack_recv in ms (offset 56), Linux layout
_TCP_INFO = struct.Struct("=24xI28xI")
#: most rendezvous keys a peer may set
MAX_STORE_KEYS = 256


class Channel:
    """The control connection of one running transfer (both sides use the same class).

    ``peer`` names the other side in errors ("source" / "client"). ``max_frame`` caps every frame read.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer: str,
        timeout: float,
        heartbeat_timeout: float,
        interval: float = 1.0,
        max_frame: int = 1 << 20,
        store: bool = False,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.timeout = timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.interval = interval
        self.max_frame = max_frame
        self._store_allowed = store
        self._cv = threading.Condition()
        self._send_lock = threading.Lock()
        self._inbox: collections.deque[_Message] = collections.deque()
        self._store: dict[str, bytes] = {}
        self._last_heard = time.monotonic()
        self._closed_by_peer = False
        self._error: str | None = None
        #: the reason the peer sent with an ``error`` during the transfer
        self.gave_up: str | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = os.pipe()  # wakes the reader's select at close

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Channel:
        self.sock.settimeout(max(self.heartbeat_timeout, 1.0))  # bounds every send; reads only follow select
        self._last_heard = time.monotonic()
        for target, name in ((self._read_loop, "netloader-ctl-read"), (self._beat_loop, "netloader-heartbeat")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop both threads (they notice within 0.2 s); the socket itself belongs to the caller."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        with self._cv:
            self._cv.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(2.0)
        self._threads.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Channel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sending

    def send(self, message: _Message) -> None:
        self.send_frame(encode(message))

    def send_frame(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except TimeoutError:
                raise self._silence_error("did not accept a control message") from None
            except OSError as exc:
                raise TransferError(f"the {self.peer}'s control connection is lost: {exc}") from None

    def _beat_loop(self) -> None:
        frame = encode(Heartbeat())
        while not self._stopping.wait(self.interval):
            try:
                self.send_frame(frame)
            except TransferError as exc:
                with self._cv:
                    self._error = self._error or str(exc)
                    self._cv.notify_all()
                return

    # ------------------------------------------------------------------ receiving

    def _read_loop(self) -> None:
        buf = bytearray()
        frame_started: float | None = None
        try:
            while not self._stopping.is_set():
                readable, _, _ = select.select([self.sock, self._wake_r], [], [], 0.2)
                if self._stopping.is_set():
                    return
                now = time.monotonic()
                if frame_started is not None and now - frame_started > self.timeout:
                    raise ProtocolError(f"the {self.peer} did not send a whole control message in time")
                if not readable:
                    continue
                try:
                    chunk = self.sock.recv(_CHUNK)
                except (BlockingIOError, InterruptedError, TimeoutError):
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    with self._cv:
                        self._closed_by_peer = True
                        self._cv.notify_all()
                    return
                buf += chunk
                while len(buf) >= 4:
                    length = int.from_bytes(buf[:4], "big")
                    if length > self.max_frame:
                        raise ProtocolError(f"control frame of {length} bytes exceeds the limit of {self.max_frame}")
                    if len(buf) < 4 + length:
                        break
                    body = bytes(buf[4 : 4 + length])
                    del buf[: 4 + length]
                    self._dispatch(decode(body))
                frame_started = (frame_started or now) if buf else None
                with self._cv:
                    self._last_heard = now
        except (ProtocolError, ValueError) as exc:
            with self._cv:
                self._error = f"the {self.peer} sent an invalid control message: {exc}"
                self._cv.notify_all()
        except Exception as exc:  # the reader must never die silently
            with self._cv:
                self._error = f"reading the {self.peer}'s control connection failed: {exc}"
                self._cv.notify_all()

    def _dispatch(self, message: _Message) -> None:
        if isinstance(message, Heartbeat):
            return
        with self._cv:
            if isinstance(message, Error):  # the peer gives up and says why (e.g. a relay whose own load failed)
                self.gave_up = f"the {self.peer} gave up: {message.message}"
                self._error = self._error or self.gave_up
                self._cv.notify_all()
                return
            if isinstance(message, StoreSet):
                if not self._store_allowed:
                    raise ProtocolError("store_set outside a torch.distributed rendezvous")
                if message.key not in self._store and len(self._store) >= MAX_STORE_KEYS:
                    raise ProtocolError(f"more than {MAX_STORE_KEYS} rendezvous keys")
                self._store[message.key] = base64.b64decode(message.value, validate=True)
            else:
                if len(self._inbox) >= 16:
                    raise ProtocolError("too many unexpected control messages")
                self._inbox.append(message)
            self._cv.notify_all()

    # ------------------------------------------------------------------ health

    def check(self) -> None:
        """Raise :class:`TransferError` if the peer closed, misbehaved or has been silent too long."""
        with self._cv:
            error, closed, silent = self._error, self._closed_by_peer, time.monotonic() - self._last_heard
        if error is not None:
            raise TransferError(error)
        if closed:
            raise TransferError(f"the {self.peer} closed its control connection")
        if silent > self.heartbeat_timeout:
            limit = self.heartbeat_timeout
            raise self._silence_error(f"sent nothing for {silent:.1f} s (heartbeat_timeout {limit:g} s)")

    def reason_given(self, wait: float) -> str | None:
        """The reason the peer sent for giving up, waiting at most ``wait`` s for it (its data connections may
        close a moment before its control message arrives)."""
        deadline = time.monotonic() + wait
        with self._cv:
            while self.gave_up is None and not self._closed_by_peer and time.monotonic() < deadline:
                self._cv.wait(0.02)
            return self.gave_up

    def _silence_error(self, what: str) -> TransferTimeoutError:
        state = link_state(self.sock)
        if state == "unacknowledged":
            why = "its host no longer acknowledges our packets: the network to it is partitioned or the host is down"
        elif state == "acknowledged":
            why = "its host still acknowledges our packets: the process is stopped or hung"
        else:
            why = "the process is stopped or the network to it is partitioned"
        return TransferTimeoutError(f"the {self.peer} stopped answering: it {what}; {why}")

    # ------------------------------------------------------------------ messages and rendezvous keys

    def next_message(self, *types: type[_Message], timeout: float) -> Any:
        """The next non-heartbeat message (one of ``types``), waiting at most ``timeout`` s while checking health."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._inbox:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    wanted = types[0].model_fields["type"].default
                    raise TransferTimeoutError(f"the {self.peer} sent no {wanted} in time")
                self._cv.wait(min(remaining, 0.05))
                if not self._inbox:
                    self._cv.release()
                    try:
                        self.check()
                    finally:
                        self._cv.acquire()
            message = self._inbox.popleft()
        if not isinstance(message, types):
            raise TransferError(f"the {self.peer} sent {message.type} out of turn")  # type: ignore[attr-defined]
        return message

    def store_set(self, key: str, value: bytes) -> None:
        with self._cv:
            self._store[key] = value
            self._cv.notify_all()
        self.send(StoreSet(key=key, value=base64.b64encode(value).decode()))

    def store_get(self, key: str, deadline: float) -> bytes:
        """The value of ``key`` once either side set it; raises at ``deadline`` or when the peer fails."""
        with self._cv:
            while key not in self._store:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransferTimeoutError(f"the {self.peer} did not join the transfer group in time")
                self._cv.wait(min(remaining, 0.05))
                if key not in self._store:
                    self._cv.release()
                    try:
                        self.check()
                    finally:
                        self._cv.acquire()
            return self._store[key]

    def store_has(self, key: str) -> bool:
        with self._cv:
            return key in self._store


def link_state(sock: socket.socket) -> str:
    """"unacknowledged" if data we sent has gone unacknowledged for over a second, "acknowledged" if the peer's
    host acknowledges everything, "unknown" where TCP_INFO is not available."""
    if not hasattr(socket, "TCP_INFO"):
        return "unknown"
    with contextlib.suppress(OSError, struct.error):
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        unacked, last_ack_ms = _TCP_INFO.unpack_from(raw)
        if unacked and last_ack_ms > 1000:
            return "unacknowledged"
        return "acknowledged"
    return "unknown"
