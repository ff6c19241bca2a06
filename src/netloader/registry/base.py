"""What a registry holds and the small interface every backend implements.

A :class:`SourceRecord` describes one live source (one ``WeightServer``): its identity, where it listens and how
busy it is. Records are keyed by :func:`identity_key`, a hash of the whole identity (model id, rank and every
layout entry, the role included), so a lookup by identity never sees another partition's records; a per-model
index answers "how many sources of this model serve other identities", the usual mistake.

Everything read from a registry is untrusted: a record is at most :data:`MAX_RECORD_BYTES`, validated strictly
(unknown fields, wrong types and out-of-range values refused), and a lookup reads at most
:data:`MAX_RECORDS_PER_LOOKUP` records. A bad record is skipped with one log line, never raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from ..manifest import Identity
from ..protocol import Layout, parse_address

logger = logging.getLogger("netloader")

#: a record larger than this is skipped unread
MAX_RECORD_BYTES = 64 * 1024
#: records read per lookup at most (a fleet larger than this is sampled)
MAX_RECORDS_PER_LOOKUP = 128
#: records a listing (the CLI) reads at most
MAX_RECORDS_PER_LISTING = 10_000
#: a record may ask to stay visible this long after its last heartbeat, no longer
MAX_TTL = 300.0
DEFAULT_TTL = 10.0
DEFAULT_HEARTBEAT = 2.0
#: seconds every registry call may take (connect, each command)
DEFAULT_TIMEOUT = 2.0
#: a record whose own clock claims a heartbeat further in the future than this is refused
MAX_CLOCK_SKEW = 60.0

State = Literal["ready", "filling"]
_Hex16 = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
_Time = Annotated[float, Field(ge=0, le=1e11)]
_Count = Annotated[int, Field(ge=0, le=2**62)]


class SourceRecord(BaseModel):
    """One live source as published in a registry. Never holds the token (only whether one is required)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    format: Literal[1] = 1
    source_id: _Hex16 = Field(description="random per server instance: several sources share an identity")
    model_id: str = Field(min_length=1, max_length=1024)
    rank: _Count
    layout: Layout
    address: str = Field(min_length=3, max_length=300, description="host:port a client connects to")
    state: State = Field(description="ready: holds every weight; filling: still receiving them (fan-out)")
    progress: float = Field(ge=0.0, le=1.0, description="fraction of the weights held")
    active_transfers: _Count
    max_concurrent: Annotated[int, Field(ge=1, le=2**31)]
    tensors: _Count
    bytes: _Count
    backend: str = Field(max_length=32)
    auth: bool = Field(description="whether the source asks for a token")
    version: str = Field(max_length=64, description="netloader version of the source")
    started_at: _Time
    heartbeat_at: _Time = Field(description="the source's own clock; liveness is judged by the registry")
    ttl: float = Field(gt=0, le=MAX_TTL, description="seconds the record stays visible after a heartbeat")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        try:
            parse_address(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @property
    def identity(self) -> Identity:
        return Identity.build(self.model_id, self.rank, self.layout)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


@dataclass(frozen=True)
class LiveSource:
    """A record a registry judged live, and how long ago the registry last saw it refreshed (by its own clock:
    the file's modification time, or the Redis key's remaining TTL; never the record's own claim)."""

    record: SourceRecord
    age: float


def identity_key(identity: Identity) -> str:
    """32 hex digits naming exactly one identity (model id, rank, every layout entry)."""
    canonical = json.dumps(identity.to_wire(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def holds(record: SourceRecord, identity: Identity) -> bool:
    """Whether ``record`` serves exactly ``identity`` (cheaper than comparing :func:`identity_key`)."""
    return record.model_id == identity.model_id and record.rank == identity.rank and record.layout == identity.layout


def model_key(model_id: str) -> str:
    """16 hex digits naming a model id (the index of the 'other identities of this model' count)."""
    return hashlib.sha256(model_id.encode()).hexdigest()[:16]


class _OnceLog:
    """Logs one line per distinct thing (a bad record seen at every lookup is reported once)."""

    def __init__(self, limit: int = 4096) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._limit = limit

    def warning(self, key: str, message: str, *args: object) -> None:
        with self._lock:
            if key in self._seen:
                return
            if len(self._seen) >= self._limit:
                self._seen.clear()
            self._seen.add(key)
        logger.warning(message, *args)


skipped = _OnceLog()


def parse_record(data: bytes, where: str) -> SourceRecord | None:
    """A record from untrusted bytes, or None (logged once for ``where``) if it is oversized or invalid."""
    if len(data) > MAX_RECORD_BYTES:
        skipped.warning(where, "netloader registry: skipping %s: larger than %d bytes", where, MAX_RECORD_BYTES)
        return None
    try:
        record = SourceRecord.model_validate_json(data)
    except (ValidationError, ValueError, RecursionError) as exc:
        first = str(exc).splitlines()
        reason = " ".join(first[:3])[:300] if first else type(exc).__name__
        skipped.warning(where, "netloader registry: skipping invalid record %s: %s", where, reason)
        return None
    if record.heartbeat_at > time.time() + MAX_CLOCK_SKEW or record.started_at > time.time() + MAX_CLOCK_SKEW:
        skipped.warning(where, "netloader registry: skipping %s: it claims a heartbeat in the future", where)
        return None
    return record


def rank_sources(live: Iterable[LiveSource]) -> list[LiveSource]:
    """Best first (the burst policy, see README "Fan-out"): sources with a free slot before full ones, then the
    fewest transfers running, then ready before filling (a relay), then the smallest share of slots in use. In a
    burst each new instance registers as ``filling`` as soon as it starts, so the next one to look finds the
    origin busy and the new relay idle and pulls from the relay: the instances form a chain, every host's link
    carries the model once, and N loads take about the time of one. The sort is stable: equally good sources
    keep the order they came in."""

    def key(entry: LiveSource) -> tuple[bool, int, bool, float]:
        r = entry.record
        full = r.active_transfers >= r.max_concurrent
        return (full, r.active_transfers, r.state != "ready", r.active_transfers / r.max_concurrent)

    return sorted(live, key=key)


class Registry(ABC):
    """Where sources publish themselves and clients find them. Every method is bounded in time; failures to
    reach the registry raise :class:`~netloader.errors.RegistryError`; bad records are skipped, never raised."""

    url: str

    @abstractmethod
    def publish(self, record: SourceRecord) -> None:
        """Write or refresh ``record``; it stays visible ``record.ttl`` seconds unless refreshed."""

    @abstractmethod
    def remove(self, record: SourceRecord) -> None:
        """Remove ``record`` now (a source that closes)."""

    @abstractmethod
    def lookup(self, identity: Identity) -> list[LiveSource]:
        """The live records of exactly ``identity`` (unordered, at most :data:`MAX_RECORDS_PER_LOOKUP`)."""

    @abstractmethod
    def count_other_identities(self, identity: Identity) -> int:
        """Live records of ``identity.model_id`` that serve another identity (rank, layout or role)."""

    @abstractmethod
    def listing(self, model_id: str | None = None) -> list[LiveSource]:
        """Every live record (of ``model_id`` if given), at most :data:`MAX_RECORDS_PER_LISTING`."""

    def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        """Release connections."""

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_ttl(ttl: float, heartbeat: float) -> None:
    """Heartbeat and ttl as a publisher uses them: the record must be refreshed well within its ttl."""
    for name, value in (("registry_ttl", ttl), ("registry_heartbeat", heartbeat)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    if not 0 < ttl <= MAX_TTL:
        raise ConfigError(f"registry_ttl must be within (0, {MAX_TTL:g}] seconds, got {ttl!r}")
    if not 0 < heartbeat < ttl:
        raise ConfigError(f"registry_heartbeat must be positive and below registry_ttl ({ttl:g} s), got {heartbeat!r}")
