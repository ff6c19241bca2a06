"""netloader streams: the CPU transport. Plain TCP connections to the source's own port, nothing else listens.

The client opens ``streams`` data connections to the address it already loads from. Each authenticates exactly
like a control connection (HMAC challenge-response) and then names its transfer with ``attach{transfer,
stream}``, the 128-bit random id that only the transfer's authenticated control connection carried; the server
hands the socket to that transfer (:meth:`StreamTransport.attach`) or refuses it.

On a data connection the source sends, for each message, a 12-byte header (tag = the message's index in the
plan, payload length) and then the payload. Message ``k`` of the transfer's sequence travels on stream
``k % streams``, so each side knows, per stream, exactly which message comes next: the receiver checks the
header against the buffer it posted *before* it reads a payload byte, and reads the payload with ``recv_into``
straight into that buffer (tensor memory for direct messages, a staging buffer for packed ones). The source
sends with ``sendall`` straight from tensor memory. Every socket call is bounded by the transfer's ``timeout``
(``SO_RCVTIMEO``/``SO_SNDTIMEO``: a stream that makes no progress fails the transfer); ``close`` shuts the
sockets down, which wakes any blocked call, and waits for the stream threads, so no byte lands in a buffer after a
failed transfer is given up.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from ..errors import ProtocolError, TransferError, TransferTimeoutError
from ..protocol import DATA_HEADER
from .base import Check, Transport

#: bytes per socket call (one per 16 MiB message). Each call is bounded by the timeout, so a link slower than
#: 16 MiB per ``timeout`` counts as stalled. In-process A/B on 2 busy vCPUs, 1 GiB Llama: 4 MiB pieces 2.75 GB/s
#: (gloo 2.80), 16 MiB 4.83 GB/s (gloo 4.03; the machine's load fell between the two runs: compare within a row)
_PIECE = 16 << 20
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_WAITALL = getattr(socket, "MSG_WAITALL", 0)


def byte_view(buf: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous 1-D uint8 CPU tensor's bytes (the tensor must outlive it)."""
    n = buf.numel()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(buf.data_ptr())).cast("B")


def tune_data_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Post:
    __slots__ = ("buf", "done", "error", "nbytes", "tag")

    def __init__(self, buf: torch.Tensor, tag: int) -> None:
        self.buf = buf  # holds the memory alive while a stream thread uses it
        self.tag = tag
        self.nbytes = buf.numel()
        self.done = False
        self.error: TransferError | None = None


class StreamTransport(Transport):
    """One transfer over ``n`` data connections; ``sending`` on the source, receiving on the client."""

    def __init__(self, n: int, *, timeout: float, sending: bool, peer: str) -> None:
        self.n = n
        self.timeout = timeout
        self.sending = sending
        self.peer = peer
        self._cv = threading.Condition()
        self._queues: list[deque[_Post]] = [deque() for _ in range(n)]
        self._socks: list[socket.socket | None] = [None] * n
        self._posted = 0
        self._running = 0  # stream loops running
        self._error: TransferError | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._received = [0] * n

    # ------------------------------------------------------------------ setting up

    def attach(self, stream: int, sock: socket.socket, announce: Callable[[], None]) -> None:
        """Source side: claim stream ``stream``, ``announce`` it to the client, then run its send loop on the
        calling thread until the transfer ends. A closed transfer, a stream out of range or a second attach of the
        same stream raises :class:`ProtocolError` (the caller closes that connection)."""
        with self._cv:
            if self._closed:
                raise ProtocolError("the transfer is over")
            if not 0 <= stream < self.n:
                raise ProtocolError(f"stream {stream} is not one of this transfer's {self.n}")
            if self._socks[stream] is not None:
                raise ProtocolError(f"stream {stream} is already attached")
            self._socks[stream] = sock
            self._running += 1
            self._cv.notify_all()
        try:
            announce()
        except BaseException:
            with self._cv:
                self._running -= 1
                self._cv.notify_all()
            self._fail(TransferError(f"data stream {stream} could not be announced to the {self.peer}"))
            raise
        self._loop(stream, sock)

    def wait_attached(self, deadline: float, check: Check) -> None:
        """Source side: return once every stream attached; raise at ``deadline`` (monotonic) or on ``check``."""
        with self._cv:
            while any(s is None for s in self._socks):
                if self._closed:
                    raise TransferError("transfer closed")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [k for k, s in enumerate(self._socks) if s is None]
                    raise TransferTimeoutError(f"the {self.peer} did not attach data stream(s) {missing} in time")
                self._cv.wait(min(remaining, 0.05))
                self._cv.release()
                try:
                    check()
                finally:
                    self._cv.acquire()

    def start_receiving(self, socks: list[socket.socket]) -> None:
        """Client side: one thread per attached data connection."""
        assert len(socks) == self.n and not self.sending
        with self._cv:
            self._socks = list(socks)
            self._running = self.n
        for k, sock in enumerate(socks):
            thread = threading.Thread(target=self._loop, args=(k, sock), name=f"netloader-stream-{k}", daemon=True)
            thread.start()
            self._threads.append(thread)

    # ------------------------------------------------------------------ the interface

    def _post(self, buf: torch.Tensor, tag: int) -> _Post:
        post = _Post(buf, tag)
        with self._cv:
            if self._error is not None:
                raise self._error
            self._queues[self._posted % self.n].append(post)
            self._posted += 1
            self._cv.notify_all()
        return post

    def post_send(self, buf: torch.Tensor, tag: int) -> object:
        return self._post(buf, tag)

    def post_recv(self, buf: torch.Tensor, tag: int) -> object:
        return self._post(buf, tag)

    def wait(self, handle: object, check: Check) -> None:
        assert isinstance(handle, _Post)
        with self._cv:
            while not handle.done:
                error = handle.error or self._error
                if error is not None:
                    raise error
                self._cv.wait(0.05)
                if handle.done:
                    break
                self._cv.release()
                try:
                    check()
                finally:
                    self._cv.acquire()

    def completed(self, handle: object) -> bool:
        assert isinstance(handle, _Post)
        with self._cv:
            return handle.done

    @property
    def received_bytes(self) -> int:  # type: ignore[override]
        return sum(self._received)

    def close(self, ok: bool) -> None:
        with self._cv:
            self._closed = True
            socks = [s for s in self._socks if s is not None]
            self._cv.notify_all()
        if not ok:
            for sock in socks:  # wakes a send or receive blocked in the kernel
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + max(5.0, self.timeout)
        with self._cv:  # no stream loop touches a buffer after this returns
            while self._running and time.monotonic() < deadline:
                self._cv.wait(0.05)
        for thread in self._threads:
            thread.join(1.0)
        if not self.sending:  # the client owns its data connections; the server's connection threads own theirs
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.close()

    # ------------------------------------------------------------------ the stream loops

    def _next(self, stream: int) -> _Post | None:
        with self._cv:
            queue = self._queues[stream]
            while not queue:
                if self._closed or self._error is not None:
                    return None
                self._cv.wait()
            return queue[0]

    def _finish(self, stream: int, post: _Post) -> None:
        with self._cv:
            self._queues[stream].popleft()
            post.done = True
            self._cv.notify_all()

    def _loop(self, stream: int, sock: socket.socket) -> None:
        try:
            _bound(sock, self.timeout)
            step = self._send_one if self.sending else self._recv_one
            while True:
                post = self._next(stream)
                if post is None:
                    return
                step(stream, sock, post)
                self._finish(stream, post)
        except (TimeoutError, BlockingIOError):
            self._fail(TransferTimeoutError(f"data stream {stream} made no progress for {self.timeout:g} s"))
        except TransferError as exc:
            self._fail(exc)
        except (OSError, ValueError) as exc:
            self._fail(TransferError(f"data stream {stream} to the {self.peer} failed: {exc}"))
        finally:
            with self._cv:
                self._running -= 1
                self._cv.notify_all()

    def _fail(self, error: TransferError) -> None:
        with self._cv:
            if self._closed:
                return  # a socket shut down by close(): not news
            if self._error is None:
                self._error = error
            self._cv.notify_all()

    def _send_one(self, stream: int, sock: socket.socket, post: _Post) -> None:
        sock.sendall(DATA_HEADER.pack(post.tag, post.nbytes), _MSG_MORE if post.nbytes else 0)
        view = byte_view(post.buf)
        for at in range(0, post.nbytes, _PIECE):
            sock.sendall(view[at : at + _PIECE])

    def _recv_one(self, stream: int, sock: socket.socket, post: _Post) -> None:
        header = bytearray(DATA_HEADER.size)
        self._recv_into(stream, sock, memoryview(header), count=False)
        tag, length = DATA_HEADER.unpack(header)
        if tag != post.tag or length != post.nbytes:
            raise TransferError(
                f"protocol violation: the {self.peer} sent message {tag} of {length} bytes on data stream {stream}, "
                f"where message {post.tag} of {post.nbytes} bytes was due; nothing of it was accepted"
            )
        self._recv_into(stream, sock, byte_view(post.buf), count=True)

    def _recv_into(self, stream: int, sock: socket.socket, view: memoryview, *, count: bool) -> None:
        got, n = 0, len(view)
        while got < n:
            # MSG_WAITALL: one system call per piece, not one per segment that happened to arrive (each return
            # needs the GIL, which the unpacking thread holds for whole buckets); SO_RCVTIMEO bounds each call
            k = sock.recv_into(view[got:], min(n - got, _PIECE), _WAITALL)
            if k == 0:
                raise TransferError(f"the {self.peer} closed data stream {stream}")
            got += k
            if count:
                self._received[stream] += k


def _bound(sock: socket.socket, timeout: float) -> None:
    """Blocking socket whose every send and receive call is bounded by ``timeout`` seconds (kernel timers)."""
    sock.settimeout(None)
    seconds = int(timeout)
    value = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
