"""Executors: run a :class:`~netloader.plan.TransferPlan` over any :class:`~netloader.transport.Transport`.

Both sides walk the same *sequence* of the plan's messages (all of them, or the ones a resumed load still
misses) in the same order. Packed messages go through ``depth`` staging buffers of ``bucket_size`` bytes per side,
so packing (source) and unpacking (client) overlap with the wire; direct messages go straight from the source
tensor's memory and straight into the destination tensor's memory. At most :data:`MAX_INFLIGHT` messages are
posted at once.

On CPU, packing and unpacking are plain ``memmove`` calls between addresses computed once per transfer, not torch
copies: a torch copy of a tensor of 32 Ki elements or more runs on the OpenMP pool, whose threads then spin-wait
for more work and take the cores that the socket threads and the peer process need (on 2 vCPUs a transfer of
20 000 small tensors was 4.5x slower).

The receiver records every message that is fully in place, in whatever order messages complete; when a transfer
fails, messages that completed but were not yet waited for are kept too (a packed one is unpacked first), and the
:class:`~netloader.errors.TransferError` carries that set (``completed``) for the next source.
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from .errors import TransferError
from .plan import Op, TransferPlan
from .transport.base import Check, Transport
from .transport.dist import side_stream

DEFAULT_DEPTH = 2
#: at most this many messages are posted at once per transfer (direct ones need no staging buffer)
MAX_INFLIGHT = 8


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor | None:
    """A 1-D uint8 view of a contiguous tensor's bytes (None if the tensor is not contiguous)."""
    if not tensor.is_contiguous():
        return None
    return tensor.reshape(-1).view(torch.uint8)


class _Executor:
    """What sender and receiver share: the bound tensors, staging buffers and the in-flight window."""

    def __init__(
        self,
        plan: TransferPlan,
        tensors: Sequence[torch.Tensor],
        transport: Transport,
        *,
        device: torch.device,
        check: Check,
        depth: int = DEFAULT_DEPTH,
        on_op: Callable[[int, int], None] | None = None,
        before_op: Callable[[int], None] | None = None,
        on_complete: Callable[[int], None] | None = None,
    ) -> None:
        self.plan = plan
        #: sender: called before message ``i`` is read from the tensors (a relay waits there for its bytes, a
        #: rate cap takes its tokens); receiver: unused
        self.before_op = before_op
        #: receiver: called with each message index once its bytes are in place in the tensors
        self.on_complete = on_complete
        self.tensors = list(tensors)
        self.transport = transport
        self.device = device
        self.check = check
        self.depth = max(1, depth)
        self.on_op = on_op
        self._flat: dict[int, torch.Tensor | None] = {}
        #: host address of each contiguous tensor's bytes (None: not contiguous); on CPU only
        self._addr: list[int | None] = (
            [t.data_ptr() if t.is_contiguous() else None for t in self.tensors] if device.type == "cpu" else []
        )
        self._free: list[torch.Tensor] = []
        self._made = 0
        self._whole: dict[int, torch.Tensor] = {}  # contiguous stand-ins for non-contiguous direct tensors

    def _chunks_per_tensor(self, sequence: Sequence[int], counts: dict[int, int] | None = None) -> dict[int, int]:
        """Direct chunks in ``sequence`` per non-contiguous tensor (those are assembled through a whole copy),
        added to ``counts``."""
        counts = {} if counts is None else counts
        for i in sequence:
            op = self.plan.ops[i]
            if not op.packed and self.flat(op.segments[0].index) is None:
                index = op.segments[0].index
                counts[index] = counts.get(index, 0) + 1
        return counts

    def _take_slot(self) -> torch.Tensor:
        if self._free:
            return self._free.pop()
        self._made += 1
        return torch.empty(self.plan.params.bucket_size, dtype=torch.uint8, device=self.device)

    def _can_take_slot(self) -> bool:
        return bool(self._free) or self._made < self.depth

    def flat(self, index: int) -> torch.Tensor | None:
        if index not in self._flat:
            self._flat[index] = flat_bytes(self.tensors[index])
        return self._flat[index]

    def _copy_packed(self, op: Op, buffer: torch.Tensor, *, pack: bool) -> None:
        """Copy a packed op's tensors into the staging buffer (``pack``) or out of it."""
        if self.device.type != "cpu":
            pieces = buffer[: op.nbytes].split(op.split)
            staging, local = [], []
            for seg, at in zip(op.segments, op.pick, strict=True):
                tensor = self.tensors[seg.index]
                flat = self.flat(seg.index)
                local.append(flat if flat is not None else tensor)
                piece = pieces[at]
                staging.append(piece if flat is not None else piece.view(tensor.dtype).view(tensor.shape))
            torch._foreach_copy_(*((staging, local) if pack else (local, staging)))
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
        whole = self._whole.get(index)
        if whole is None:
            tensor = self.tensors[index]
            whole = tensor.contiguous() if fill else torch.empty_like(tensor, memory_format=torch.contiguous_format)
            whole = whole.reshape(-1).view(torch.uint8)
            self._whole[index] = whole
        return whole

    def _release(self) -> None:
        self._free.clear()
        self._whole.clear()
        self._flat.clear()


class Sender(_Executor):
    def run(self, sequence: Sequence[int]) -> int:
        """Send the plan's messages ``sequence`` in that order; returns the tensor bytes sent."""
        return self.run_units([sequence])

    def run_units(self, units: Iterable[Sequence[int]]) -> int:
        """Send each unit's messages in order, units in the order ``units`` yields them (it may block: a striped
        client hands out its units as it goes). Returns the tensor bytes sent."""
        ops = self.plan.ops
        # (handle, op index, staging buffer or None, the bytes being sent: held until the message completes)
        inflight: deque[tuple[object, int, torch.Tensor | None, torch.Tensor]] = deque()
        chunks_left: dict[int, int] = {}
        sent = 0
        ok = False

        def complete_oldest() -> None:
            nonlocal sent
            handle, i, slot, _buf = inflight.popleft()
            self.transport.wait(handle, self.check)
            if slot is not None:
                self._free.append(slot)
            sent += ops[i].payload
            if self.on_op:
                self.on_op(i, ops[i].payload)

        try:
            with side_stream(self.device), torch.no_grad():
                for unit in units:
                    self._chunks_per_tensor(unit, chunks_left)
                    for i in unit:
                        self.check()
                        if self.before_op is not None:
                            self.before_op(i)
                        op = ops[i]
                        slot = None
                        if op.packed:
                            while not self._can_take_slot():
                                complete_oldest()
                            slot = self._take_slot()
                            self._copy_packed(op, slot, pack=True)
                            buf = slot[: op.nbytes]
                        else:
                            seg = op.segments[0]
                            flat = self.flat(seg.index)
                            if flat is None:
                                flat = self._whole_bytes(seg.index, fill=True)
                                chunks_left[seg.index] -= 1
                                if not chunks_left[seg.index]:
                                    self._whole.pop(seg.index)  # the in-flight entry keeps its bytes alive
                            buf = flat[seg.start : seg.start + seg.length]
                        inflight.append((self.transport.post_send(buf, i), i, slot, buf))
                        while len(inflight) >= MAX_INFLIGHT:
                            complete_oldest()
                while inflight:
                    complete_oldest()
            ok = True
        finally:
            self.transport.close(ok)  # after this no transport thread reads the buffers released below
            inflight.clear()
            self._release()
        return sent


class Receiver(_Executor):
    def run(self, sequence: Sequence[int]) -> set[int]:
        """Receive the plan's messages ``sequence`` into the tensors; returns the indices now in place.

        On failure raises :class:`TransferError` whose ``completed`` holds every message of ``sequence`` fully in
        place (in whatever order they completed).
        """
        return self.run_units([sequence])

    def run_units(self, units: Iterable[Sequence[int]], max_open: int | None = None) -> set[int]:
        """:meth:`run` over units taken from ``units`` as the receive window reaches them (a striped load hands
        them out on demand). A unit must hold every chunk of a non-contiguous tensor it has one of. ``max_open``:
        take a next unit only while fewer than that many units taken are still arriving (a striped session keeps
        one unit ahead of the one arriving, however few messages a unit holds; the rest stay in the shared pool
        for the other sources)."""
        ops = self.plan.ops
        inflight: deque[tuple[object, int, torch.Tensor | None, torch.Tensor | None]] = deque()
        chunks_left: dict[int, int] = {}
        source: Iterator[Sequence[int]] = iter(units)
        sequence: Sequence[int] = ()
        assembled: dict[int, list[int]] = {}  # non-contiguous tensor -> its chunks received so far
        completed: set[int] = set()
        position = 0
        open_units: dict[int, int] = {}  # unit number -> its messages still arriving
        unit_of: dict[int, int] = {}
        taken = 0

        def finish(i: int, slot: torch.Tensor | None, whole: torch.Tensor | None) -> None:
            op = ops[i]
            number = unit_of.pop(i, None)
            if number is not None:
                open_units[number] -= 1
                if not open_units[number]:
                    del open_units[number]
            done: list[int] = []
            if slot is not None:
                self._copy_packed(op, slot, pack=False)
                self._free.append(slot)
                done.append(i)
            elif whole is not None:
                index = op.segments[0].index
                assembled.setdefault(index, []).append(i)
                chunks_left[index] -= 1
                if not chunks_left[index]:
                    tensor = self.tensors[index]
                    tensor.copy_(self._whole.pop(index).view(tensor.dtype).view(tensor.shape))
                    done.extend(assembled.pop(index))
            else:
                done.append(i)
            completed.update(done)
            if self.on_complete is not None:
                for k in done:
                    self.on_complete(k)
            if self.on_op:
                self.on_op(i, op.payload)

        ok = closed = False
        try:
            with side_stream(self.device), torch.no_grad():
                while True:
                    while len(inflight) < MAX_INFLIGHT:
                        if position >= len(sequence):
                            if max_open is not None and len(open_units) >= max_open:
                                break
                            unit = next(source, None)
                            if unit is None:
                                break
                            sequence, position = unit, 0
                            self._chunks_per_tensor(unit, chunks_left)
                            if max_open is not None and unit:
                                taken += 1
                                open_units[taken] = len(unit)
                                unit_of.update((i, taken) for i in unit)
                            continue
                        i = sequence[position]
                        op = ops[i]
                        if op.packed and not self._can_take_slot():
                            break
                        self.check()
                        slot = whole = None
                        if op.packed:
                            slot = self._take_slot()
                            buf = slot[: op.nbytes]
                        else:
                            seg = op.segments[0]
                            flat = self.flat(seg.index)
                            if flat is None:
                                flat = whole = self._whole_bytes(seg.index, fill=False)
                            buf = flat[seg.start : seg.start + seg.length]
                        inflight.append((self.transport.post_recv(buf, i), i, slot, whole))
                        position += 1
                    if not inflight:
                        break
                    handle, i, slot, whole = inflight[0]
                    self.transport.wait(handle, self.check)
                    inflight.popleft()
                    finish(i, slot, whole)
                    self.check()
            ok = True
        except TransferError as exc:
            self.transport.close(False)  # no byte lands in a posted buffer after this
            closed = True
            with torch.no_grad():
                for handle, i, slot, whole in inflight:  # keep what arrived, in whatever order
                    if self.transport.completed(handle):
                        finish(i, slot, whole)
            exc.completed = set(completed)  # type: ignore[attr-defined]
            exc.received_bytes = self.transport.received_bytes  # type: ignore[attr-defined]
            raise
        finally:
            if not closed:
                self.transport.close(ok)
            inflight.clear()
            self._release()
        return completed


def sequence_of(missing: Sequence[tuple[int, int]]) -> list[int]:
    """The plan's message indices listed by ``[start, end)`` ranges, in order."""
    return [i for start, end in missing for i in range(start, end)]

