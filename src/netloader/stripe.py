"""Striping: the work of one load split into units that several sources' sessions take on demand.

A striped load (``load_weights(..., max_sources=k)``) runs one transfer session per source at once; each
session asks its source for a unit of the plan's messages at a time, keeping one more unit requested ahead so the
source's link never idles, and takes its next unit from this shared pool when it reaches the end of the one
it is receiving: a faster source simply takes more units (work stealing from one queue). A failed session's
unfinished messages go back to the front of the pool for the others. This module is the bookkeeping only
(no sockets): which messages are still to be fetched, in which units, and which are in place.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence

from .plan import TransferPlan

MiB = 1 << 20
#: bounds of a unit's size: big enough that asking for it costs nothing next to moving it, small enough that the
#: last units spread over the sources (a 200 MiB model over 4 sources: 12.5 MiB units)
MIN_UNIT = 4 * MiB
MAX_UNIT = 64 * MiB
#: units per source the work is cut into (before the bounds)
UNITS_PER_SOURCE = 4
#: units a session receives at once (the receive window takes no more, however few messages they hold); with the
#: one it asks for ahead, a session holds three units and the rest stay in the pool for the other sources
STRIPE_OPEN_UNITS = 2
#: most messages in one unit (a unit travels as ranges in one ``more``; see protocol.MAX_MORE_RANGES)
MAX_UNIT_OPS = 1024


def unit_size(total: int, sources: int) -> int:
    return max(MIN_UNIT, min(MAX_UNIT, total // max(1, sources * UNITS_PER_SOURCE)))


def cut_units(
    plan: TransferPlan, indices: Sequence[int], size: int, keep_together: Callable[[int], bool]
) -> list[list[int]]:
    """``indices`` (sorted) cut into consecutive units of about ``size`` payload bytes. Direct chunks of a tensor
    for which ``keep_together(tensor index)`` is true stay in one unit (a non-contiguous destination tensor is
    assembled whole by the session that receives it)."""
    units: list[list[int]] = []
    unit: list[int] = []
    filled = 0
    ops = plan.ops
    for i in indices:
        op = ops[i]
        if unit and (filled >= size or len(unit) >= MAX_UNIT_OPS):
            prev = ops[unit[-1]]
            same = (
                not op.packed and not prev.packed and op.segments[0].index == prev.segments[0].index
                and keep_together(op.segments[0].index)
            )
            if not same:
                units.append(unit)
                unit, filled = [], 0
        unit.append(i)
        filled += op.payload
    if unit:
        units.append(unit)
    return units


class WorkPool:
    """The messages of one striped load still to fetch, as units handed out in order (thread-safe)."""

    def __init__(self, plan: TransferPlan, units: list[list[int]], size: int,
                 keep_together: Callable[[int], bool]) -> None:
        self.plan = plan
        self.size = size
        self._keep_together = keep_together
        self._lock = threading.Lock()
        self._units: deque[list[int]] = deque(units)
        self._missing = {i for u in units for i in u}  # handed out or pending, not yet in place

    def take(self) -> list[int] | None:
        with self._lock:
            return self._units.popleft() if self._units else None

    def give_back(self, indices: Sequence[int]) -> None:
        """A failed session's unfinished messages: first in line for the others."""
        if not indices:
            return
        units = cut_units(self.plan, sorted(indices), self.size, self._keep_together)
        with self._lock:
            self._units.extendleft(reversed(units))

    def again(self, indices: Sequence[int], *, whole: bool) -> None:
        """Messages that were in place but must be fetched again (they carried a tensor that failed its digest
        check): first in line, as one unit when ``whole`` (so that one source sends every byte of the tensor and
        a second mismatch can be pinned on it)."""
        if not indices:
            return
        ordered = sorted(indices)
        if whole and len(ordered) <= MAX_UNIT_OPS:
            units = [ordered]
        else:
            units = cut_units(self.plan, ordered, self.size, self._keep_together)
        with self._lock:
            self._missing.update(ordered)
            self._units.extendleft(reversed(units))

    def done(self, index: int) -> None:
        """Message ``index`` is in place."""
        with self._lock:
            self._missing.discard(index)

    @property
    def finished(self) -> bool:
        with self._lock:
            return not self._missing

    @property
    def pending(self) -> bool:
        with self._lock:
            return bool(self._units)
