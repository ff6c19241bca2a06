"""Wire protocol of the control plane: length-prefixed JSON frames over TCP, strict messages, HMAC auth.

Frame: a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding one object with a ``type``.
Every read has a size cap and a whole-message deadline; every message is validated field by field with
pydantic (unknown fields, wrong types and out-of-range values are refused). Nothing is unpickled or evaluated.

Conversation (S = source, C = client)::

    S: hello{proto, nonce, auth}        C: auth{proto, nonce, mac}        S: auth_ok{mac} | error
    C: probe                            S: info
    C: verify                           S: verify_result | error{busy}
    C: load{identity, backend, ...}     S: manifest{tensors, params} | error{busy|mismatch|...}
    C: ready{missing, more} | abort     S: rendezvous{transfer, streams, heartbeat} | error{failed}
    ... both sides: heartbeat every second (and, for torch.distributed, store_set for its rendezvous) ...
    C: more{missing} ...                (only after ready{more: true}: a striped load's next unit of work)
    C: done{ok, bytes}

A data connection (netloader streams) opens like a control connection, authenticates the same way, then::

    C: attach{transfer, stream}         S: attached | error
    S: data frames: (tag, length) header, then ``length`` payload bytes; message ``tag`` of the plan

``transfer`` is a 128-bit random id that only the authenticated control connection carried.

The MACs are HMAC-SHA256 over both nonces with a role label, so each side proves it knows the token without
sending it, and a recorded exchange cannot be replayed against a fresh nonce.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import struct
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import ConfigError, ProtocolError

PROTOCOL_VERSION = 2
#: frames a peer may send before it has authenticated
PREAUTH_MAX_FRAME = 4 * 1024
#: frames after authentication (a manifest of ~1M tensors fits)
MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Hex16 = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
ShortStr = Annotated[str, Field(max_length=1024)]
LongStr = Annotated[str, Field(max_length=16384)]
NonNeg = Annotated[int, Field(ge=0, le=2**62)]
Layout = Annotated[
    dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")], int | Annotated[str, Field(max_length=256)]],
    Field(max_length=64),
]
TensorRow = tuple[
    Annotated[str, Field(min_length=1, max_length=1024)],
    Annotated[list[NonNeg], Field(max_length=32)],
    Annotated[str, Field(max_length=32)],
    Annotated[str, Field(max_length=1024)] | None,
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Hello(_Message):
    type: Literal["hello"] = "hello"
    proto: NonNeg
    server: ShortStr
    nonce: Hex64
    auth: bool


class Auth(_Message):
    type: Literal["auth"] = "auth"
    proto: NonNeg
    nonce: Hex64
    mac: Hex64 | None


class AuthOk(_Message):
    type: Literal["auth_ok"] = "auth_ok"
    mac: Hex64 | None


class Probe(_Message):
    type: Literal["probe"] = "probe"


class Info(_Message):
    type: Literal["info"] = "info"
    version: ShortStr
    proto: NonNeg
    model_id: ShortStr
    rank: NonNeg
    layout: Layout
    backend: ShortStr
    device: ShortStr
    tensors: NonNeg
    bytes: NonNeg
    active_transfers: NonNeg
    max_concurrent: NonNeg
    transfers_served: NonNeg


class Load(_Message):
    type: Literal["load"] = "load"
    model_id: ShortStr
    rank: NonNeg
    layout: Layout
    backend: ShortStr
    bucket_size: NonNeg | None = None
    #: smaller pieces for large tensors (a relay's fill: each hop forwards a piece once it is whole)
    chunk_size: NonNeg | None = None


class PlanWire(_Message):
    bucket_size: NonNeg
    direct_threshold: NonNeg
    chunk_size: NonNeg


class DigestsWire(_Message):
    """The origin's digest of every moving tensor, in manifest order (see :mod:`netloader.integrity`)."""

    algorithm: Literal["xxh3-64", "sum64"]
    values: Annotated[list[Hex16], Field(max_length=4_000_000)]


class ManifestMsg(_Message):
    type: Literal["manifest"] = "manifest"
    tensors: Annotated[list[TensorRow], Field(max_length=4_000_000)]
    total_bytes: NonNeg
    plan: PlanWire
    digests: DigestsWire
    #: the source serves digests it was given (a relay: its bytes came from another instance), not its own
    relayed: bool = False


class Verify(_Message):
    """Ask a source to hash what it holds now and compare with the digests it serves."""

    type: Literal["verify"] = "verify"


#: most mismatching tensor names a ``verify_result`` lists (``mismatches`` counts them all)
MAX_VERIFY_NAMES = 64


class VerifyResult(_Message):
    type: Literal["verify_result"] = "verify_result"
    algorithm: ShortStr
    tensors: NonNeg
    mismatches: NonNeg
    names: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=MAX_VERIFY_NAMES)]
    seconds: Annotated[float, Field(ge=0)]
    #: the served digests were computed by this request (no load had been served yet): nothing older to compare
    computed_now: bool


#: most ranges a ``ready`` may list (a resumed load misses a tail and a few holes of its in-flight window)
MAX_MISSING_RANGES = 65536
OpRange = tuple[NonNeg, NonNeg]


class Ready(_Message):
    """``missing``: the plan's messages to send, as sorted, disjoint, non-empty ``[start, end)`` ranges (None: all).

    ``more``: a striped load; after these messages the source waits for ``more`` (the next unit, sent in the
    order the client will receive them) or ``done``.
    """

    type: Literal["ready"] = "ready"
    missing: Annotated[list[OpRange], Field(max_length=MAX_MISSING_RANGES)] | None = None
    more: bool = False


#: most ranges one ``more`` may list (a unit of work is a few consecutive ranges)
MAX_MORE_RANGES = 1024


class More(_Message):
    """The next unit of work of a striped load: more of the plan's messages, as in ``ready``."""

    type: Literal["more"] = "more"
    missing: Annotated[list[OpRange], Field(min_length=1, max_length=MAX_MORE_RANGES)]


class Abort(_Message):
    type: Literal["abort"] = "abort"
    reason: LongStr


class Rendezvous(_Message):
    """The transfer starts: its secret id, how many data streams (netloader streams) and the heartbeat period."""

    type: Literal["rendezvous"] = "rendezvous"
    transfer: Hex32
    timeout: Annotated[float, Field(gt=0, le=86400)]
    streams: Annotated[int, Field(ge=1, le=8)] = 1
    heartbeat: Annotated[float, Field(gt=0, le=3600)] = 1.0


class Attach(_Message):
    type: Literal["attach"] = "attach"
    transfer: Hex32
    stream: Annotated[int, Field(ge=0, lt=8)]


class Attached(_Message):
    type: Literal["attached"] = "attached"
    stream: Annotated[int, Field(ge=0, lt=8)]


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"


#: torch.distributed rendezvous keys and values carried by ``store_set`` (gloo: addresses; NCCL: a 128-byte id)
STORE_KEY = Annotated[str, Field(pattern=r"^[A-Za-z0-9_./:\-]{1,256}$")]
STORE_VALUE = Annotated[str, Field(max_length=65536, pattern=r"^[A-Za-z0-9+/=]*$")]


class StoreSet(_Message):
    """One key of the torch.distributed rendezvous, set by the sender's side (``value`` is base64)."""

    type: Literal["store_set"] = "store_set"
    key: STORE_KEY
    value: STORE_VALUE


class Done(_Message):
    type: Literal["done"] = "done"
    ok: bool
    bytes: NonNeg
    message: LongStr = ""


ErrorCode = Literal["busy", "auth", "mismatch", "protocol", "internal", "closing", "failed"]


class Error(_Message):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: LongStr


Message = Annotated[
    Hello
    | Auth
    | AuthOk
    | Probe
    | Info
    | Verify
    | VerifyResult
    | Load
    | ManifestMsg
    | Ready
    | More
    | Abort
    | Rendezvous
    | Attach
    | Attached
    | Heartbeat
    | StoreSet
    | Done
    | Error,
    Field(discriminator="type"),
]
_MESSAGE = TypeAdapter(Message)


class PeerClosedError(ProtocolError):
    """The peer closed the control connection."""


class FrameTimeoutError(ProtocolError, TimeoutError):
    """A whole message did not arrive (or could not be sent) before its deadline."""


def encode(message: _Message) -> bytes:
    return frame(message.model_dump_json().encode())


def encode_trusted(payload: dict[str, Any]) -> bytes:
    """Encode a message built from this process's own data (skips validation; the reader validates)."""
    return frame(json.dumps(payload, separators=(",", ":")).encode())


def frame(body: bytes) -> bytes:
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the limit of {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> _Message:
    try:
        return _MESSAGE.validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError(f"invalid message: {where}: {first.get('msg', exc)}") from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"invalid message: {exc}") from None


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FrameTimeoutError("peer did not send a whole message in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except TimeoutError:
            raise FrameTimeoutError("peer did not send a whole message in time") from None
        except OSError as exc:
            raise PeerClosedError(f"connection lost: {exc}") from None
        if not chunk:
            raise PeerClosedError("connection closed by peer")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_message(sock: socket.socket, *, timeout: float, max_size: int = MAX_FRAME) -> _Message:
    """Read one whole frame within ``timeout`` seconds (whole-message deadline) and validate it."""
    deadline = time.monotonic() + timeout
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size, deadline))
    if length > max_size:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_size}")
    return decode(_recv_exact(sock, length, deadline))


def expect(message: _Message, *types: type[_Message]) -> Any:
    """Return ``message`` if it is one of ``types``; turn an ``error`` message or anything else into an error."""
    if isinstance(message, types):
        return message
    if isinstance(message, Error):
        raise RemoteError(message.code, message.message)
    wanted = "/".join(t.model_fields["type"].default for t in types)
    raise ProtocolError(f"expected {wanted}, got {message.type}")  # type: ignore[attr-defined]


class RemoteError(ProtocolError):
    """The peer answered with an ``error`` message; ``code`` says which kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def send_message(sock: socket.socket, message: _Message, *, timeout: float) -> None:
    send_frame(sock, encode(message), timeout=timeout)


def send_frame(sock: socket.socket, data: bytes, *, timeout: float) -> None:
    """Send an already encoded frame within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
    except TimeoutError:
        raise FrameTimeoutError("peer did not accept a message in time") from None
    except OSError as exc:
        raise PeerClosedError(f"connection lost: {exc}") from None


def new_nonce() -> str:
    return secrets.token_hex(32)


def compute_mac(token: str, role: str, first_nonce: str, second_nonce: str) -> str:
    msg = f"netloader/{PROTOCOL_VERSION}/{role}/{first_nonce}/{second_nonce}".encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def client_mac(token: str, server_nonce: str, client_nonce: str) -> str:
    return compute_mac(token, "client", server_nonce, client_nonce)


def server_mac(token: str, server_nonce: str, client_nonce: str) -> str:
    return compute_mac(token, "server", client_nonce, server_nonce)


def macs_equal(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6addr]:port"`` -> (host, port)."""
    if not isinstance(address, str):
        raise ConfigError(f"address must be a string 'host:port', got {address!r}")
    host, sep, port_text = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"address {address!r} is not of the form host:port")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: data frame header: tag (the message's index in the plan), payload length
DATA_HEADER = struct.Struct(">IQ")


def validate_missing(missing: list[tuple[int, int]] | None, n_ops: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of a ``ready``, checked against a plan of ``n_ops`` messages (None: all)."""
    if missing is None:
        return [(0, n_ops)] if n_ops else []
    last = -1
    for start, end in missing:
        if not start < end <= n_ops:
            raise ProtocolError(f"range [{start}, {end}) is empty or beyond the plan's {n_ops} messages")
        if start <= last:
            raise ProtocolError("ranges must be sorted and disjoint")
        last = end - 1
    return list(missing)


def ranges_of(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct indices -> ``[start, end)`` ranges."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def tune_socket(sock: socket.socket) -> None:
    """Control connections carry small messages (no Nagle) and should notice a vanished peer (keepalive)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
