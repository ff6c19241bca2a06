"""Which bytes of a filling server (a relay) are in place, and waiting for the ones that are not yet.

A :class:`~netloader.server.WeightServer` started with ``ready=False`` serves while its :meth:`fill` loads it.
The fill reports every message of *its* plan once its bytes are in place (:meth:`Availability.mark`); a transfer
the relay serves asks, before it reads a message of *its own* plan from the tensors, for that message's bytes
(:meth:`Availability.wait`). The two plans may differ (a downstream client may ask for smaller buckets), so what
is tracked is tensor bytes: per tensor, the byte ranges in place. A message is served only once every byte it
carries is in place; if the fill fails, every waiting and later transfer fails at once with the reason, so a
downstream client moves on to another source and nothing half-written is ever served as complete.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from .errors import TransferError, TransferTimeoutError
from .plan import Segment

#: how often a waiting transfer checks its own health (its client's heartbeats) while it waits
_POLL = 0.05


class Availability:
    """Tensor bytes in place, per tensor, for ``sizes[i]``-byte moving tensors (thread-safe)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self._sizes = list(sizes)
        self._cv = threading.Condition()
        #: per incomplete tensor: sorted, disjoint, non-adjacent ``[start, end)`` ranges in place
        self._spans: dict[int, list[tuple[int, int]]] = {}
        self._whole = [size == 0 for size in self._sizes]
        self._incomplete = sum(1 for w in self._whole if not w)
        self.total = sum(self._sizes)
        self.bytes = 0
        self.failed: str | None = None

    # ------------------------------------------------------------------ the fill's side

    def mark(self, segments: Iterable[Segment]) -> None:
        """These tensor bytes are in place now."""
        with self._cv:
            for seg in segments:
                self._add(seg.index, seg.start, seg.start + seg.length)
            self._cv.notify_all()

    def _add(self, index: int, start: int, end: int) -> None:
        if self._whole[index] or start >= end:
            return
        spans = self._spans.setdefault(index, [])
        at = bisect.bisect_left(spans, (start, start))
        if at and spans[at - 1][1] >= start:  # merge with the span before
            at -= 1
        new_start, new_end, last = start, end, at
        while last < len(spans) and spans[last][0] <= new_end:
            new_start, new_end = min(new_start, spans[last][0]), max(new_end, spans[last][1])
            last += 1
        before = sum(e - s for s, e in spans[at:last])
        spans[at:last] = [(new_start, new_end)]
        self.bytes += (new_end - new_start) - before
        if spans == [(0, self._sizes[index])]:
            self._whole[index] = True
            self._incomplete -= 1
            del self._spans[index]

    def fail(self, reason: str) -> None:
        """The fill failed: nothing more will arrive; every waiting transfer gives up now."""
        with self._cv:
            self.failed = reason
            self._cv.notify_all()

    def reset(self) -> None:
        """Forget what is in place (before a new fill)."""
        with self._cv:
            self._spans.clear()
            self._whole = [size == 0 for size in self._sizes]
            self._incomplete = sum(1 for w in self._whole if not w)
            self.bytes = 0
            self.failed = None
            self._cv.notify_all()

    # ------------------------------------------------------------------ the serving side

    @property
    def complete(self) -> bool:
        return self._incomplete == 0

    @property
    def progress(self) -> float:
        return self.bytes / self.total if self.total else 1.0

    def _covered(self, seg: Segment) -> bool:
        if self._whole[seg.index]:
            return True
        spans = self._spans.get(seg.index)
        if not spans:
            return False
        at = bisect.bisect_right(spans, (seg.start, float("inf"))) - 1
        return at >= 0 and spans[at][0] <= seg.start and seg.start + seg.length <= spans[at][1]

    def wait(self, segments: Sequence[Segment], timeout: float, check: Callable[[], None]) -> None:
        """Return once every byte of ``segments`` is in place; raise :class:`TransferError` at once if the fill
        failed, :class:`TransferTimeoutError` after ``timeout`` seconds, or whatever ``check`` raises."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cv:
                if self.failed is not None:
                    raise TransferError(f"this relay's own load failed, it cannot serve the rest: {self.failed}")
                if self._incomplete == 0 or all(self._covered(seg) for seg in segments):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransferTimeoutError(f"this relay's own load did not bring the next message in {timeout:g} s")
                self._cv.wait(min(remaining, _POLL))
            check()
