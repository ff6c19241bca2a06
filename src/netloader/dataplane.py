"""Data plane: executes a :class:`~netloader.plan.TransferPlan` over a private two-rank torch.distributed group.

The backend follows the tensors' device and is chosen here and nowhere else: gloo for cpu, nccl for cuda,
hccl for npu (with torch_npu installed). Each transfer gets its own group, built directly on a
:class:`torch.distributed.TCPStore` that the source hosts, so it needs no default process group and lives
beside whatever groups the owning process (vLLM, say) already has; several transfers can run at once.

Packed messages go through ``depth`` staging buffers of ``bucket_size`` bytes per side, so packing (source) and
unpacking (client) overlap with the wire. Direct messages are sent from the source tensor's own memory and
received straight into the destination tensor's memory.

On CPU, packing and unpacking are plain ``memmove`` calls between addresses computed once per transfer, not torch
copies: a torch copy of a tensor of 32 Ki elements or more runs on the OpenMP pool, whose threads then spin-wait
for more work and take the cores that gloo's socket threads and the peer process need. On 2 vCPUs that made a
transfer of 20 000 small tensors 4.5x slower (bench: ``netloader bench --shape moe``); ``memmove`` also costs a
third of a torch copy's per-tensor overhead.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed import PrefixStore, TCPStore

from .errors import ConfigError, NetloaderError, TransferError, TransferTimeoutError
from .plan import Op, TransferPlan

SOURCE_RANK = 0
CLIENT_RANK = 1

#: device type -> torch.distributed backend. The only place the backend is chosen.
BACKEND_BY_DEVICE: dict[str, str] = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}

DEFAULT_DEPTH = 2
#: gloo devices per group, i.e. parallel TCP connections; message ``i`` travels on connection ``i % streams``.
#: Two measured 12% faster than one on loopback (bench/ceiling.py); the source chooses, the client follows.
DEFAULT_STREAMS = 2
MAX_STREAMS = 8
#: at most this many messages are posted at once per transfer (direct ones need no staging buffer)
MAX_INFLIGHT = 8


def backend_for(device: torch.device) -> str:
    try:
        return BACKEND_BY_DEVICE[device.type]
    except KeyError:
        raise ConfigError(f"no netloader data plane for device type {device.type!r}") from None


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class _Reaper:
    """Lets go of finished transfer groups and stores on a thread of its own.

    Destroying a ``ProcessGroupGloo`` blocks for about 10 ms per connection (measured: 10 ms with one stream,
    20 ms with two), which would otherwise be added to every load and hold a source's slot for that long. At
    interpreter exit whatever is pending is torn down before Python stops its threads (a gloo group destroyed
    during finalization aborts the process).
    """

    #: seconds an idle reaper waits for more work before its thread ends
    IDLE_EXIT = 1.0

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[object, ...] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        atexit.register(self.shutdown)

    def discard(self, *objects: object) -> None:
        """Take over the caller's references; the caller must drop its own right after."""
        if all(obj is None for obj in objects):
            return
        with self._lock:
            if self._closed:
                return  # exiting: the caller's references go with its frame, in its own thread
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="netloader-reaper", daemon=True)
                self._thread.start()
            self._queue.put(objects)

    def _run(self) -> None:
        while True:
            try:
                objects = self._queue.get(timeout=self.IDLE_EXIT)
            except queue.Empty:
                with self._lock:  # no thread outlives its work: the next discard starts a new one
                    if self._queue.empty():
                        if self._thread is threading.current_thread():
                            self._thread = None
                        return
                continue
            if objects is None:
                return
            del objects  # the last references: the group's sockets and threads go here

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
            self._thread = None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)


_reaper = _Reaper()


def discard(*objects: object) -> None:
    """Tear down finished groups/stores off the caller's path (see :class:`_Reaper`)."""
    _reaper.discard(*objects)


def host_store(host: str, timeout: float) -> TCPStore:
    """The rendezvous a source hosts for one transfer (a free port, no waiting for workers)."""
    return TCPStore(host, 0, None, True, _td(timeout), wait_for_workers=False)


def join_store(host: str, port: int, timeout: float) -> TCPStore:
    return TCPStore(host, port, None, False, _td(timeout))


def pair_group(
    backend: str,
    store: TCPStore,
    group: str,
    rank: int,
    *,
    local_host: str,
    device: torch.device,
    timeout: float,
    streams: int = DEFAULT_STREAMS,
) -> object:
    """Build the private two-rank group of one transfer (``rank`` 0 is the source).

    Returns the backend object itself (``ProcessGroupGloo`` / ``ProcessGroupNCCL`` / ``ProcessGroupHCCL``),
    which has ``send``/``recv`` and is never registered with torch.distributed's global state.
    """
    try:
        prefixed = PrefixStore(f"netloader/{group}/", store)
        return _new_backend(backend, prefixed, rank, local_host, device, timeout, streams)
    except NetloaderError:
        raise
    except Exception as exc:
        raise TransferError(f"could not form the {backend} transfer group: {_short(str(exc))}") from None


def _new_backend(
    backend: str, prefixed: PrefixStore, rank: int, local_host: str, device: torch.device, timeout: float, streams: int
) -> object:
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        opts = ProcessGroupGloo._Options()
        opts._timeout = _td(timeout)
        opts._devices = [ProcessGroupGloo.create_device(hostname=local_host) for _ in range(max(1, streams))]
        return ProcessGroupGloo(prefixed, rank, 2, opts)
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        torch.cuda.set_device(device)
        opts = ProcessGroupNCCL.Options()
        opts._timeout = _td(timeout)
        return ProcessGroupNCCL(prefixed, rank, 2, opts)
    if backend == "hccl":
        import torch_npu  # type: ignore[import-not-found]  # noqa: F401
        from torch_npu._C._distributed_c10d import ProcessGroupHCCL  # type: ignore[import-not-found]

        opts = ProcessGroupHCCL.Options()
        opts._timeout = _td(timeout)
        return ProcessGroupHCCL(prefixed, rank, 2, opts)
    raise ConfigError(f"unknown backend {backend!r}")


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor | None:
    """A 1-D uint8 view of a contiguous tensor's bytes (None if the tensor is not contiguous)."""
    if not tensor.is_contiguous():
        return None
    return tensor.reshape(-1).view(torch.uint8)


@contextlib.contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """Run device work on a private stream so a serving source does not serialise with inference."""
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        with torch.cuda.stream(stream):
            yield
        stream.synchronize()
    else:
        yield


#: a posted message: the waiter's ticket and the backend's work handle
_Pending = tuple[int, object]


@dataclass
class _Slot:
    buffer: torch.Tensor


class _Waiter:
    """Waits on posted messages, in order, on a thread of its own.

    A gloo wait cannot be interrupted from outside, and gloo does not wake an unbound send or receive whose
    bytes are part-way through the socket when the peer dies (``Pair::signalException`` skips them): such a
    wait lasts until the group's timeout. So the transfer thread never blocks in gloo: it waits here in short
    slices and runs ``check`` (peer still there? transfer cancelled?) in between, giving up at once when the
    peer is gone. A wait caught by that gloo bug then ends by itself at the timeout; by then the peer's
    socket is closed, so nothing more is written into the buffers it held.
    """

    POLL_SECONDS = 0.05

    def __init__(self, *, blocking: bool = True) -> None:
        #: gloo completes a message inside ``wait()``; device backends (NCCL/HCCL) only enqueue a stream wait
        #: there, so for them completion is polled with ``is_completed()`` instead
        self._blocking = blocking
        self._cv = threading.Condition()
        self._works: deque[tuple[object, int]] = deque()
        self._submitted = 0
        self._completed = 0
        self._error: TransferError | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="netloader-wait", daemon=True)
        self._thread.start()

    def submit(self, work: object, index: int) -> int:
        """Queue ``work``; returns the ticket to pass to :meth:`wait_for`."""
        with self._cv:
            self._works.append((work, index))
            self._submitted += 1
            self._cv.notify_all()
            return self._submitted

    def wait_for(self, ticket: int, check: Callable[[], None]) -> None:
        """Return once message ``ticket`` completed; run ``check`` every poll interval until then."""
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
        """Stop after the current wait; ``join`` only when nothing can be stuck (a completed transfer)."""
        with self._cv:
            self._closed = True
            self._works.clear()
            # the error, once raised, has a traceback through wait_for's frame, which holds this waiter:
            # dropping it here breaks that cycle, so the failed transfer's group is freed now, not at a gc
            self._error = None
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
                work, index = self._works.popleft()
            try:
                if self._blocking:
                    work.wait()  # type: ignore[attr-defined]
                else:
                    while not work.is_completed():  # type: ignore[attr-defined]
                        if self._closed:
                            return
                        time.sleep(0.0005)
            except Exception as exc:
                with self._cv:
                    self._error = _transfer_error(exc, index)
                    self._cv.notify_all()
                return
            with self._cv:
                self._completed += 1
                self._cv.notify_all()


def _transfer_error(exc: BaseException, index: int) -> TransferError:
    text = str(exc)
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        return TransferTimeoutError(f"message {index} made no progress in time: {_short(text)}")
    return TransferError(f"message {index} failed: {_short(text)}")


class _Executor:
    """What sender and receiver share: the bound tensors, staging buffers and the in-flight window."""

    def __init__(
        self,
        plan: TransferPlan,
        tensors: Sequence[torch.Tensor],
        group: object,
        *,
        device: torch.device,
        depth: int = DEFAULT_DEPTH,
        on_op: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
        peer_gone: Callable[[], bool] | None = None,
    ) -> None:
        self.plan = plan
        self.tensors = list(tensors)
        self._flat: dict[int, torch.Tensor | None] = {}
        #: host address of each contiguous tensor's bytes (None: not contiguous); on CPU only
        self._addr: list[int | None] = (
            [t.data_ptr() if t.is_contiguous() else None for t in self.tensors] if device.type == "cpu" else []
        )
        self.group = group
        self.device = device
        self.depth = max(1, depth)
        self.on_op = on_op
        self.cancel = cancel or threading.Event()
        self.peer_gone = peer_gone
        self._slots: list[_Slot] = []
        self._free: deque[_Slot] = deque()
        self._whole: dict[int, torch.Tensor] = {}  # contiguous stand-ins for non-contiguous direct tensors
        self._waiter: _Waiter | None = None

    def _take_slot(self) -> _Slot:
        if self._free:
            return self._free.popleft()
        slot = _Slot(torch.empty(self.plan.params.bucket_size, dtype=torch.uint8, device=self.device))
        self._slots.append(slot)
        return slot

    def _can_take_slot(self) -> bool:
        return bool(self._free) or len(self._slots) < self.depth

    #: who is at the other end, for error messages
    PEER = "peer"

    def _check_cancel(self) -> None:
        """Called between messages: a cancel request or a vanished peer stops the transfer here."""
        if self.cancel.is_set():
            raise TransferError("transfer cancelled")
        if self.peer_gone is not None and self.peer_gone():
            raise TransferError(f"the {self.PEER} closed its control connection")

    def flat(self, index: int) -> torch.Tensor | None:
        """A 1-D uint8 view of tensor ``index`` (None if it is not contiguous)."""
        if index not in self._flat:
            self._flat[index] = flat_bytes(self.tensors[index])
        return self._flat[index]

    def _segment_views(self, op: Op, buffer: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(views into the staging buffer, matching local tensors) for a packed op."""
        pieces = buffer[: op.nbytes].split(op.split)
        mine: list[torch.Tensor] = []
        theirs: list[torch.Tensor] = []
        for seg, at in zip(op.segments, op.pick, strict=True):
            piece = pieces[at]
            flat = self.flat(seg.index)
            if flat is not None:
                mine.append(flat)
                theirs.append(piece)
            else:
                tensor = self.tensors[seg.index]
                mine.append(tensor)
                theirs.append(piece.view(tensor.dtype).view(tensor.shape))
        return theirs, mine

    def _copy_packed(self, op: Op, buffer: torch.Tensor, *, pack: bool) -> None:
        """Copy a packed op's tensors into the staging buffer (``pack``) or out of it."""
        if self.device.type != "cpu":
            staging, local = self._segment_views(op, buffer)
            if pack:
                torch._foreach_copy_(staging, local)
            else:
                torch._foreach_copy_(local, staging)
            return
        base = buffer.data_ptr()
        addr = self._addr
        move = ctypes.memmove
        strided: list[int] = []
        for k, seg in enumerate(op.segments):
            at = addr[seg.index]
            if at is None:
                strided.append(k)
            elif pack:
                move(base + seg.offset, at + seg.start, seg.length)
            else:
                move(at + seg.start, base + seg.offset, seg.length)
        for k in strided:  # non-contiguous tensors: a torch copy through a typed view of the staging bytes
            seg = op.segments[k]
            tensor = self.tensors[seg.index]
            piece = buffer[seg.offset : seg.offset + seg.length].view(tensor.dtype).view(tensor.shape)
            if pack:
                piece.copy_(tensor)
            else:
                tensor.copy_(piece)

    def _whole_bytes(self, index: int, *, fill: bool) -> torch.Tensor:
        """Contiguous bytes standing in for a non-contiguous direct tensor."""
        whole = self._whole.get(index)
        if whole is None:
            tensor = self.tensors[index]
            whole = tensor.contiguous() if fill else torch.empty_like(tensor, memory_format=torch.contiguous_format)
            whole = whole.reshape(-1).view(torch.uint8)
            self._whole[index] = whole
        return whole

    def _is_last_chunk(self, op: Op) -> bool:
        seg = op.segments[0]
        return seg.start + seg.length == self.tensors[seg.index].numel() * self.tensors[seg.index].element_size()

    def _post(self, send: bool, buf: torch.Tensor, index: int) -> _Pending:
        """Post one message (tag = its index in the plan); returns what :meth:`_wait` takes."""
        try:
            group: Any = self.group
            work = group.send([buf], CLIENT_RANK, index) if send else group.recv([buf], SOURCE_RANK, index)
        except Exception as exc:
            raise TransferError(f"message {index} could not be posted: {_short(str(exc))}") from None
        if self._waiter is None:
            self._waiter = _Waiter(blocking=self.device.type == "cpu")
        return self._waiter.submit(work, index), work

    def _wait(self, pending: _Pending) -> None:
        ticket, work = pending
        assert self._waiter is not None
        self._waiter.wait_for(ticket, self._check_cancel)
        if self.device.type != "cpu":
            work.wait()  # type: ignore[attr-defined]  # orders this thread's stream after the message

    @contextlib.contextmanager
    def _waiting(self, inflight: deque[Any]) -> Iterator[None]:
        """Around a run: on the way out, whatever happened, stop the waiter and let go of the group, the
        in-flight works and the staging buffers, so a failed transfer's sockets and memory go as soon as
        gloo lets them (an exception's traceback would otherwise keep them until a garbage collection)."""
        ok = False
        try:
            yield
            ok = True
        finally:
            if self._waiter is not None:
                self._waiter.close(join=ok)
            if not ok and self.device.type != "cpu":
                with contextlib.suppress(Exception):  # NCCL/HCCL can abort in-flight work; gloo cannot
                    self.group.abort()  # type: ignore[attr-defined]
            inflight.clear()
            self.group = None
            self._waiter = None
            self._slots.clear()
            self._free.clear()
            self._whole.clear()
            self._flat.clear()


def _short(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else text
    return first[:300]


class Sender(_Executor):
    PEER = "client"

    def run(self, start_op: int = 0) -> int:
        """Send ops ``start_op..`` in order; returns the tensor bytes sent."""
        # (posted message, its index, staging slot, the bytes being sent: held until the message completes)
        inflight: deque[tuple[_Pending, int, _Slot | None, torch.Tensor]] = deque()
        sent = 0

        def complete_oldest() -> None:
            nonlocal sent
            pending, i, slot, _buf = inflight.popleft()
            self._wait(pending)
            if slot is not None:
                self._free.append(slot)
            sent += self.plan.ops[i].payload
            if self.on_op:
                self.on_op(i, self.plan.ops[i].payload)

        with self._waiting(inflight), _side_stream(self.device), torch.no_grad():
            for i in range(start_op, len(self.plan.ops)):
                self._check_cancel()
                op = self.plan.ops[i]
                slot = None
                if op.packed:
                    while not self._can_take_slot():
                        complete_oldest()
                    slot = self._take_slot()
                    self._copy_packed(op, slot.buffer, pack=True)
                    buf = slot.buffer[: op.nbytes]
                else:
                    seg = op.segments[0]
                    flat = self.flat(seg.index)
                    if flat is None:
                        flat = self._whole_bytes(seg.index, fill=True)
                        if self._is_last_chunk(op):
                            self._whole.pop(seg.index)
                    buf = flat[seg.start : seg.start + seg.length]
                inflight.append((self._post(True, buf, i), i, slot, buf))
                while len(inflight) >= MAX_INFLIGHT:
                    complete_oldest()
            while inflight:
                complete_oldest()
        return sent


class Receiver(_Executor):
    PEER = "source"

    def run(self, start_op: int = 0) -> int:
        """Receive ops ``start_op..`` into the tensors; returns how many ops completed in total (for resume).

        On failure raises :class:`TransferError` whose ``completed_ops`` says how many leading ops are in place.
        """
        ops = self.plan.ops
        inflight: deque[tuple[_Pending, int, _Slot | None, torch.Tensor | None]] = deque()
        next_post = start_op
        done = start_op
        assembling: dict[int, int] = {}  # non-contiguous direct tensor -> index of its first chunk's op

        try:
            with self._waiting(inflight), _side_stream(self.device), torch.no_grad():
                while True:
                    while next_post < len(ops) and len(inflight) < MAX_INFLIGHT:
                        op = ops[next_post]
                        if op.packed and not self._can_take_slot():
                            break
                        self._check_cancel()
                        slot, whole = None, None
                        if op.packed:
                            slot = self._take_slot()
                            buf = slot.buffer[: op.nbytes]
                        else:
                            seg = op.segments[0]
                            flat = self.flat(seg.index)
                            if flat is None:
                                flat = whole = self._whole_bytes(seg.index, fill=False)
                                assembling.setdefault(seg.index, next_post)
                            buf = flat[seg.start : seg.start + seg.length]
                        inflight.append((self._post(False, buf, next_post), next_post, slot, whole))
                        next_post += 1
                    if not inflight:
                        break
                    pending, i, slot, whole = inflight.popleft()
                    self._wait(pending)
                    op = ops[i]
                    if slot is not None:
                        self._copy_packed(op, slot.buffer, pack=False)
                        self._free.append(slot)
                    elif whole is not None and self._is_last_chunk(op):
                        seg = op.segments[0]
                        tensor = self.tensors[seg.index]
                        tensor.copy_(self._whole.pop(seg.index).view(tensor.dtype).view(tensor.shape))
                        assembling.pop(seg.index, None)
                    done = i + 1
                    if self.on_op:
                        self.on_op(i, op.payload)
                    self._check_cancel()
        except TransferError as exc:
            # ops before ``done`` are in place, except chunks of a non-contiguous tensor still being assembled
            exc.completed_ops = min([done, *assembling.values()])  # type: ignore[attr-defined]
            raise
        return done
