"""End-to-end integrity: one digest per tensor, computed by the origin, checked by every client.

The instance that loaded from disk (the *origin*) computes a 64-bit digest of every moving tensor's bytes (in
row-major order, whatever its strides) once, when it first serves; the digests travel in the manifest message,
and a server built with digests it was given (a relay) serves exactly those, never its own. A client hashes each
tensor once all the plan messages that carry it are in place and compares: whatever path the bytes took, they
are checked against the origin's.

Two algorithms, chosen by where the origin's tensors live:

- ``xxh3-64`` (CPU): xxHash's XXH3 over the tensor's raw memory, without a copy (a memoryview slice at the data
  pointer; the hash releases the GIL, so transfer threads keep running meanwhile). ~18 GB/s on one core here.
- ``sum64`` (CUDA and other accelerators): a torch reduction on the device, no host copy: the bytes as 32-bit
  words (bytes when the length is not a multiple of 4), each multiplied by an odd position-dependent constant,
  summed with 64-bit wrap-around, mixed with the length. Any change confined to one word always changes it
  (odd multipliers are invertible modulo 2^64); swapped or shifted words change it unless their differences
  happen to cancel modulo 2^64. Weaker than a real hash, chosen for running as one reduction on the device.
  It runs on any device, so its tests run on CPU here; on CUDA it was not run on this machine (no GPU).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import xxhash

from .errors import ProtocolError
from .manifest import Manifest, TensorSet
from .plan import TransferPlan

ALGORITHMS = ("xxh3-64", "sum64")
#: hex characters of one digest on the wire
DIGEST_HEX = 16
_MASK = (1 << 64) - 1
#: the sum64 reduction walks a tensor in pieces of this many bytes (bounds its temporaries on the device)
_SUM64_CHUNK = 16 << 20
_K1 = 0x9E3779B97F4A7C15  # odd: every position's multiplier (2i+1)*K1 is odd
_K2 = 0xC2B2AE3D27D4EB4F


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def default_algorithm(device: torch.device) -> str:
    return "xxh3-64" if device.type == "cpu" else "sum64"


def _row_major(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_contiguous() else tensor.contiguous()


#: this process's memory as one read-only byte view, sliced per tensor: a tensor's bytes as a buffer in 0.2 us,
#: where a ctypes array per tensor costs 3 us (20 000 tensors: 60 ms, a quarter of a MoE model's load here).
#: Only the slices of live tensors are ever read.
_MEMORY = memoryview((ctypes.c_char * (1 << 62)).from_address(0)).cast("B").toreadonly()
_xxh3_64 = xxhash.xxh3_64_intdigest


def _xxh3(tensor: torch.Tensor) -> int:
    if tensor.device.type != "cpu":  # only if a source chose xxh3 for a device client: a host copy, slow
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    at = tensor.data_ptr()
    return _xxh3_64(_MEMORY[at : at + tensor.nbytes])


def _sum64(tensor: torch.Tensor) -> int:
    flat = _row_major(tensor).reshape(-1).view(torch.uint8)
    nbytes = flat.numel()
    word = 4 if nbytes % 4 == 0 else 1
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    k1 = torch.tensor(_signed(_K1), dtype=torch.int64, device=flat.device)
    for start in range(0, nbytes, _SUM64_CHUNK):
        piece = flat[start : start + _SUM64_CHUNK]
        if word == 4:
            if piece.data_ptr() % 4:
                piece = piece.clone()
            words = piece.view(torch.int32).to(torch.int64)
        else:
            words = piece.to(torch.int64)
        first = start // word
        position = torch.arange(first, first + words.numel(), dtype=torch.int64, device=flat.device)
        total += (words * ((position * 2 + 1) * k1)).sum()  # int64 arithmetic wraps around
    return (int(total.item()) + nbytes * _K2) & _MASK


_HASH = {"xxh3-64": _xxh3, "sum64": _sum64}


def tensor_digest(tensor: torch.Tensor, algorithm: str) -> int:
    """The 64-bit digest of ``tensor``'s bytes in row-major order."""
    return _HASH[algorithm](tensor.detach())


@dataclass(frozen=True)
class Digests:
    """One digest per moving tensor of a manifest (aligned with ``manifest.moving``), and how they were made."""

    algorithm: str
    values: tuple[int, ...]

    def to_wire(self) -> dict[str, object]:
        return {"algorithm": self.algorithm, "values": [f"{v:016x}" for v in self.values]}

    @classmethod
    def from_wire(cls, algorithm: str, values: Sequence[str], manifest: Manifest) -> Digests:
        """Digests received from a source (hex already checked by the protocol), checked against its manifest."""
        if algorithm not in ALGORITHMS:
            raise ProtocolError(f"unknown digest algorithm {algorithm!r}")
        moving = sum(1 for s in manifest.specs if s.tied_to is None)
        if len(values) != moving:
            raise ProtocolError(f"the source sent {len(values)} digests for {moving} tensors")
        return cls(algorithm, tuple(int(v, 16) for v in values))

    def check_for(self, manifest: Manifest) -> None:
        """Raise ValueError unless these digests can describe ``manifest`` (one per moving tensor, known algorithm)."""
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown digest algorithm {self.algorithm!r}")
        moving = sum(1 for s in manifest.specs if s.tied_to is None)
        if len(self.values) != moving:
            raise ValueError(f"{len(self.values)} digests given for {moving} tensors")
        if any(not 0 <= v <= _MASK for v in self.values):
            raise ValueError("a digest is not a 64-bit unsigned value")


def digests_of(tensors: TensorSet, algorithm: str | None = None) -> Digests:
    """Hash every moving tensor of ``tensors`` (the origin's job, once)."""
    algorithm = algorithm or default_algorithm(tensors.device)
    digest = _HASH[algorithm]
    with torch.no_grad():
        return Digests(algorithm, tuple(digest(t) for t in tensors.tensors))


def mismatches(tensors: TensorSet, digests: Digests, indices: Iterable[int] | None = None) -> list[int]:
    """The moving tensors (indices) whose bytes no longer hash to ``digests`` (all of them, or ``indices``)."""
    digest = _HASH[digests.algorithm]
    chosen = range(len(tensors.tensors)) if indices is None else indices
    with torch.no_grad():
        return [i for i in chosen if digest(tensors.tensors[i]) != digests.values[i]]


def ops_covering(plan: TransferPlan, indices: Iterable[int]) -> set[int]:
    """The plan's messages that carry any byte of the moving tensors ``indices``."""
    wanted = set(indices)
    return {i for i, op in enumerate(plan.ops) if any(seg.index in wanted for seg in op.segments)}


class Verifier:
    """A client's check of one transfer: each tensor is hashed once every message carrying it is in place.

    ``kept``: messages already in place before this transfer (from earlier sources); ``verified``: tensors already
    checked, by index -> the digest they matched (an earlier source's). A tensor that is already whole is checked
    at :meth:`start` unless it matched this same digest before. :meth:`on_op` runs on the loading thread, between
    messages, while the transport's threads keep receiving the next ones.
    """

    def __init__(
        self, plan: TransferPlan, target: TensorSet, digests: Digests, kept: set[int], verified: dict[int, int]
    ) -> None:
        self.plan = plan
        self.target = target
        self.digests = digests
        self.verified = verified
        self.bad: list[int] = []
        self._hash = _HASH[digests.algorithm]
        self._cpu = digests.algorithm == "xxh3-64" and target.device.type == "cpu"
        self._values = digests.values
        self._tensors = target.tensors
        self._remaining = [0] * len(target.tensors)
        for i, op in enumerate(plan.ops):
            if i not in kept:
                for seg in op.segments:
                    self._remaining[seg.index] += 1
        for index, left in enumerate(self._remaining):
            if left:  # its bytes arrive again: what an earlier source's bytes matched no longer counts
                self.verified.pop(index, None)

    def start(self) -> None:
        """Check the tensors already whole (zero-byte ones, those kept from an earlier source)."""
        for index, left in enumerate(self._remaining):
            if not left and self.verified.get(index) != self.digests.values[index]:
                self._check(index)

    def on_op(self, op_index: int) -> None:
        remaining = self._remaining
        for seg in self.plan.ops[op_index].segments:
            index = seg[0]
            left = remaining[index] - 1
            remaining[index] = left
            if not left:
                self._check(index)

    def _check(self, index: int) -> None:
        expected = self._values[index]
        tensor = self._tensors[index]
        if self._cpu and tensor.is_contiguous():  # the common case, kept lean: 20 000 tensors per load
            at = tensor.data_ptr()
            got = _xxh3_64(_MEMORY[at : at + tensor.nbytes])
        else:
            with torch.no_grad():
                got = self._hash(tensor)
        if got == expected:
            self.verified[index] = expected
        else:
            self.verified.pop(index, None)
            self.bad.append(index)

    @property
    def complete(self) -> bool:
        """Every tensor is whole and was checked."""
        return not any(self._remaining) and len(self.verified) == len(self.target.tensors)

    def bad_names(self) -> list[str]:
        moving = [s.name for s in self.target.manifest.specs if s.tied_to is None]
        return [moving[i] for i in self.bad]


class StripedVerifier:
    """A striped load's check: messages arrive from several sources' sessions at once (thread-safe), and the source
    of each message is remembered, so that a tensor whose bytes do not match the origin's digest can be pinned on
    the source that sent them.

    :meth:`on_op` returns the tensors found bad; :meth:`blame` says who sent a bad tensor and marks the messages
    carrying it as not in place again (every tensor sharing one of those messages is checked again when it is
    refetched).
    """

    def __init__(self, plan: TransferPlan, target: TensorSet, digests: Digests) -> None:
        self.plan = plan
        self.target = target
        self.digests = digests
        self._lock = threading.Lock()
        self._remaining = [0] * len(target.tensors)
        self._covering: list[list[int]] = [[] for _ in target.tensors]
        for i, op in enumerate(plan.ops):
            for seg in op.segments:
                self._remaining[seg.index] += 1
                self._covering[seg.index].append(i)
        self._sent_by: list[str | None] = [None] * len(plan.ops)
        self._verified: set[int] = set()
        # tensors with no bytes to move are whole now (one that does not match can never be fetched: the load
        # ends with "not checked")
        self._check_all([i for i, left in enumerate(self._remaining) if not left])

    def on_op(self, op_index: int, source: str) -> list[int]:
        whole: list[int] = []
        with self._lock:
            self._sent_by[op_index] = source
            for seg in self.plan.ops[op_index].segments:
                left = self._remaining[seg.index] - 1
                self._remaining[seg.index] = left
                if not left:
                    whole.append(seg.index)
        return self._check_all(whole)

    def _check_all(self, indices: Iterable[int]) -> list[int]:
        bad: list[int] = []
        for index in indices:  # hashed outside the lock: the other sessions keep receiving
            good = self._matches(index)
            with self._lock:
                if not good:
                    bad.append(index)
                elif not self._remaining[index]:  # not being fetched again meanwhile
                    self._verified.add(index)
        return bad

    def _matches(self, index: int) -> bool:
        tensor = self.target.tensors[index]
        if tensor.device.type == "cpu" and tensor.is_contiguous() and self.digests.algorithm == "xxh3-64":
            at = tensor.data_ptr()
            return _xxh3_64(_MEMORY[at : at + tensor.nbytes]) == self.digests.values[index]
        with torch.no_grad():
            return _HASH[self.digests.algorithm](tensor) == self.digests.values[index]

    def blame(self, index: int) -> tuple[set[str], list[int]]:
        """The sources that sent bad tensor ``index``'s bytes, and the messages to fetch again (now not in place;
        none when another bad tensor sharing them was blamed first)."""
        with self._lock:
            ops = [i for i in self._covering[index] if self._sent_by[i] is not None]
            senders = {self._sent_by[i] for i in ops}
            for i in ops:
                self._sent_by[i] = None
                for seg in self.plan.ops[i].segments:
                    self._remaining[seg.index] += 1
                    self._verified.discard(seg.index)
        return senders, ops  # type: ignore[return-value]

    def name(self, index: int) -> str:
        return [s.name for s in self.target.manifest.specs if s.tied_to is None][index]

    @property
    def complete(self) -> bool:
        """Every tensor is whole and was checked."""
        with self._lock:
            return not any(self._remaining) and len(self._verified) == len(self.target.tensors)
