"""Transfer plan: which bytes travel in which message, computed from a manifest alone.

Both sides compute the same plan from the same manifest and :class:`PlanParams`, so nothing about the plan
crosses the wire except the parameters. The plan knows nothing about sockets or devices; the data plane
executes it (the split torch.distributed.checkpoint makes between a plan and the storage that runs it).

- A tensor of at least ``direct_threshold`` bytes travels *direct*: its bytes go straight from the source
  tensor into the destination tensor, in chunks of at most ``chunk_size`` bytes.
- Smaller tensors are *packed*, in manifest order, into messages of at most ``bucket_size`` bytes, each at
  an offset aligned to its element size.
- Tensors of zero bytes (0-size) need no message at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .errors import ConfigError
from .manifest import Manifest, element_size

MiB = 1 << 20
#: ``netloader bench`` bucket sweep, 20 000-tensor MoE model, 2 vCPUs: 2-32 MiB within noise of each other
#: (0.87-0.93 GB/s), 64 MiB 0.72 GB/s; 8 MiB keeps the staging memory (2 buckets per side) at 16 MiB
DEFAULT_BUCKET_SIZE = 8 * MiB
DEFAULT_DIRECT_THRESHOLD = 1 * MiB
#: large tensors travel in pieces this big: a failover loses at most the piece each stream was receiving.
#: In-process loopback, 512 MiB of 64 MiB tensors, medians of 3 on a busy 2-vCPU machine: 16 MiB 0.35 s,
#: 64 MiB 0.38 s, 256 MiB 0.39 s (within noise of each other)
DEFAULT_CHUNK_SIZE = 16 * MiB
MIN_BUCKET_SIZE = 64 * 1024
MAX_BUCKET_SIZE = 4096 * MiB


@dataclass(frozen=True)
class PlanParams:
    bucket_size: int = DEFAULT_BUCKET_SIZE
    direct_threshold: int = DEFAULT_DIRECT_THRESHOLD
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        for name in ("bucket_size", "direct_threshold", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, got {value!r}")
        if not MIN_BUCKET_SIZE <= self.bucket_size <= MAX_BUCKET_SIZE:
            raise ConfigError(f"bucket_size must be within [{MIN_BUCKET_SIZE}, {MAX_BUCKET_SIZE}] bytes")
        if not 1 <= self.direct_threshold <= self.bucket_size:
            raise ConfigError("direct_threshold must be within [1, bucket_size]")
        if not MIN_BUCKET_SIZE <= self.chunk_size <= MAX_BUCKET_SIZE:
            raise ConfigError(f"chunk_size must be within [{MIN_BUCKET_SIZE}, {MAX_BUCKET_SIZE}] bytes")


class Segment(NamedTuple):
    """``length`` bytes of moving tensor ``index`` starting at byte ``start``, at byte ``offset`` of the message."""

    index: int
    start: int
    length: int
    offset: int


@dataclass(frozen=True)
class Op:
    """One message. ``packed`` messages go through a staging buffer; direct ones hold one segment.

    ``split`` cuts the message into consecutive pieces (segments and the alignment gaps between them) and
    ``pick`` says which piece holds each segment, so an executor can slice a buffer in one call.
    """

    nbytes: int
    segments: tuple[Segment, ...]
    packed: bool
    #: tensor bytes carried (``nbytes`` less alignment gaps)
    payload: int
    split: tuple[int, ...] = ()
    pick: tuple[int, ...] = ()


@dataclass(frozen=True)
class TransferPlan:
    params: PlanParams
    ops: tuple[Op, ...]

    def payload_from(self, op_index: int = 0) -> int:
        """Tensor bytes carried by ops ``op_index..`` (all of them by default)."""
        return sum(op.payload for op in self.ops[op_index:])


def make_plan(manifest: Manifest, params: PlanParams | None = None) -> TransferPlan:
    params = params or PlanParams()
    ops: list[Op] = []
    bucket: list[Segment] = []
    filled = 0

    def flush() -> None:
        nonlocal bucket, filled
        if bucket:
            split: list[int] = []
            pick: list[int] = []
            end = 0
            for seg in bucket:
                if seg.offset > end:
                    split.append(seg.offset - end)
                pick.append(len(split))
                split.append(seg.length)
                end = seg.offset + seg.length
            payload = sum(seg.length for seg in bucket)
            ops.append(Op(filled, tuple(bucket), packed=True, payload=payload, split=tuple(split), pick=tuple(pick)))
        bucket, filled = [], 0

    for index, spec in enumerate(manifest.moving):
        size = spec.nbytes
        if size == 0:
            continue
        if size >= params.direct_threshold:
            for start in range(0, size, params.chunk_size):
                length = min(params.chunk_size, size - start)
                ops.append(Op(length, (Segment(index, start, length, 0),), packed=False, payload=length))
            continue
        align = element_size(spec.dtype)  # typed views of packed bytes need aligned offsets
        offset = -(-filled // align) * align
        if offset + size > params.bucket_size:
            flush()
            offset = 0
        bucket.append(Segment(index, 0, size, offset))
        filled = offset + size
    flush()
    return TransferPlan(params, tuple(ops))
