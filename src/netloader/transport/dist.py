"""torch.distributed transports: NCCL on CUDA, HCCL on Ascend, and gloo on CPU when asked for.

Every device-specific line of netloader is in this module. Each transfer gets a private two-rank group (the
backend object itself, never registered with torch.distributed's global state, so it lives beside vLLM's groups).
Its rendezvous is a :class:`ControlStore`: a ``torch.distributed.Store`` whose keys travel as ``store_set``
messages over the transfer's authenticated control connection. No TCPStore runs anywhere and the NCCL unique id
never leaves that connection. What this does not protect: gloo itself listens on a port of its own for the
group's connections and pairs with whoever sends the right bytes first, with no authentication, and parses those
bytes in C++ before any netloader code sees them (a malformed header aborts the process). That is why gloo is
opt-in, for trusted networks; netloader streams are the CPU default.

Group formation runs on a helper thread, bounded by the load's ``timeout`` and by the control connection's
health, not by gloo's own (longer) waits.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..channel import Channel
from ..errors import ConfigError, NetloaderError, TransferError, TransferTimeoutError
from .base import Check, Transport

SOURCE_RANK = 0
CLIENT_RANK = 1
#: gloo devices per group, i.e. parallel TCP connections; message ``i`` travels on connection ``i % streams``
DEFAULT_GLOO_STREAMS = 2


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def _short(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else text
    return first[:300]


class ControlStore(torch.distributed.Store):
    """The group's rendezvous over the control connection (gloo and NCCL call only set, get and wait).

    Both sides keep the keys either side set; ``get``/``wait`` block until the key is there, at most until the
    formation deadline, and fail at once if the control connection fails.
    """

    def __init__(self, channel: Channel, deadline: float) -> None:
        super().__init__()
        self._channel = channel
        self._deadline = deadline

    def set(self, key: str, value: bytes | str) -> None:
        self._channel.store_set(key, value.encode() if isinstance(value, str) else bytes(value))

    def get(self, key: str) -> bytes:
        return self._channel.store_get(key, self._deadline)

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        deadline = self._deadline
        if timeout is not None:
            deadline = min(deadline, time.monotonic() + timeout.total_seconds())
        for key in keys:
            self._channel.store_get(key, deadline)

    def check(self, keys: list[str]) -> bool:
        return all(self._channel.store_has(key) for key in keys)

    def add(self, key: str, value: int) -> int:
        raise NotImplementedError("netloader's transfer store holds set/get keys only")

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        pass


def form_group(
    backend: str,
    store: ControlStore,
    rank: int,
    *,
    local_host: str,
    device: torch.device,
    timeout: float,
    streams: int,
    check: Check,
) -> object:
    """Build the private two-rank group of one transfer (``rank`` 0 is the source), within ``timeout``.

    Runs on a helper thread: gloo's own waits are longer than the load's timeout, and the control connection's
    health is checked meanwhile. A construction still stuck at the deadline is left to end by itself.
    """
    result: list[object] = []
    errors: list[BaseException] = []
    store_ref = store  # the C++ group holds the store by pointer: it must stay referenced

    def build() -> None:
        try:
            result.append(_new_backend(backend, store_ref, rank, local_host, device, timeout, streams))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=build, name="netloader-group", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive():
        thread.join(0.05)
        if not thread.is_alive():
            break
        check()
        if time.monotonic() > deadline:
            raise TransferTimeoutError(f"the {backend} transfer group did not form within {timeout:g} s")
    if errors:
        exc = errors[0]
        if isinstance(exc, NetloaderError):
            raise exc
        raise TransferError(f"could not form the {backend} transfer group: {_short(str(exc))}")
    return result[0]


def _new_backend(
    backend: str, store: ControlStore, rank: int, local_host: str, device: torch.device, timeout: float, streams: int
) -> object:
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        opts = ProcessGroupGloo._Options()
        opts._timeout = _td(timeout)
        opts._devices = [ProcessGroupGloo.create_device(hostname=local_host) for _ in range(max(1, streams))]
        return ProcessGroupGloo(store, rank, 2, opts)
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        torch.cuda.set_device(device)
        opts = ProcessGroupNCCL.Options()
        opts._timeout = _td(timeout)
        return ProcessGroupNCCL(store, rank, 2, opts)
    if backend == "hccl":
        import torch_npu  # type: ignore[import-not-found]  # noqa: F401
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL  # type: ignore[import-not-found]

        opts = ProcessGroupHCCL.Options()
        opts._timeout = _td(timeout)
        return ProcessGroupHCCL(store, rank, 2, opts)
    raise ConfigError(f"unknown backend {backend!r}")


@contextlib.contextmanager
def side_stream(device: torch.device):  # type: ignore[no-untyped-def]
    """Run device work on a private stream so a serving source does not serialise with inference."""
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()
    else:
        yield


class _Reaper:
    """Lets go of finished transfer groups on a thread of its own.

    Destroying a ``ProcessGroupGloo`` blocks for about 10 ms per connection, which would otherwise be added to
    every load and hold a source's slot for that long. At interpreter exit whatever is pending is torn down
    before Python stops its threads (a gloo group destroyed during finalization aborts the process).
    """

    IDLE_EXIT = 1.0

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[object, ...] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        atexit.register(self.shutdown)

    def discard(self, *objects: object) -> None:
        if all(obj is None for obj in objects):
            return
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="netloader-reaper", daemon=True)
                self._thread.start()
            self._queue.put(objects)

    def _run(self) -> None:
        while True:
            try:
                objects = self._queue.get(timeout=self.IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        if self._thread is threading.current_thread():
                            self._thread = None
                        return
                continue
            if objects is None:
                return
            del objects

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
            self._thread = None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)


_reaper = _Reaper()


class _Waiter:
    """Waits on posted works, in order, on a thread of its own.

    A gloo wait cannot be interrupted, and gloo does not wake an unbound send or receive whose bytes are
    part-way through the socket when the peer dies (``Pair::signalException`` skips them): such a wait lasts
    until the group's timeout. So the transfer thread never blocks in gloo: it waits here in short slices and
    runs ``check`` in between, giving up at once when the peer is gone.
    """

    POLL_SECONDS = 0.05

    def __init__(self, *, blocking: bool) -> None:
        self._blocking = blocking  # gloo completes inside wait(); NCCL/HCCL are polled with is_completed()
        self._cv = threading.Condition()
        self._works: deque[tuple[object, int]] = deque()
        self._submitted = 0
        self._completed = 0
        self._error: TransferError | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="netloader-wait", daemon=True)
        self._thread.start()

    def submit(self, work: object, tag: int) -> int:
        with self._cv:
            self._works.append((work, tag))
            self._submitted += 1
            self._cv.notify_all()
            return self._submitted

    def done(self, ticket: int) -> bool:
        with self._cv:
            return self._completed >= ticket

    def wait_for(self, ticket: int, check: Callable[[], None]) -> None:
        while True:
            with self._cv:
                if self._completed < ticket and self._error is None:
                    self._cv.wait(self.POLL_SECONDS)
                if self._completed >= ticket:
                    return
                if self._error is not None:
                    raise self._error
            check()

    def close(self, *, join: bool) -> None:
        with self._cv:
            self._closed = True
            self._works.clear()
            self._error = None  # breaks the traceback cycle that would keep a failed group alive until a gc
            self._cv.notify_all()
        if join:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._works and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                work, tag = self._works.popleft()
            try:
                if self._blocking:
                    work.wait()  # type: ignore[attr-defined]
                else:
                    while not work.is_completed():  # type: ignore[attr-defined]
                        if self._closed:
                            return
                        time.sleep(0.0005)
            except Exception as exc:
                text = str(exc)
                err: TransferError
                if "imed out" in text or "Timeout" in text:
                    err = TransferTimeoutError(f"message {tag} made no progress in time: {_short(text)}")
                else:
                    err = TransferError(f"message {tag} failed: {_short(text)}")
                with self._cv:
                    self._error = err
                    self._cv.notify_all()
                return
            with self._cv:
                self._completed += 1
                self._cv.notify_all()


@dataclass
class _Work:
    ticket: int
    work: object
    nbytes: int  # received bytes, 0 for a send


class DistTransport(Transport):
    """A formed two-rank group as a :class:`Transport` (tag = the message's index in the plan)."""

    def __init__(self, group: object, store: ControlStore, device: torch.device) -> None:
        self.group: Any = group
        self.store = store  # referenced for as long as the group lives
        self.device = device
        self._waiter = _Waiter(blocking=device.type == "cpu")
        self._received = 0

    def _submit(self, send: bool, buf: torch.Tensor, tag: int) -> _Work:
        try:
            work = self.group.send([buf], CLIENT_RANK, tag) if send else self.group.recv([buf], SOURCE_RANK, tag)
        except Exception as exc:
            raise TransferError(f"message {tag} could not be posted: {_short(str(exc))}") from None
        return _Work(self._waiter.submit(work, tag), work, 0 if send else buf.numel())

    def post_send(self, buf: torch.Tensor, tag: int) -> object:
        return self._submit(True, buf, tag)

    def post_recv(self, buf: torch.Tensor, tag: int) -> object:
        return self._submit(False, buf, tag)

    def wait(self, handle: object, check: Check) -> None:
        assert isinstance(handle, _Work)
        self._waiter.wait_for(handle.ticket, check)
        if self.device.type != "cpu":
            handle.work.wait()  # type: ignore[attr-defined]  # orders this thread's stream after the message
        self._received += handle.nbytes

    def completed(self, handle: object) -> bool:
        assert isinstance(handle, _Work)
        return self._waiter.done(handle.ticket)

    @property
    def received_bytes(self) -> int:  # type: ignore[override]
        return self._received  # gloo does not say how much of a message arrived: whole messages only

    def close(self, ok: bool) -> None:
        self._waiter.close(join=ok)
        if not ok and self.device.type != "cpu":
            with contextlib.suppress(Exception):  # NCCL/HCCL can abort in-flight work; gloo cannot
                self.group.abort()
        _reaper.discard(self.group, self.store)
        self.group = None
