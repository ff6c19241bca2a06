"""The client: prove it asks for the same thing, then receive every tensor in place from the first source that can."""

from __future__ import annotations

import contextlib
import functools
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

from .dataplane import CLIENT_RANK, Receiver, backend_for, discard, join_store, pair_group
from .errors import (
    AuthenticationError,
    BusyError,
    ConfigError,
    ConnectError,
    IdentityMismatchError,
    NetloaderError,
    NoSourceError,
    ProtocolError,
    TransferError,
    TransferTimeoutError,
)
from .manifest import Identity, LayoutValue, Manifest, TensorSet
from .plan import PlanParams, make_plan
from .protocol import (
    PREAUTH_MAX_FRAME,
    PROTOCOL_VERSION,
    Abort,
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
    client_mac,
    expect,
    macs_equal,
    new_nonce,
    parse_address,
    peer_closed,
    read_message,
    send_message,
    server_mac,
    tune_socket,
)

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

    @property
    def throughput(self) -> float:
        """GB/s (10^9 bytes per second) over the whole load, handshake included."""
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"loaded {self.tensors} tensors, {self.bytes / 1e9:.3f} GB from {self.source} "
            f"in {self.seconds:.2f} s ({self.throughput:.2f} GB/s)"
        )


@dataclass(frozen=True)
class _Resume:
    params: PlanParams
    completed_ops: int


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
) -> LoadReport:
    """Fill ``model``'s tensors in place from the first source in ``sources`` that can serve them.

    Sources are tried in order; one that is unreachable, busy, refuses, mismatches or fails mid-transfer is
    skipped for the next (a load that failed part-way resumes where it stopped when the next source uses the
    same plan). ``timeout`` bounds every step that waits on a source (connecting, each control message, each
    data message): a dead or stalled source is abandoned after at most that long. ``progress`` shows a tqdm
    bar (default: when stderr is a terminal); ``on_progress(bytes_done, bytes_total)`` is called after each
    message from the loading thread. ``bucket_size`` asks the source for smaller packed messages. Raises
    :class:`~netloader.NoSourceError` listing every source and its reason when none succeeds; if the last
    failure happened mid-transfer the target is partly written and must not be used.

    ``registry`` (a URL, see :mod:`netloader.registry`): after the explicit ``sources``, try the registry's live
    sources of exactly this identity, best first. With no explicit source and none in the registry,
    :class:`~netloader.NoSourceError` is raised at once, saying how many the registry has for other identities
    of the same ``model_id``.
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
    if registry is not None:
        from .registry import DEFAULT_TIMEOUT as REGISTRY_TIMEOUT
        from .registry import find_sources

        sources = find_sources(registry, identity, sources, timeout=min(float(timeout), REGISTRY_TIMEOUT))
    with _gc_paused():
        return _load(model, sources, identity, token, float(timeout), progress, bucket_size, on_progress)


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
    timeout: float,
    progress: bool | None,
    bucket_size: int | None,
    on_progress: Callable[[int, int], None] | None,
) -> LoadReport:
    target = TensorSet(model)
    backend = backend_for(target.device)
    show = sys.stderr.isatty() if progress is None else progress
    failures: dict[str, BaseException] = {}
    resume: _Resume | None = None
    for source in sources:
        try:
            return _load_from(
                source,
                target,
                identity,
                backend=backend,
                token=token,
                timeout=timeout,
                progress=show,
                on_progress=on_progress,
                bucket_size=bucket_size,
                resume=resume,
                failures=failures,
            )
        except NetloaderError as exc:
            failures[source] = exc
            logger.warning("netloader: source %s failed: %s: %s", source, type(exc).__name__, exc)
            if isinstance(exc, TransferError) and getattr(exc, "plan_params", None) is not None:
                done = max(exc.completed_ops, resume.completed_ops if resume else 0)
                resume = _Resume(exc.plan_params, done)  # type: ignore[attr-defined]
    raise NoSourceError(failures)


def probe(address: str, *, token: str | None = None, timeout: float = 10.0) -> Info:
    """Ask a source what it serves (model id, rank, layout, tensors, bytes, transfers running)."""
    with _connect(address, token, timeout) as conn:
        send_message(conn, Probe(), timeout=timeout)
        try:
            return expect(read_message(conn, timeout=timeout), Info)
        except ProtocolError as exc:
            raise _classify(exc, "probe") from None


@contextlib.contextmanager
def _connect(address: str, token: str | None, timeout: float):  # type: ignore[no-untyped-def]
    """Open and authenticate a control connection (both sides prove they know the token)."""
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
        yield conn
    finally:
        with contextlib.suppress(OSError):
            conn.close()


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
    if stage in ("handshake", "probe") and isinstance(exc, (PeerClosedError, FrameTimeoutError)):
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
    *,
    backend: str,
    token: str | None,
    timeout: float,
    progress: bool,
    on_progress: Callable[[int, int], None] | None,
    bucket_size: int | None,
    resume: _Resume | None,
    failures: dict[str, BaseException],
) -> LoadReport:
    started = time.perf_counter()
    host, _ = parse_address(source)
    with _connect(source, token, timeout) as conn:
        wanted_bucket = resume.params.bucket_size if resume else bucket_size
        try:
            send_message(
                conn,
                Load(
                    model_id=identity.model_id,
                    rank=identity.rank,
                    layout=dict(identity.layout),
                    backend=backend,
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
        start_op = resume.completed_ops if resume and resume.params == params else 0
        try:
            send_message(conn, Ready(start_op=start_op), timeout=timeout)
            rendezvous = expect(read_message(conn, timeout=timeout), Rendezvous)
        except ProtocolError as exc:
            raise _classify(exc, "rendezvous") from None

        total = plan.payload_from(start_op)
        # tqdm starts a process-wide monitor thread for every bar, shown or not: make one only when shown
        bar = (
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"netloader {source}", leave=False)
            if progress
            else None
        )
        received = 0

        def advance(_op: int, nbytes: int) -> None:
            nonlocal received
            received += nbytes
            if bar is not None:
                bar.update(nbytes)
            if on_progress is not None:
                on_progress(received, total)

        group = store = None
        t_handshake = time.perf_counter()
        t_group = t_handshake
        try:
            if start_op < len(plan.ops):
                store = join_store(host, rendezvous.store_port, timeout)
                group = pair_group(
                    backend,
                    store,
                    rendezvous.group,
                    CLIENT_RANK,
                    local_host=conn.getsockname()[0],
                    device=target.device,
                    timeout=timeout,
                    streams=rendezvous.streams,
                )
                t_group = time.perf_counter()
                Receiver(
                    plan,
                    target.tensors,
                    group,
                    device=target.device,
                    peer_gone=functools.partial(peer_closed, conn),
                    on_op=advance,
                ).run(start_op)
        except TransferError as exc:
            exc.plan_params = params  # type: ignore[attr-defined]
            with contextlib.suppress(NetloaderError):
                send_message(conn, Done(ok=False, bytes=0, message=str(exc)[:16000]), timeout=1.0)
            raise
        except Exception as exc:  # a torch error while forming the group, say
            err = TransferError(f"transfer failed: {exc}")
            err.plan_params = params  # type: ignore[attr-defined]
            raise err from exc
        finally:
            if bar is not None:
                bar.close()
            discard(group, store)  # torn down off this path: a gloo group takes ~10 ms per connection to close
            group = store = None
        t_data = time.perf_counter()
        with contextlib.suppress(NetloaderError):
            send_message(conn, Done(ok=True, bytes=total), timeout=timeout)
    seconds = time.perf_counter() - started
    logger.debug(
        "netloader: %s: handshake %.3f s, group %.3f s, data %.3f s (%d messages)",
        source,
        t_handshake - started,
        t_group - t_handshake,
        t_data - t_group,
        len(plan.ops) - start_op,
    )
    report = LoadReport(
        source=source,
        bytes=total,
        seconds=seconds,
        tensors=len(target.manifest),
        failures=dict(failures),
        resumed_at=start_op,
    )
    logger.info("netloader: %s", report)
    return report
