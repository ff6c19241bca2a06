"""The client: prove it asks for the same thing, then receive every tensor in place from the first source that can."""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

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
from .integrity import Digests, StripedVerifier, Verifier, ops_covering
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
    More,
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
from .stripe import STRIPE_OPEN_UNITS, WorkPool, cut_units, unit_size
from .transport.base import Transport, resolve_transport
from .transport.dist import CLIENT_RANK, ControlStore, DistTransport, form_group
from .transport.streams import StreamTransport, tune_data_socket

logger = logging.getLogger("netloader")
_A = TypeVar("_A", Info, VerifyResult)

DEFAULT_TIMEOUT = 60.0
#: most sources one striped load uses at once
MAX_SOURCES = 16


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
    #: tensor bytes received from each source (a striped load has several; ``source`` is the one that gave most)
    sources: dict[str, int] = field(default_factory=dict)

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
    max_sources: int = 1,
    on_complete: Callable[[TransferPlan, int], None] | None = None,
    chunk_size: int | None = None,
    on_digests: Callable[[Digests], None] | None = None,
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
    message from the loading thread. ``bucket_size`` asks the source for smaller packed messages, ``chunk_size``
    for smaller pieces of large tensors. Raises :class:`~netloader.NoSourceError` listing every source and its
    reason when none succeeds; if the last failure happened mid-transfer the target is partly written and must
    not be used.

    ``max_sources`` > 1 stripes the load: up to that many sources (the first ones that answer, in order) serve
    disjoint units of the plan at once, each taking its next unit when it nears the end of its current one, so a
    faster source serves more; a failed source's unfinished units go to the others (or to the next source in
    line), and :attr:`LoadReport.sources` says how many bytes came from each. All of them must offer the same
    transfer plan (one that offers another is skipped). ``on_complete(plan, i)`` is called (from a loading
    thread) once message ``i`` of ``plan`` is in place, and ``on_digests(digests)`` with each source's digests of
the origin as soon as its manifest arrives (a relay's :meth:`~netloader.WeightServer.fill` uses both: it serves
what is in place, with its origin's digests, while it loads). The sources of a striped load must also offer the
same origin digests (one that offers others holds other weights and is skipped); the check of a tensor whose
messages came from several sources that fails is repeated with all of them from one source, so the bad bytes
are always pinned on the source that sent them.

    ``registry`` (a URL, see :mod:`netloader.registry`): after the explicit ``sources``, try the registry's live
    sources of exactly this identity, best first. With no explicit source and none in the registry,
    :class:`~netloader.NoSourceError` is raised at once, saying how many the registry has for other identities
    of the same ``model_id``.

    ``verify``: hash every tensor once its bytes are in place and compare with the origin's digest, which the
    source sends with its manifest (see :mod:`netloader.integrity`). A source whose bytes do not match is dropped
    and the messages carrying the bad tensors are fetched from the next source; the report names them
    (``LoadReport.corrupt``). With no source left, :class:`~netloader.IntegrityError` is raised. None (the
    default) is on: measured by ``make bench`` on a 2-core machine, the check costs 9% of a 1 GiB load and 5% of a
    20 000-tensor load (README, Integrity). ``verify=False`` checks nothing, not even after a source sent corrupt
    bytes (nothing would notice them).
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
    if chunk_size is not None:
        PlanParams(chunk_size=chunk_size)
    check_heartbeat_timeout(heartbeat_timeout)
    if not isinstance(transport, str):
        raise ConfigError(f"transport must be a string, got {transport!r}")
    if verify is not None and not isinstance(verify, bool):
        raise ConfigError(f"verify must be True, False or None, got {verify!r}")
    if isinstance(max_sources, bool) or not isinstance(max_sources, int) or not 1 <= max_sources <= MAX_SOURCES:
        raise ConfigError(f"max_sources must be an int within [1, {MAX_SOURCES}], got {max_sources!r}")
    options = _Options(float(timeout), float(heartbeat_timeout), transport, progress, bucket_size, on_progress,
                       verify, max_sources, on_complete, chunk_size, on_digests)
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
    max_sources: int = 1
    on_complete: Callable[[TransferPlan, int], None] | None = None
    chunk_size: int | None = None
    on_digests: Callable[[Digests], None] | None = None


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
    if options.max_sources > 1:
        return _load_striped(target, sources, identity, kind, token, options, show)
    failures: dict[str, BaseException] = {}
    resume = _Resume()
    for source in sources:
        try:
            return _load_from(source, target, identity, kind, token, options, show, resume, failures)
        except NetloaderError as exc:
            failures[source] = exc
            logger.warning("netloader: source %s failed: %s: %s", source, type(exc).__name__, exc)
    raise _no_source_left(resume.corrupt, failures)


def _no_source_left(corrupt: dict[str, list[str]], failures: dict[str, BaseException]) -> NetloaderError:
    """The error of a load that every source failed: IntegrityError when some sent corrupt bytes."""
    if not corrupt:
        return NoSourceError(failures)
    named = "; ".join(f"{src}: {_names(names)}" for src, names in corrupt.items())
    others = "".join(f"\n  {src}: {type(err).__name__}: {err}" for src, err in failures.items())
    return IntegrityError(
        f"tensors arrived that do not match the origin's digests and no other source could replace them "
        f"({named}); the target must not be used. Every source tried:{others}",
        corrupt, failures,
    )


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def probe(address: str, *, token: str | None = None, timeout: float = 10.0) -> Info:
    """Ask a source what it serves (model id, rank, layout, tensors, bytes, transfers running)."""
    return _ask(address, token, timeout, Probe(), Info, "probe")


def verify_source(address: str, *, token: str | None = None, timeout: float = 60.0) -> VerifyResult:
    """Ask a source to hash the tensors it holds now and compare them with the digests it serves (its origin's).

    Answers with the number of mismatching tensors and the first names; a source runs one verify at a time and
    refuses another meanwhile (:class:`~netloader.BusyError`).
    """
    return _ask(address, token, timeout, Verify(), VerifyResult, "verify")


def _ask(
    address: str, token: str | None, timeout: float, request: Probe | Verify, answer: type[_A], stage: str
) -> _A:
    """One request on a fresh authenticated connection, and its answer of type ``answer``."""
    with _connect(address, token, timeout) as conn:
        send_message(conn, request, timeout=timeout)
        try:
            return expect(read_message(conn, timeout=timeout), answer)
        except ProtocolError as exc:
            raise _classify(exc, stage) from None


@contextlib.contextmanager
def _connect(
    address: str, token: str | None, timeout: float, handshake: float | None = None
) -> Iterator[socket.socket]:
    """Open and authenticate a control connection (both sides prove they know the token); ``handshake`` bounds
    connecting and authenticating (default: ``timeout``)."""
    conn = _open(address, token, timeout if handshake is None else min(timeout, handshake))
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


def _request(
    conn: socket.socket,
    target: TensorSet,
    identity: Identity,
    kind: str,
    wanted_bucket: int | None,
    options: _Options,
) -> tuple[ManifestMsg, Manifest, PlanParams, Digests]:
    """Ask for the load and check the source's offer: a valid manifest equal to ``target``'s, a plan whose buckets
    fit the staging memory asked for, the origin's digests (passed to ``on_digests``). On a refusal here the
    source is told why (``abort``) before the error is raised."""
    timeout = options.timeout
    try:
        send_message(
            conn,
            Load(model_id=identity.model_id, rank=identity.rank, layout=dict(identity.layout), backend=kind,
                 bucket_size=wanted_bucket, chunk_size=options.chunk_size),
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
    try:
        if wanted_bucket is not None and params.bucket_size > wanted_bucket:  # it sizes our staging memory
            raise ProtocolError(f"source chose {params.bucket_size}-byte buckets; {wanted_bucket} were asked for")
        target.manifest.check_matches(remote)
    except NetloaderError as exc:
        with contextlib.suppress(NetloaderError):
            send_message(conn, Abort(reason=str(exc)[:16000]), timeout=timeout)
        raise
    if options.on_digests is not None:
        options.on_digests(digests)
    return offer, remote, params, digests


def _rendezvous(conn: socket.socket, ready: Ready, options: _Options) -> Rendezvous:
    """Say which messages to send (``ready``) and take the source's rendezvous, whose heartbeats must come often
    enough for this load's ``heartbeat_timeout``."""
    try:
        send_message(conn, ready, timeout=options.timeout)
        rendezvous = expect(read_message(conn, timeout=options.timeout), Rendezvous)
    except ProtocolError as exc:
        raise _classify(exc, "rendezvous") from None
    if rendezvous.heartbeat * 2 > options.heartbeat_timeout:
        raise ProtocolError(
            f"source sends heartbeats every {rendezvous.heartbeat:g} s, too rarely for heartbeat_timeout "
            f"{options.heartbeat_timeout:g} s"
        )
    return rendezvous


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
    # a live source completes a TCP and token handshake at once: one that cannot within the heartbeat timeout is
    # as dead as one whose heartbeats stop (a partitioned host would otherwise hold the load for ``timeout``)
    with _connect(source, token, timeout, options.heartbeat_timeout) as conn:
        wanted_bucket = resume.params.bucket_size if resume.params else options.bucket_size
        _, remote, params, digests = _request(conn, target, identity, kind, wanted_bucket, options)
        plan = make_plan(remote, params)
        kept = resume.completed if resume.params == params else set()
        verify = options.verify is not False
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
        rendezvous = _rendezvous(conn, Ready(missing=missing if kept else None), options)
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
            sources={source: total},
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
    units: Iterable[Sequence[int]] | None = None,
    on_op: Callable[[int, int], None] | None = None,
    on_complete: Callable[[int], None] | None = None,
) -> set[int]:
    """Open the transport and receive ``sequence`` (or, striped, ``units`` as they come, reporting each message
    received to ``on_op`` and each one in place to ``on_complete``, instead of the load's own progress and
    ``on_complete``); returns the messages now in place."""
    if not sequence:
        return set()
    timeout = options.timeout
    total = sum(plan.ops[i].payload for i in sequence)
    # tqdm starts a process-wide monitor thread for every bar, shown or not: make one only when shown
    bar = (
        tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"netloader {source}", leave=False)
        if show and on_op is None
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

    if on_complete is None and options.on_complete is not None:
        load_complete = options.on_complete

        def on_complete(i: int) -> None:
            load_complete(plan, i)

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
        receiver = Receiver(
            plan, target.tensors, transport, device=target.device, check=channel.check, on_op=on_op or advance,
            on_complete=on_complete,
        )
        transport = None  # the receiver closes it, whatever happens
        if units is None:
            return receiver.run_units([sequence])
        # two units arriving at once (both streams busy even with one-message units), one more asked for ahead
        return receiver.run_units(units, max_open=STRIPE_OPEN_UNITS)
    except TransferError as exc:
        reason = channel.reason_given(0.5)
        if reason is not None and reason not in str(exc):  # say why the source gave up, not how it looked here
            better = TransferError(reason)
            better.__dict__.update(exc.__dict__)
            raise better from None
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
            sock = _open(source, token, min(timeout, channel.heartbeat_timeout))
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


# ---------------------------------------------------------------------- striping


@dataclass
class _Striped:
    """What the sessions of one striped load share."""

    max_sources: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    plan: TransferPlan | None = None
    pool: WorkPool | None = None
    digests: Digests | None = None
    verifier: StripedVerifier | None = None
    #: sources that sent bytes not matching the origin's digests -> the tensors; never asked again
    corrupt: dict[str, list[str]] = field(default_factory=dict)
    total: int = 0
    received: int = 0
    bar: tqdm | None = None


def _load_striped(
    target: TensorSet,
    sources: Sequence[str],
    identity: Identity,
    kind: str,
    token: str | None,
    options: _Options,
    show: bool,
) -> LoadReport:
    """Up to ``max_sources`` sessions at once, one per source, taking units from one pool; a source whose session
    fails is replaced by the next untried one (or, with work returned and none untried, by one that succeeded)."""
    started = time.perf_counter()
    state = _Striped(options.max_sources)
    failures: dict[str, BaseException] = {}
    per_source: dict[str, int] = {}
    results: queue.Queue[tuple[str, int, BaseException | None]] = queue.Queue()
    untried = deque(dict.fromkeys(sources))
    good: deque[str] = deque()
    running = 0

    def session(source: str) -> None:
        got, error = 0, None
        try:
            got = _stripe_session(source, target, identity, kind, token, options, state)
        except NetloaderError as exc:
            got, error = getattr(exc, "got_bytes", 0), exc
        except BaseException as exc:  # a bug: reported as this source's failure, never lost in a thread
            logger.exception("netloader: unexpected error loading from %s", source)
            error = TransferError(f"unexpected error: {exc!r}")
        results.put((source, got, error))

    def launch(source: str) -> None:
        nonlocal running
        running += 1
        threading.Thread(target=session, args=(source,), name="netloader-stripe", daemon=True).start()

    try:
        while running < state.max_sources and untried:
            launch(untried.popleft())
        while running:
            source, got, error = results.get()
            running -= 1
            if got:
                per_source[source] = per_source.get(source, 0) + got
            if error is not None:
                failures[source] = error
                logger.warning("netloader: source %s failed: %s: %s", source, type(error).__name__, error)
            else:
                good.append(source)
            with state.lock:
                good = deque(s for s in good if s not in state.corrupt)
            pool = state.pool
            while running < state.max_sources and (pool is None or pool.pending) and (untried or good):
                launch(untried.popleft() if untried else good.popleft())
                if pool is None:  # no session has a plan yet: one more try per failure
                    break
    finally:
        if state.bar is not None:
            state.bar.close()
    verifier = state.verifier
    if state.pool is None or not state.pool.finished:
        raise _no_source_left(state.corrupt, failures)
    if verifier is not None and not verifier.complete:  # cannot happen: each whole one is
        raise IntegrityError("some tensors were not checked against the origin's digests")
    main = max(per_source, key=per_source.__getitem__) if per_source else (sources[0] if sources else "")
    report = LoadReport(
        source=main,
        bytes=sum(per_source.values()),
        seconds=time.perf_counter() - started,
        tensors=len(target.manifest),
        failures={s: e for s, e in failures.items()},
        transport=kind,
        sources=per_source,
        verified=verifier is not None,
        corrupt=state.corrupt,
        digests=state.digests,
    )
    logger.info("netloader: %s, striped over %d source(s): %s", report, len(per_source),
                ", ".join(f"{s} {b / 1e9:.3f} GB" for s, b in per_source.items()))
    return report


def _stripe_session(
    source: str,
    target: TensorSet,
    identity: Identity,
    kind: str,
    token: str | None,
    options: _Options,
    state: _Striped,
) -> int:
    """One source's share of a striped load: units from the pool until it is empty. Returns the tensor bytes it
    put in place; on failure its unfinished units are back in the pool and the error carries ``got_bytes``."""
    timeout = options.timeout
    # a live source completes a TCP and token handshake at once: one that cannot within the heartbeat timeout is
    # as dead as one whose heartbeats stop (a partitioned host would otherwise hold the load for ``timeout``)
    with _connect(source, token, timeout, options.heartbeat_timeout) as conn:
        with state.lock:
            wanted_bucket = state.plan.params.bucket_size if state.plan is not None else options.bucket_size
        _, remote, params, digests = _request(conn, target, identity, kind, wanted_bucket, options)
        try:
            with state.lock:
                if state.plan is None:
                    plan = make_plan(remote, params)
                    state.digests = digests
                    state.verifier = StripedVerifier(plan, target, digests) if options.verify is not False \
                        else None
                    state.total = plan.payload_from(0)
                    size = unit_size(state.total, state.max_sources)

                    def keep(index: int) -> bool:
                        return not target.tensors[index].is_contiguous()

                    state.pool = WorkPool(plan, cut_units(plan, range(len(plan.ops)), size, keep), size, keep)
                    state.plan = plan
                    if options.progress or (options.progress is None and sys.stderr.isatty()):
                        state.bar = tqdm(total=state.total, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc="netloader (striped)", leave=False)
                elif params != state.plan.params:
                    raise ProtocolError(
                        f"source offers another transfer plan ({params}) than the other sources of this striped "
                        f"load ({state.plan.params})"
                    )
                elif state.digests is not None and digests.algorithm == state.digests.algorithm \
                        and digests.values != state.digests.values:
                    raise IntegrityError(
                        "source offers other origin digests than the other sources of this striped load: it holds "
                        "other weights under the same identity"
                    )
                plan, pool, verifier = state.plan, state.pool, state.verifier
        except NetloaderError as exc:
            with contextlib.suppress(NetloaderError):
                send_message(conn, Abort(reason=str(exc)[:16000]), timeout=timeout)
            raise
        assert pool is not None
        first = pool.take()
        if first is None:  # the others hold all the work left
            with contextlib.suppress(NetloaderError):
                send_message(conn, Abort(reason="nothing left to fetch"), timeout=timeout)
            return 0
        handed: list[int] = list(first)
        try:
            rendezvous = _rendezvous(conn, Ready(missing=ranges_of(first), more=True), options)
        except NetloaderError:
            pool.give_back(first)
            raise
        channel = Channel(
            conn, peer="source", timeout=timeout, heartbeat_timeout=options.heartbeat_timeout,
            interval=rendezvous.heartbeat, store=kind != "streams",
        )
        assigned: deque[list[int]] = deque([first])

        def units() -> Iterator[list[int]]:
            while assigned:
                _stop_if_corrupt(state, source)
                unit = assigned.popleft()
                following = pool.take()
                if following is not None:  # one unit always requested ahead: the source's link never idles
                    handed.extend(following)
                    assigned.append(following)
                    channel.send(More(missing=ranges_of(following)))
                yield unit

        def in_place(op: int) -> None:
            pool.done(op)
            if verifier is not None:
                _on_bad(verifier.on_op(op, source), state, source)
            if options.on_complete is not None:
                options.on_complete(plan, op)

        def advance(_op: int, nbytes: int) -> None:
            with state.lock:
                state.received += nbytes
                received, total = state.received, state.total
                if state.bar is not None:
                    state.bar.update(nbytes)
            if options.on_progress is not None:
                options.on_progress(received, total)

        got: set[int] = set()
        with channel:
            try:
                got = _receive(source, target, kind, token, options, False, plan, first, rendezvous, channel,
                               units=units(), on_op=advance, on_complete=in_place)
                _stop_if_corrupt(state, source)
                nbytes = sum(plan.ops[i].payload for i in got)
                channel.send(Done(ok=True, bytes=nbytes))
            except TransferError as exc:
                got = getattr(exc, "completed", got)
                pool.give_back([i for i in handed if i not in got])
                exc.got_bytes = sum(plan.ops[i].payload for i in got)  # type: ignore[attr-defined]
                with contextlib.suppress(NetloaderError):
                    channel.send(Done(ok=False, bytes=0, message=str(exc)[:16000]))
                raise
        return nbytes


def _on_bad(bad: list[int], state: _Striped, source: str) -> None:
    """Tensors of a striped load that failed their digest check: their messages are fetched again. The source
    that sent every byte of one is dropped; one whose bytes came from several sources is fetched again whole from
    one source, so that a second failure names it."""
    verifier, pool = state.verifier, state.pool
    if not bad or verifier is None or pool is None:
        return
    for index in bad:
        senders, ops = verifier.blame(index)
        name = verifier.name(index)
        if not ops:  # its messages are being fetched again already (they carried another bad tensor)
            continue
        if len(senders) == 1:
            [sender] = senders
            with state.lock:
                state.corrupt.setdefault(sender, []).append(name)
            logger.error("netloader: source %s sent tensor %s whose bytes do not match the origin's digest: dropping "
                         "it; the tensor is fetched from another source", sender, name)
            pool.again(ops, whole=False)
        else:
            logger.warning("netloader: tensor %s, whose bytes came from %s, does not match the origin's digest; "
                           "fetching it again whole from one source", name, ", ".join(sorted(senders)))
            pool.again(ops, whole=True)


def _stop_if_corrupt(state: _Striped, source: str) -> None:
    with state.lock:
        names = state.corrupt.get(source)
    if names:
        raise IntegrityError(f"sent {len(names)} tensor(s) that do not match the origin's digests: {_names(names)}",
                             {source: list(names)})
