"""The client: prove it asks for the same thing, then receive every tensor in place from the first source that can."""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .channel import Channel
from .errors import (
    AuthenticationError,
    BusyError,
    ConfigError,
    ConnectError,
    IdentityMismatchError,
    IntegrityError,
    NetloaderError,
    NoSourceError,
    ProtocolError,
    TransferError,
    TransferTimeoutError,
)
from .executor import Receiver, sequence_of
from .integrity import Digests, Verifier, ops_covering
from .manifest import Identity, LayoutValue, Manifest, TensorSet
from .plan import PlanParams, TransferPlan, make_plan
from .protocol import (
    PREAUTH_MAX_FRAME,
    PROTOCOL_VERSION,
    Abort,
    Attach,
    Attached,
    Auth,
    AuthOk,
    Done,
    FrameTimeoutError,
    Hello,
    Info,
    Load,
    ManifestMsg,
    PeerClosedError,
    Probe,
    Ready,
    RemoteError,
    Rendezvous,
    Verify,
    VerifyResult,
    client_mac,
    expect,
    macs_equal,
    new_nonce,
    parse_address,
    ranges_of,
    read_message,
    send_message,
    server_mac,
    tune_socket,
)
from .server import DEFAULT_HEARTBEAT_TIMEOUT, check_heartbeat_timeout
from .transport.base import Transport, resolve_transport
from .transport.dist import CLIENT_RANK, ControlStore, DistTransport, form_group
from .transport.streams import StreamTransport, tune_data_socket

logger = logging.getLogger("netloader")

DEFAULT_TIMEOUT = 60.0


@dataclass
class LoadReport:
    """What :func:`load_weights` did."""

    source: str
    bytes: int
    seconds: float
    tensors: int
    #: sources tried before ``source`` and why each failed
    failures: dict[str, BaseException] = field(default_factory=dict)
    #: first message of the plan received from ``source`` (non-zero when a load resumed after a failed source)
    resumed_at: int = 0
    #: tensor bytes already in place from failed sources, not fetched again (``bytes`` came from ``source``)
    resumed_bytes: int = 0
    #: bytes that had arrived from failed sources in messages that did not complete, so were fetched again
    refetched_bytes: int = 0
    #: the transport the bytes came over ("streams", "gloo", "nccl", "hccl")
    transport: str = ""
    #: every tensor was checked against the origin's digests (``verify``)
    verified: bool = False
    #: sources that sent bytes not matching the origin's digests -> the tensors (refetched from the next source)
    corrupt: dict[str, list[str]] = field(default_factory=dict)
    #: the origin's digests the load was checked against: what a relay serving these tensors passes on
    digests: Digests | None = None

    @property
    def throughput(self) -> float:
        """GB/s (10^9 bytes per second) over the whole load, handshake included."""
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"loaded {self.tensors} tensors, {self.bytes / 1e9:.3f} GB from {self.source} "
            f"in {self.seconds:.2f} s ({self.throughput:.2f} GB/s)"
        )


@dataclass
class _Resume:
    """What earlier sources left in place, for the next one (only reusable under the same plan)."""

    params: PlanParams | None = None
    completed: set[int] = field(default_factory=set)
    kept_bytes: int = 0
    refetched_bytes: int = 0
    #: moving tensors already checked -> the digest they matched
    verified: dict[int, int] = field(default_factory=dict)
    #: source -> names of the tensors it sent corrupt
    corrupt: dict[str, list[str]] = field(default_factory=dict)


def load_weights(
    model: nn.Module | Mapping[str, torch.Tensor],
    sources: Sequence[str] | None = None,
    *,
    registry: str | None = None,
    model_id: str,
    rank: int = 0,
    layout: Mapping[str, LayoutValue] | None = None,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool | None = None,
    bucket_size: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    transport: str = "auto",
    verify: bool | None = None,
) -> LoadReport:
    """Fill ``model``'s tensors in place from the first source in ``sources`` that can serve them.

    Sources are tried in order; one that is unreachable, busy, refuses, mismatches or fails mid-transfer is
    skipped for the next (a load that failed part-way resumes where it stopped when the next source uses the
    same plan). ``timeout`` bounds every step that waits on a source (connecting, each control message, each
    data message): a stalled source is abandoned after at most that long. During the transfer both sides
    exchange heartbeats every second: a source that goes silent for ``heartbeat_timeout`` seconds (partitioned,
    stopped, hung) is given up at once, whatever ``timeout`` is. Every message fully in place counts: the next
    source is asked for exactly the missing ones. ``transport``: ``"auto"`` (netloader streams on CPU, NCCL on
    CUDA, HCCL on Ascend) or ``"gloo"`` (CPU, trusted networks only; the source must offer it). ``progress``
    shows a tqdm bar (default: when stderr is a terminal); ``on_progress(bytes_done, bytes_total)`` is called after each
    message from the loading thread. ``bucket_size`` asks the source for smaller packed messages. Raises
    :class:`~netloader.NoSourceError` listing every source and its reason when none succeeds; if the last
    failure happened mid-transfer the target is partly written and must not be used.

    ``registry`` (a URL, see :mod:`netloader.registry`): after the explicit ``sources``, try the registry's live
    sources of exactly this identity, best first. With no explicit source and none in the registry,
    :class:`~netloader.NoSourceError` is raised at once, saying how many the registry has for other identities
    of the same ``model_id``.

    ``verify``: hash every tensor once its bytes are in place and compare with the origin's digest, which the
    source sends with its manifest (see :mod:`netloader.integrity`). A source whose bytes do not match is dropped
    and the messages carrying the bad tensors are fetched from the next source; the report names them
    (``LoadReport.corrupt``). With no source left, :class:`~netloader.IntegrityError` is raised. None (the
    default): on when the source is a relay (it serves digests it was given: its bytes crossed another hop) and
    for every source after one that sent corrupt bytes, off when the source is the origin itself: measured, the
    check costs more than 10% of a load on a 2-core machine (README, Integrity).
    """
    if isinstance(sources, str):
        sources = [sources]
    sources = list(sources or [])
    for source in sources:
        parse_address(source)  # a malformed address is the caller's error, not a source's
    identity = Identity.build(model_id, rank, layout)
    if not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
        raise ConfigError(f"timeout must be a number of seconds in (0, 86400], got {timeout!r}")
    if bucket_size is not None:
        PlanParams(bucket_size, 1)  # validates the range
    check_heartbeat_timeout(heartbeat_timeout)
    if not isinstance(transport, str):
        raise ConfigError(f"transport must be a string, got {transport!r}")
    if verify is not None and not isinstance(verify, bool):
        raise ConfigError(f"verify must be True, False or None, got {verify!r}")
    options = _Options(float(timeout), float(heartbeat_timeout), transport, progress, bucket_size, on_progress, verify)
    if registry is not None:
        from .registry import DEFAULT_TIMEOUT as REGISTRY_TIMEOUT
        from .registry import find_sources

        sources = find_sources(registry, identity, sources, timeout=min(float(timeout), REGISTRY_TIMEOUT))
    with _gc_paused():
        return _load(model, sources, identity, token, options)


@dataclass(frozen=True)
class _Options:
    timeout: float
    heartbeat_timeout: float
    transport: str
    progress: bool | None
    bucket_size: int | None
    on_progress: Callable[[int, int], None] | None
    verify: bool | None = None


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a load runs.

    A load allocates tens of thousands of small objects for a model with tens of thousands of tensors (specs,
    shapes, plan segments), which triggers a full collection: a traversal of the whole host process's heap,
    180 ms in a benchmark process with a 20 000-tensor model, far more in a serving engine. Nothing a load
    allocates forms cycles; collection resumes (and catches up) when the load returns.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load(
    model: nn.Module | Mapping[str, torch.Tensor],
    sources: Sequence[str],
    identity: Identity,
    token: str | None,
    options: _Options,
) -> LoadReport:
    target = TensorSet(model)
    kind = resolve_transport(options.transport, target.device)
    show = sys.stderr.isatty() if options.progress is None else options.progress
    failures: dict[str, BaseException] = {}
    resume = _Resume()
    for source in sources:
        try:
            return _load_from(source, target, identity, kind, token, options, show, resume, failures)
        except NetloaderError as exc:
            failures[source] = exc
            logger.warning("netloader: source %s failed: %s: %s", source, type(exc).__name__, exc)
    if resume.corrupt:
        named = "; ".join(f"{src}: {_names(names)}" for src, names in resume.corrupt.items())
        others = "".join(f"\n  {src}: {type(err).__name__}: {err}" for src, err in failures.items())
        raise IntegrityError(
            f"tensors arrived that do not match the origin's digests and no other source could replace them "
            f"({named}); the target must not be used. Every source tried:{others}",
            resume.corrupt, failures,
        )
    raise NoSourceError(failures)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def probe(address: str, *, token: str | None = None, timeout: float = 10.0) -> Info:
    """Ask a source what it serves (model id, rank, layout, tensors, bytes, transfers running)."""
    with _connect(address, token, timeout) as conn:
        send_message(conn, Probe(), timeout=timeout)
        try:
            return expect(read_message(conn, timeout=timeout), Info)
        except ProtocolError as exc:
            raise _classify(exc, "probe") from None


def verify_source(address: str, *, token: str | None = None, timeout: float = 60.0) -> VerifyResult:
    """Ask a source to hash the tensors it holds now and compare them with the digests it serves (its origin's).

    Answers with the number of mismatching tensors and the first names; a source runs one verify at a time and
    refuses another meanwhile (:class:`~netloader.BusyError`).
    """
    with _connect(address, token, timeout) as conn:
        send_message(conn, Verify(), timeout=timeout)
        try:
            return expect(read_message(conn, timeout=timeout), VerifyResult)
        except ProtocolError as exc:
            raise _classify(exc, "verify") from None


@contextlib.contextmanager
def _connect(address: str, token: str | None, timeout: float) -> Iterator[socket.socket]:
    """Open and authenticate a control connection (both sides prove they know the token)."""
    conn = _open(address, token, timeout)
    try:
        yield conn
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def _open(address: str, token: str | None, timeout: float) -> socket.socket:
    """An authenticated connection to ``address`` (both sides prove they know the token)."""
    host, port = parse_address(address)
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ConnectError(f"cannot connect to {address}: {exc}") from None
    try:
        tune_socket(conn)
        try:
            hello = expect(read_message(conn, timeout=timeout, max_size=PREAUTH_MAX_FRAME), Hello)
            if hello.proto != PROTOCOL_VERSION:
                raise ProtocolError(f"source speaks protocol {hello.proto}; this client speaks {PROTOCOL_VERSION}")
            if hello.auth and token is None:
                raise AuthenticationError("source requires a token and none was given")
            if token is not None and not hello.auth:
                raise AuthenticationError("a token was given but the source does not authenticate; not trusting it")
            nonce = new_nonce()
            mac = client_mac(token, hello.nonce, nonce) if token is not None else None
            send_message(conn, Auth(proto=PROTOCOL_VERSION, nonce=nonce, mac=mac), timeout=timeout)
            ok = expect(read_message(conn, timeout=timeout, max_size=PREAUTH_MAX_FRAME), AuthOk)
            if token is not None and not macs_equal(server_mac(token, hello.nonce, nonce), ok.mac):
                raise AuthenticationError("the source could not prove it knows the token")
        except ProtocolError as exc:
            raise _classify(exc, "handshake") from None
    except BaseException:
        with contextlib.suppress(OSError):
            conn.close()
        raise
    return conn


def _classify(exc: ProtocolError, stage: str) -> NetloaderError:
    """Map a control-plane failure to the error a caller acts on."""
    if isinstance(exc, RemoteError):
        kinds: dict[str, type[NetloaderError]] = {
            "busy": BusyError,
            "auth": AuthenticationError,
            "mismatch": IdentityMismatchError,
            "closing": BusyError,
        }
        return kinds.get(exc.code, ProtocolError)(str(exc))
    if stage in ("handshake", "probe", "verify") and isinstance(exc, (PeerClosedError, FrameTimeoutError)):
        return ConnectError(f"source did not complete the {stage}: {exc}")
    if isinstance(exc, FrameTimeoutError):
        return TransferTimeoutError(f"source stopped answering during the {stage}: {exc}")
    if isinstance(exc, PeerClosedError):
        return TransferError(f"source closed the connection during the {stage}: {exc}")
    return exc


def _load_from(
    source: str,
    target: TensorSet,
    identity: Identity,
    kind: str,
    token: str | None,
    options: _Options,
    show: bool,
    resume: _Resume,
    failures: dict[str, BaseException],
) -> LoadReport:
    started = time.perf_counter()
    timeout = options.timeout
    with _connect(source, token, timeout) as conn:
        wanted_bucket = resume.params.bucket_size if resume.params else options.bucket_size
        try:
            send_message(
                conn,
                Load(
                    model_id=identity.model_id,
                    rank=identity.rank,
                    layout=dict(identity.layout),
                    backend=kind,
                    bucket_size=wanted_bucket,
                ),
                timeout=timeout,
            )
            offer = expect(read_message(conn, timeout=timeout), ManifestMsg)
        except ProtocolError as exc:
            raise _classify(exc, "request") from None
        try:
            remote = Manifest.from_wire(offer.tensors)
            params = PlanParams(offer.plan.bucket_size, offer.plan.direct_threshold, offer.plan.chunk_size)
            digests = Digests.from_wire(offer.digests.algorithm, offer.digests.values, remote)
        except ConfigError as exc:
            raise ProtocolError(f"source sent an invalid manifest: {exc}") from None
        if wanted_bucket is not None and params.bucket_size > wanted_bucket:  # it sizes our staging memory
            raise ProtocolError(f"source chose {params.bucket_size}-byte buckets; {wanted_bucket} were asked for")
        try:
            target.manifest.check_matches(remote)
        except NetloaderError as exc:
            with contextlib.suppress(NetloaderError):
                send_message(conn, Abort(reason=str(exc)[:16000]), timeout=timeout)
            raise
        plan = make_plan(remote, params)
        kept = resume.completed if resume.params == params else set()
        # the default: relayed bytes are checked, and so is everything after a source sent corrupt bytes
        verify = (offer.relayed or bool(resume.corrupt)) if options.verify is None else options.verify
        if not kept:
            resume.verified.clear()
        elif verify:  # bytes kept from earlier sources must match this source's digests too
            stale = Verifier(plan, target, digests, kept, resume.verified)
            stale.start()
            if stale.bad:
                logger.warning("netloader: %d tensor(s) received earlier do not match %s's digests (%s); fetching "
                               "them again", len(stale.bad), source, _names(stale.bad_names()))
                kept = kept - ops_covering(plan, stale.bad)
        verifier = Verifier(plan, target, digests, kept, resume.verified) if verify else None
        missing = ranges_of([i for i in range(len(plan.ops)) if i not in kept])
        try:
            send_message(conn, Ready(missing=missing if kept else None), timeout=timeout)
            rendezvous = expect(read_message(conn, timeout=timeout), Rendezvous)
        except ProtocolError as exc:
            raise _classify(exc, "rendezvous") from None
        if rendezvous.heartbeat * 2 > options.heartbeat_timeout:
            raise ProtocolError(
                f"source sends heartbeats every {rendezvous.heartbeat:g} s, too rarely for heartbeat_timeout "
                f"{options.heartbeat_timeout:g} s"
            )
        sequence = sequence_of(missing)
        total = sum(plan.ops[i].payload for i in sequence)
        report = LoadReport(
            source=source,
            bytes=total,
            seconds=0.0,
            tensors=len(target.manifest),
            failures=dict(failures),
            resumed_at=sequence[0] if kept and sequence else 0,
            resumed_bytes=plan.payload_from(0) - total if kept else 0,
            refetched_bytes=resume.refetched_bytes,
            transport=kind,
            corrupt=resume.corrupt,
            digests=digests,
        )
        channel = Channel(
            conn, peer="source", timeout=timeout, heartbeat_timeout=options.heartbeat_timeout,
            interval=rendezvous.heartbeat, store=kind != "streams",
        )
        with channel:
            try:
                if verifier is not None:
                    verifier.start()
                completed = _receive(
                    source, target, kind, token, options, show, plan, sequence, rendezvous, channel, verifier
                )
                if verifier is not None and verifier.bad:
                    resume.params = params
                    resume.completed = kept | completed
                    raise IntegrityError(f"{len(verifier.bad)} tensor(s) do not match the origin's digests")
                channel.send(Done(ok=True, bytes=total))
            except TransferError as exc:
                if not isinstance(exc, IntegrityError):
                    got: set[int] = getattr(exc, "completed", set())
                    arrived = getattr(exc, "received_bytes", 0)
                    resume.params = params
                    resume.completed = kept | got
                    resume.refetched_bytes += max(0, arrived - sum(plan.ops[i].nbytes for i in got))
                if verifier is not None and verifier.bad:  # the messages carrying bad tensors are fetched again
                    names = verifier.bad_names()
                    resume.corrupt.setdefault(source, []).extend(names)
                    resume.completed -= ops_covering(plan, verifier.bad)
                    logger.error(
                        "netloader: source %s sent %d tensor(s) whose bytes do not match the origin's digests "
                        "(%s): dropping it; they are fetched again from the next source", source, len(names),
                        _names(names),
                    )
                    if isinstance(exc, IntegrityError):
                        exc = IntegrityError(f"sent {len(names)} tensor(s) that do not match the origin's digests: "
                                             f"{_names(names)}", {source: names})
                with contextlib.suppress(NetloaderError):
                    channel.send(Done(ok=False, bytes=0, message=str(exc)[:16000]))
                raise exc from None
    if len(completed) != len(sequence):  # cannot happen: every message either completes or raises
        raise TransferError(f"{len(sequence) - len(completed)} messages did not arrive")
    if verifier is not None and not verifier.complete:  # cannot happen: every tensor's last message checks it
        raise IntegrityError("some tensors were not checked against the origin's digests")
    report.verified = verifier is not None
    report.seconds = time.perf_counter() - started
    logger.info(
        "netloader: %s%s", report,
        f" (resumed: {report.resumed_bytes / 1e9:.3f} GB kept, {report.refetched_bytes / 1e9:.3f} GB refetched)"
        if kept else "",
    )
    return report


def _receive(
    source: str,
    target: TensorSet,
    kind: str,
    token: str | None,
    options: _Options,
    show: bool,
    plan: TransferPlan,
    sequence: list[int],
    rendezvous: Rendezvous,
    channel: Channel,
    verifier: Verifier | None = None,
) -> set[int]:
    """Open the transport and receive ``sequence``; returns the messages now in place (each tensor is checked by
    ``verifier`` as soon as its last message is in place)."""
    if not sequence:
        return set()
    timeout = options.timeout
    total = sum(plan.ops[i].payload for i in sequence)
    # tqdm starts a process-wide monitor thread for every bar, shown or not: make one only when shown
    bar = (
        tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"netloader {source}", leave=False)
        if show
        else None
    )
    received = 0

    def advance(op: int, nbytes: int) -> None:
        nonlocal received
        if verifier is not None:
            verifier.on_op(op)
        received += nbytes
        if bar is not None:
            bar.update(nbytes)
        if options.on_progress is not None:
            options.on_progress(received, total)

    transport: Transport | None = None
    try:
        if kind == "streams":
            transport = _open_streams(source, token, timeout, rendezvous, channel)
        else:
            store = ControlStore(channel, time.monotonic() + timeout)
            group = form_group(
                kind, store, CLIENT_RANK, local_host=channel.sock.getsockname()[0], device=target.device,
                timeout=timeout, streams=rendezvous.streams, check=channel.check,
            )
            transport = DistTransport(group, store, target.device)
        receiver = Receiver(plan, target.tensors, transport, device=target.device, check=channel.check, on_op=advance)
        transport = None  # the receiver closes it, whatever happens
        return receiver.run(sequence)
    except TransferError:
        raise
    except NetloaderError as exc:
        raise TransferError(f"the transfer could not start: {exc}") from None
    finally:
        if transport is not None:
            transport.close(False)
        if bar is not None:
            bar.close()


def _open_streams(
    source: str, token: str | None, timeout: float, rendezvous: Rendezvous, channel: Channel
) -> StreamTransport:
    """Open, authenticate and attach the transfer's data connections."""
    socks: list[socket.socket] = []
    try:
        for stream in range(rendezvous.streams):
            sock = _open(source, token, timeout)
            socks.append(sock)
            send_message(sock, Attach(transfer=rendezvous.transfer, stream=stream), timeout=timeout)
            answer = expect(read_message(sock, timeout=timeout, max_size=PREAUTH_MAX_FRAME), Attached)
            if answer.stream != stream:
                raise ProtocolError(f"the source attached stream {answer.stream} for {stream}")
            tune_data_socket(sock)
            channel.check()
    except BaseException as exc:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        if isinstance(exc, ProtocolError):
            raise TransferError(f"a data connection was refused: {_classify(exc, 'attach')}") from None
        raise
    transport = StreamTransport(rendezvous.streams, timeout=timeout, sending=False, peer="source")
    transport.start_receiving(socks)
    return transport
