"""The source: serves the weights a process holds, from background threads, while the process keeps working."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import __version__
from .errors import BusyError, ConfigError, NetloaderError, NoSourceError, TransferError
from .integrity import Digests
from .manifest import Identity, LayoutValue, TensorSet
from .plan import DEFAULT_BUCKET_SIZE, DEFAULT_CHUNK_SIZE, DEFAULT_DIRECT_THRESHOLD, PlanParams
from .protocol import (
    PREAUTH_MAX_FRAME,
    PROTOCOL_VERSION,
    Attach,
    Auth,
    AuthOk,
    Error,
    Hello,
    Info,
    Load,
    Probe,
    Verify,
    client_mac,
    expect,
    format_address,
    macs_equal,
    new_nonce,
    read_message,
    send_message,
    server_mac,
    tune_socket,
)
from .ratelimit import RateLimiter
from .registry.base import DEFAULT_HEARTBEAT, DEFAULT_TTL
from .registry.publisher import Publisher, server_fields
from .relay import Availability
from .serving import HEARTBEAT_INTERVAL, REQUEST_MAX_FRAME, Transfers
from .transport.base import resolve_transport

if TYPE_CHECKING:
    from .client import LoadReport

logger = logging.getLogger("netloader")

#: netloader streams: data connections per transfer (two measured faster than one on loopback)
DEFAULT_STREAMS = 2
MAX_STREAMS = 8
DEFAULT_HEARTBEAT_TIMEOUT = 5.0
#: a relay's fill asks for large tensors in pieces this big: a relay forwards a piece once it is whole, so each hop
#: of a chain adds one piece's time (fleet benchmark, 8 relays in a chain at 400 Mbit/s: 16 MiB pieces 1.78x the
#: time of one load, 4 MiB 1.20x)
RELAY_CHUNK_SIZE = 4 << 20


class WeightServer:
    """Serve ``model``'s tensors to netloader clients.

    ``model`` is an ``nn.Module`` (its parameters and buffers) or a mapping name -> tensor. The server keeps
    references to those tensors and serves their current contents. Serving runs in daemon threads; nothing
    that happens on the network raises into the owner.

    - ``model_id``, ``rank``, ``layout``: the identity a client must ask for exactly.
    - ``host``/``port``: where to listen (port 0: a free one; :attr:`address` tells which).
    - ``token``: shared secret for HMAC challenge-response in both directions (None: anyone may read, logged).
    - ``max_concurrent``: transfers at once; one more is answered "busy" at once so it tries its next source.
    - ``max_connections``: open control connections at most (more are closed on accept).
    - ``bucket_size``/``direct_threshold``/``chunk_size``: the transfer plan (see :mod:`netloader.plan`).
    - ``timeout``: seconds a transfer step may make no progress; ``handshake_timeout``: whole-message deadline
      for every message before a transfer starts (and for a transfer's data connections to attach).
    - ``heartbeat_timeout``: a client silent this long during a transfer (partitioned, stopped) is dropped and
      its slot freed; heartbeats go every second both ways.
    - ``streams``: data connections per transfer for netloader streams (tensors on CPU).
    - ``transports``: the transports clients may ask for (default: the device's own, netloader streams on CPU;
      add ``"gloo"`` only on a trusted network: gloo's listener is unauthenticated).
    - ``advertise_host``: the host part of :attr:`address` when listening on a wildcard address.
    - ``ready``: False starts a *relay*: its tensors hold nothing yet, :meth:`fill` loads them from other sources,
      and meanwhile the server already serves every message whose bytes are in place (a client waits, bounded by
      ``timeout``, for the rest). It registers when its fill starts (after its own lookup), as ``filling`` with
      its progress, then ``ready``. If the
      fill fails, every transfer waiting for bytes that are not in place fails at once with the reason.
    - ``max_rate``: bytes per second that serving may take at most, all transfers and streams together (a live
      source keeps its network and memory bandwidth for its own work); None: no cap.
    - ``registry``: a registry URL (``file:///dir``, ``redis://host:port/db``, see :mod:`netloader.registry`):
      the server publishes its record there on :meth:`start`, refreshes it every ``registry_heartbeat`` seconds
      and removes it on :meth:`close`; a dead server's record vanishes ``registry_ttl`` seconds after its last
      heartbeat. A registry that is down is logged and never stops the serving.
    - ``digests``: the origin's digests of these tensors (:class:`~netloader.integrity.Digests`, e.g. a client's
      ``LoadReport.digests``): served unchanged, never recomputed, so a relay passes on what its origin computed.
      None (an origin): computed once, at the first load this server serves.
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, torch.Tensor],
        *,
        model_id: str,
        rank: int = 0,
        layout: Mapping[str, LayoutValue] | None = None,
        host: str = "0.0.0.0",
        port: int = 0,
        token: str | None = None,
        max_concurrent: int = 4,
        max_connections: int = 64,
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        direct_threshold: int = DEFAULT_DIRECT_THRESHOLD,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float = 60.0,
        handshake_timeout: float = 10.0,
        advertise_host: str | None = None,
        streams: int = DEFAULT_STREAMS,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        transports: Sequence[str] | None = None,
        registry: str | None = None,
        registry_heartbeat: float = DEFAULT_HEARTBEAT,
        registry_ttl: float = DEFAULT_TTL,
        digests: Digests | None = None,
        ready: bool = True,
        max_rate: float | None = None,
    ) -> None:
        self.identity = Identity.build(model_id, rank, layout)
        self.tensors = TensorSet(model)
        if digests is not None:
            if not isinstance(digests, Digests):
                raise ConfigError(f"digests must be a netloader.integrity.Digests, got {type(digests).__name__}")
            try:
                digests.check_for(self.tensors.manifest)
            except ValueError as exc:
                raise ConfigError(f"digests do not describe these tensors: {exc}") from None
        self._model = model
        if not isinstance(ready, bool):
            raise ConfigError(f"ready must be True or False, got {ready!r}")
        self._availability = None if ready else Availability([spec.nbytes for spec in self.tensors.manifest.moving])
        self._limiter = RateLimiter(max_rate) if max_rate is not None else None
        self.max_rate = max_rate
        self._registry = registry
        if transports is None:
            transports = ("auto",)
        if isinstance(transports, str) or not transports:
            raise ConfigError(f"transports must be a non-empty list of names, got {transports!r}")
        self.transports = tuple(dict.fromkeys(resolve_transport(t, self.tensors.device) for t in transports))
        self.backend = self.transports[0]
        self.params = PlanParams(bucket_size, min(direct_threshold, bucket_size), chunk_size)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"port must be within [0, 65535], got {port!r}")
        if isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= MAX_STREAMS:
            raise ConfigError(f"streams must be an int within [1, {MAX_STREAMS}], got {streams!r}")
        self.streams = streams
        for name, value in (("max_concurrent", max_concurrent), ("max_connections", max_connections)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("timeout", timeout), ("handshake_timeout", handshake_timeout)):
            if not isinstance(value, (int, float)) or not 0 < value <= 86400:
                raise ConfigError(f"{name} must be a number of seconds in (0, 86400], got {value!r}")
        check_heartbeat_timeout(heartbeat_timeout)
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError("token must be a non-empty string or None")
        self.host = host
        self.port = port
        self.token = token
        self.max_concurrent = max_concurrent
        self.max_connections = max_connections
        self.timeout = float(timeout)
        self.handshake_timeout = float(handshake_timeout)
        self.advertise_host = advertise_host

        self.heartbeat_timeout = float(heartbeat_timeout)

        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._active = 0
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._closing = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._transfers = Transfers(
            self.tensors,
            self.identity,
            self.params,
            transports=self.transports,
            streams=streams,
            timeout=self.timeout,
            handshake_timeout=self.handshake_timeout,
            heartbeat_timeout=self.heartbeat_timeout,
            closing=self._closing,
            digests=digests,
            availability=self._availability,
            limiter=self._limiter,
        )
        self._new_publisher = functools.partial(self._make_publisher, registry, registry_heartbeat, registry_ttl)
        self._publisher = self._new_publisher()

    def _make_publisher(self, registry: str | None, heartbeat: float, ttl: float) -> Publisher | None:
        if registry is None:
            return None
        return Publisher(registry, functools.partial(server_fields, self), heartbeat=heartbeat, ttl=ttl)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> WeightServer:
        """Bind and start serving in the background; returns at once."""
        if self._listener is not None:
            return self
        if self.token is None:
            logger.warning(
                "netloader server for %r rank %d has no token: any host that reaches %s can read its weights",
                self.identity.model_id,
                self.identity.rank,
                self.host,
            )
        listener = socket.create_server((self.host, self.port), reuse_port=False, backlog=128)
        listener.settimeout(0.2)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"netloader-accept-{self.port}", daemon=True)
        self._acceptor.start()
        logger.info(
            "netloader serving %r rank %d (%d tensors, %.2f GB, %s) on %s",
            self.identity.model_id,
            self.identity.rank,
            len(self.tensors.tensors),
            self.tensors.total_bytes / 1e9,
            "/".join(self.transports),
            self.address,
        )
        if "gloo" in self.transports:
            logger.warning("netloader: gloo transfers open gloo's own listening port, which is unauthenticated")
        if self._publisher is not None and self._availability is None:
            self._publisher.start()  # a relay registers when its fill starts (see fill)
        return self

    @property
    def address(self) -> str:
        """``host:port`` a client can use (the wildcard address is replaced by this host's address)."""
        if self._listener is None:
            raise NetloaderError("server not started")
        host = self.advertise_host or self.host
        if host in ("", "0.0.0.0", "::"):
            host = _this_host_address()
        return format_address(host, self.port)

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, cancel running transfers at their next message boundary, and wait for the threads."""
        if self._publisher is not None:
            self._publisher.stop()  # first: no new client finds a closing source
        self._closing.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout)
        with self._lock:
            conns = list(self._connections.items())
        for conn, _ in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _, thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for _, t in conns if t.is_alive()]
        if alive:
            logger.warning("netloader server closed with %d transfer thread(s) still finishing", len(alive))

    def __enter__(self) -> WeightServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ relay

    @property
    def state(self) -> str:
        """``ready`` (holds every weight) or ``filling`` (a relay still loading; it serves what it has)."""
        a = self._availability
        return "ready" if a is None or a.complete else "filling"

    @property
    def progress(self) -> float:
        """Fraction of the weights' bytes in place (1.0 when ready)."""
        a = self._availability
        return 1.0 if a is None else a.progress

    @property
    def fill_error(self) -> str | None:
        """Why the last :meth:`fill` failed (None: it did not)."""
        return None if self._availability is None else self._availability.failed

    def fill(
        self,
        sources: Sequence[str] | None = None,
        *,
        registry: str | object | None = ...,
        timeout: float = 60.0,
        max_sources: int = 1,
        progress: bool | None = None,
        token: str | object | None = ...,
        **kwargs: Any,
    ) -> LoadReport:
        """Load this relay's tensors (``ready=False``) from ``sources`` and/or ``registry`` (default: the server's
        own registry; its own record is never used), serving what is in place meanwhile. Takes the arguments of
        :func:`~netloader.load_weights` (``token`` defaults to the server's own). On failure the server stops
        offering anything not in place (transfers waiting for it fail at once) and the error is raised."""
        from .client import load_weights

        availability = self._availability
        if availability is None:
            raise ConfigError("fill() is for a server started with ready=False")
        availability.reset()
        reg = self._registry if registry is ... else registry
        tok = self.token if token is ... else token
        try:
            found = list(sources or [])
            if reg is not None:
                from .registry import find_sources

                own_identity = self.identity
                found = find_sources(str(reg), own_identity, found)
            own = self.address if self._listener is not None else None
            found = [s for s in dict.fromkeys(found) if s != own]
            if not found:
                raise NoSourceError({}, "no source to fill from (this relay's own record is not one)")
            if self._publisher is not None and self._listener is not None:
                # registered only now, after its own lookup: a relay only ever pulls from relays that started
                # before it, so relays never wait on each other in a cycle; the next instance finds it at once
                self._publisher.start()
            report = load_weights(
                self._model, found, model_id=self.identity.model_id, rank=self.identity.rank,
                layout=self.identity.layout, token=tok, timeout=timeout, max_sources=max_sources, progress=progress,
                on_complete=lambda plan, i: availability.mark(plan.ops[i].segments),
                on_digests=self._transfers.set_digests,
                **{"chunk_size": RELAY_CHUNK_SIZE, **kwargs},
            )
            if not availability.complete:  # cannot happen: every message of the plan is in place
                raise TransferError(f"the fill left {availability.total - availability.bytes} bytes missing")
        except BaseException as exc:
            availability.fail(f"{type(exc).__name__}: {exc}")
            logger.warning("netloader: relay %r rank %d: fill failed: %s", self.identity.model_id,
                           self.identity.rank, exc)
            if self._publisher is not None:
                self._publisher.stop()  # a failed relay is no source: its record goes
                self._publisher = self._new_publisher()  # a later fill() registers afresh
            raise
        if self._publisher is not None:
            self._publisher.poke()  # "ready" now, not at the next heartbeat
        return report

    @property
    def active_transfers(self) -> int:
        return self._active

    @property
    def transfers_served(self) -> int:
        return self._transfers.served

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    # ------------------------------------------------------------------ accept

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off rather than spin
                continue
            with self._lock:
                full = len(self._connections) >= self.max_connections
                if not full:
                    thread = threading.Thread(
                        target=self._serve_connection, args=(conn, peer), name="netloader-conn", daemon=True
                    )
                    self._connections[conn] = thread
            if full:
                logger.debug("netloader: refusing %s, %d connections open", peer, self.max_connections)
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            thread.start()

    # ------------------------------------------------------------------ one connection

    def _serve_connection(self, conn: socket.socket, peer: tuple[object, ...]) -> None:
        who = format_address(str(peer[0]), int(peer[1]))  # type: ignore[arg-type]
        try:
            tune_socket(conn)
            self._converse(conn, who)
        except NetloaderError as exc:
            logger.info("netloader: connection from %s ended: %s", who, exc)
        except Exception:  # a bug must not take the owner down; it is logged with its traceback
            logger.exception("netloader: unexpected error serving %s", who)
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._lock:
                self._connections.pop(conn, None)

    def _converse(self, conn: socket.socket, who: str) -> None:
        hs = self.handshake_timeout
        nonce = new_nonce()
        send_message(
            conn,
            Hello(proto=PROTOCOL_VERSION, server=f"netloader/{__version__}", nonce=nonce, auth=self.token is not None),
            timeout=hs,
        )
        auth = expect(read_message(conn, timeout=hs, max_size=PREAUTH_MAX_FRAME), Auth)
        if auth.proto != PROTOCOL_VERSION:
            message = f"protocol {auth.proto} not supported; this source speaks {PROTOCOL_VERSION}"
            self._refuse(conn, "protocol", message)
            return
        if self.token is not None:
            if not macs_equal(client_mac(self.token, nonce, auth.nonce), auth.mac):
                logger.warning("netloader: authentication from %s refused", who)
                self._refuse(conn, "auth", "authentication refused")
                return
            reply = AuthOk(mac=server_mac(self.token, nonce, auth.nonce))
        else:
            reply = AuthOk(mac=None)
        send_message(conn, reply, timeout=hs)
        request = expect(read_message(conn, timeout=hs, max_size=REQUEST_MAX_FRAME), Probe, Verify, Load, Attach)
        if isinstance(request, Probe):
            send_message(conn, self._info(), timeout=hs)
            return
        if isinstance(request, Verify):  # one at a time per source: a second is refused at once
            try:
                result = self._transfers.verify()
            except BusyError as exc:  # a relay that does not know its origin's digests yet
                self._refuse(conn, "busy", str(exc))
                return
            if result is None:
                self._refuse(conn, "busy", "a verify is already running on this source")
                return
            logger.info("netloader: verify for %s: %d of %d tensors differ from the served digests", who,
                        result.mismatches, result.tensors)
            send_message(conn, result, timeout=self.timeout)
            return
        if isinstance(request, Attach):  # a data connection: runs its stream on this thread
            self._transfers.attach(conn, request)
            return
        if self._closing.is_set():
            self._refuse(conn, "closing", "source is shutting down")
            return
        if not self._slots.acquire(blocking=False):
            self._refuse(conn, "busy", f"source is running {self.max_concurrent} transfers")
            return
        with self._lock:
            self._active += 1
        try:
            self._transfers.serve(conn, who, request)
        finally:
            with self._lock:
                self._active -= 1
            self._slots.release()

    def _refuse(self, conn: socket.socket, code: str, message: str) -> None:
        with contextlib.suppress(NetloaderError):
            send_message(conn, Error(code=code, message=message), timeout=self.handshake_timeout)  # type: ignore[arg-type]

    def _info(self) -> Info:
        return Info(
            version=__version__,
            proto=PROTOCOL_VERSION,
            model_id=self.identity.model_id,
            rank=self.identity.rank,
            layout=dict(self.identity.layout),
            backend="/".join(self.transports),
            device=str(self.tensors.device),
            tensors=len(self.tensors.manifest),
            bytes=self.tensors.total_bytes,
            active_transfers=self._active,
            max_concurrent=self.max_concurrent,
            transfers_served=self._transfers.served,
        )


def check_heartbeat_timeout(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 2 * HEARTBEAT_INTERVAL <= value <= 3600:
        raise ConfigError(
            f"heartbeat_timeout must be a number of seconds in [{2 * HEARTBEAT_INTERVAL:g}, 3600], got {value!r}"
        )


def _this_host_address() -> str:
    """An address of this host that other hosts can use, without sending any packet."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
    return addr
