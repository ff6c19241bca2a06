"""The source side of one transfer: from the client's ``load`` to its ``done``.

:class:`Transfers` holds what every transfer of one :class:`~netloader.server.WeightServer` shares (the tensors,
plans per bucket size, the transports it offers) and the secret ids of the transfers now waiting for their data
connections. The server's connection handling calls :meth:`Transfers.serve` for a ``load`` (inside a transfer
slot) and :meth:`Transfers.attach` for a data connection's ``attach``.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from .channel import Channel
from .errors import BusyError, ConfigError, IdentityMismatchError, NetloaderError, ProtocolError, TransferError
from .executor import Sender, sequence_of
from .integrity import Digests, digests_of, mismatches
from .manifest import Identity, TensorSet
from .plan import MIN_BUCKET_SIZE, PlanParams, TransferPlan, make_plan
from .protocol import (
    MAX_VERIFY_NAMES,
    Abort,
    Attach,
    Attached,
    Done,
    Error,
    Load,
    More,
    Ready,
    Rendezvous,
    VerifyResult,
    encode_trusted,
    expect,
    read_message,
    send_frame,
    send_message,
    validate_missing,
)
from .ratelimit import RateLimiter
from .relay import Availability
from .transport.base import Transport
from .transport.dist import SOURCE_RANK, ControlStore, DistTransport, form_group
from .transport.streams import StreamTransport, tune_data_socket

logger = logging.getLogger("netloader")

#: largest request a client may send (identity and layout; the manifest travels the other way)
REQUEST_MAX_FRAME = 64 * 1024
#: largest ``ready`` (the missing ranges of a resumed load)
READY_MAX_FRAME = 2 * 1024 * 1024
#: seconds between heartbeats, both ways; a ``heartbeat_timeout`` must be at least twice that
HEARTBEAT_INTERVAL = 1.0
#: gloo devices (TCP connections) per group
GLOO_STREAMS = 2


class Transfers:
    """What the transfers of one source share, and the ids of those waiting for their data connections."""

    def __init__(
        self,
        tensors: TensorSet,
        identity: Identity,
        params: PlanParams,
        *,
        transports: Sequence[str],
        streams: int,
        timeout: float,
        handshake_timeout: float,
        heartbeat_timeout: float,
        closing: threading.Event,
        digests: Digests | None = None,
        availability: Availability | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.tensors = tensors
        #: a relay's bytes in place (None: a ready server, everything is in place)
        self.availability = availability
        #: ``max_rate``: shared by every transfer
        self.limiter = limiter
        self.identity = identity
        self.params = params
        self.transports = tuple(transports)
        self.streams = streams
        self.timeout = timeout
        self.handshake_timeout = handshake_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.closing = closing
        self.served = 0
        self._lock = threading.Lock()
        self._plans: dict[PlanParams, tuple[TransferPlan, bytes]] = {}
        self._waiting: dict[str, StreamTransport] = {}
        #: the digests served: given (a relay passes on its origin's: at construction, or from its fill's sources
        #: through :meth:`set_digests`) or computed at the first load (an origin, which holds every weight)
        self._digests = digests
        self.relayed = digests is not None or availability is not None
        self._digest_lock = threading.Lock()
        self._digests_known = threading.Event()
        if digests is not None:
            self._digests_known.set()
        self._verify_lock = threading.Lock()

    # ------------------------------------------------------------------ digests

    def set_digests(self, digests: Digests) -> None:
        """A relay learns its origin's digests from the manifest of a source it fills from (the first one kept)."""
        with self._digest_lock:  # validated against this manifest by the client that received them
            if self._digests is None:
                self._digests = digests
                self.relayed = True
        self._digests_known.set()

    def digests(self) -> tuple[Digests, bool]:
        """The digests this source serves, and whether this call computed them (once; later calls wait for it).

        A relay never computes digests of what it holds (that would certify whatever arrived): it serves its
        origin's, and waits for them (at most ``handshake_timeout``) if its fill has not met a source yet."""
        if self.availability is not None:
            deadline = time.monotonic() + self.handshake_timeout
            while not self._digests_known.wait(0.05):
                if self.availability.failed is not None or time.monotonic() > deadline:
                    raise BusyError("this relay has not received its origin's digests yet")
            assert self._digests is not None
            return self._digests, False
        with self._digest_lock:
            if self._digests is not None:
                return self._digests, False
            started = time.perf_counter()
            self._digests = digests_of(self.tensors)
            logger.info(
                "netloader: %d tensor digests (%s) computed in %.2f s", len(self._digests.values),
                self._digests.algorithm, time.perf_counter() - started,
            )
            return self._digests, True

    def verify(self) -> VerifyResult | None:
        """Hash what this source holds now and compare with the digests it serves (None: a verify is running)."""
        if not self._verify_lock.acquire(blocking=False):
            return None
        try:
            started = time.perf_counter()
            digests, computed_now = self.digests()
            bad = mismatches(self.tensors, digests)
            moving = [s.name for s in self.tensors.manifest.specs if s.tied_to is None]
            return VerifyResult(
                algorithm=digests.algorithm, tensors=len(moving), mismatches=len(bad),
                names=[moving[i] for i in bad[:MAX_VERIFY_NAMES]], seconds=time.perf_counter() - started,
                computed_now=computed_now,
            )
        finally:
            self._verify_lock.release()

    # ------------------------------------------------------------------ plans

    def plan_for(self, bucket_size: int | None, chunk_size: int | None = None) -> tuple[TransferPlan, bytes]:
        """The plan (and its encoded manifest message) for a client's bucket and chunk sizes, capped at the
        server's."""
        size = self.params.bucket_size
        if bucket_size is not None:
            size = max(MIN_BUCKET_SIZE, min(bucket_size, size))
        chunk = self.params.chunk_size
        if chunk_size is not None:
            chunk = max(MIN_BUCKET_SIZE, min(chunk_size, chunk))
        params = PlanParams(size, min(self.params.direct_threshold, size), chunk)
        with self._lock:
            cached = self._plans.get(params)
        if cached is None:
            manifest = self.tensors.manifest
            digests, _ = self.digests()
            frame = encode_trusted(
                {
                    "type": "manifest",
                    "tensors": manifest.to_wire(),
                    "total_bytes": manifest.total_bytes,
                    "plan": {
                        "bucket_size": params.bucket_size,
                        "direct_threshold": params.direct_threshold,
                        "chunk_size": params.chunk_size,
                    },
                    "digests": digests.to_wire(),
                    "relayed": self.relayed,
                }
            )
            cached = (make_plan(manifest, params), frame)
            with self._lock:
                self._plans[params] = cached
        return cached

    # ------------------------------------------------------------------ data connections

    def attach(self, conn: socket.socket, request: Attach) -> None:
        """A data connection named its transfer: run its stream here, or refuse it."""
        with self._lock:
            transport = self._waiting.get(request.transfer)
        if transport is None:
            _refuse(conn, "protocol", "no such transfer", self.handshake_timeout)
            raise ProtocolError("a data connection named an unknown transfer")
        tune_data_socket(conn)
        transport.attach(
            request.stream,
            conn,
            announce=lambda: send_message(conn, Attached(stream=request.stream), timeout=self.handshake_timeout),
        )

    # ------------------------------------------------------------------ one transfer

    def serve(self, conn: socket.socket, who: str, request: Load) -> None:
        try:
            Identity.build(request.model_id, request.rank, request.layout).check_matches(self.identity)
            if request.backend not in self.transports:
                raise IdentityMismatchError(
                    f"transport mismatch: the client asks for {request.backend}, this source offers "
                    f"{', '.join(self.transports)}"
                )
        except (IdentityMismatchError, ConfigError) as exc:
            _refuse(conn, "mismatch", str(exc), self.handshake_timeout)
            logger.info("netloader: refused %s: %s", who, exc)
            return
        if self.availability is not None and self.availability.failed is not None:
            _refuse(conn, "failed", f"this relay's own load failed: {self.availability.failed}", self.handshake_timeout)
            return
        try:
            plan, frame = self.plan_for(request.bucket_size, request.chunk_size)
        except BusyError as exc:  # a relay that does not know its origin's digests yet, or whose fill failed
            failed = self.availability.failed if self.availability is not None else None
            if failed is not None:
                _refuse(conn, "failed", f"this relay's own load failed: {failed}", self.handshake_timeout)
            else:
                _refuse(conn, "busy", str(exc), self.handshake_timeout)
            return
        send_frame(conn, frame, timeout=self.timeout)
        answer = expect(read_message(conn, timeout=self.timeout, max_size=READY_MAX_FRAME), Ready, Abort)
        if isinstance(answer, Abort):
            logger.info("netloader: %s aborted before the transfer: %s", who, answer.reason)
            return
        try:
            missing = validate_missing(answer.missing, len(plan.ops))
        except ProtocolError as exc:
            _refuse(conn, "protocol", f"invalid ready: {exc}", self.handshake_timeout)
            raise
        sequence = sequence_of(missing)
        self._run(conn, who, request.backend, plan, sequence, resumed=answer.missing is not None, more=answer.more)

    def _run(
        self,
        conn: socket.socket,
        who: str,
        kind: str,
        plan: TransferPlan,
        sequence: list[int],
        *,
        resumed: bool,
        more: bool = False,
    ) -> None:
        transfer_id = secrets.token_hex(16)
        streams = self.streams if kind == "streams" else GLOO_STREAMS
        started = time.perf_counter()
        transport: Transport | None = None
        if kind == "streams" and sequence:
            transport = StreamTransport(streams, timeout=self.timeout, sending=True, peer="client")
            with self._lock:
                self._waiting[transfer_id] = transport
        channel = Channel(
            conn, peer="client", timeout=self.timeout, heartbeat_timeout=self.heartbeat_timeout,
            interval=HEARTBEAT_INTERVAL, max_frame=REQUEST_MAX_FRAME, store=kind != "streams",
        )
        sent = 0
        done: Done | None = None

        def check() -> None:
            if self.closing.is_set():
                raise TransferError("the source is shutting down")
            channel.check()

        def units() -> Iterator[list[int]]:
            """The ready's messages, then (a striped load) each ``more`` until the client's ``done``."""
            nonlocal done
            yield sequence
            while more:
                message = channel.next_message(More, Done, timeout=self.timeout)
                if isinstance(message, Done):
                    done = message
                    return
                yield sequence_of(validate_missing(message.missing, len(plan.ops)))

        try:
            send_message(
                conn,
                Rendezvous(transfer=transfer_id, timeout=self.timeout, streams=streams, heartbeat=HEARTBEAT_INTERVAL),
                timeout=self.handshake_timeout,
            )
            channel.start()
            if sequence or more:
                if transport is None and kind == "streams":
                    transport = StreamTransport(streams, timeout=self.timeout, sending=True, peer="client")
                    with self._lock:
                        self._waiting[transfer_id] = transport
                if isinstance(transport, StreamTransport):
                    transport.wait_attached(time.monotonic() + self.handshake_timeout, check)
                else:
                    store = ControlStore(channel, time.monotonic() + self.timeout)
                    group = form_group(
                        kind, store, SOURCE_RANK, local_host=conn.getsockname()[0], device=self.tensors.device,
                        timeout=self.timeout, streams=streams, check=check,
                    )
                    transport = DistTransport(group, store, self.tensors.device)
                sender = Sender(
                    plan, self.tensors.tensors, transport, device=self.tensors.device, check=check,
                    before_op=self._before_op(plan, check, channel),
                )
                transport = None  # the sender closes it, whatever happens
                sent = sender.run_units(units())
            if done is None:
                done = channel.next_message(Done, timeout=self.timeout)
        finally:
            with self._lock:
                self._waiting.pop(transfer_id, None)
            if transport is not None:
                transport.close(False)
            channel.close()
        seconds = time.perf_counter() - started
        if not done.ok:
            logger.warning("netloader: %s reported a failed load after %.2f s: %s", who, seconds, done.message)
            return
        with self._lock:
            self.served += 1
        logger.info(
            "netloader: served %.3f GB to %s in %.2f s (%.2f GB/s) over %s, %r rank %d%s",
            sent / 1e9,
            who,
            seconds,
            sent / 1e9 / max(seconds, 1e-9),
            kind,
            self.identity.model_id,
            self.identity.rank,
            f", resumed: {len(sequence)} of {len(plan.ops)} messages" if resumed and not more else "",
        )

    def _before_op(
        self, plan: TransferPlan, check: Callable[[], None], channel: Channel
    ) -> Callable[[int], None] | None:
        """What the sender does before reading message ``i``: a relay waits for its bytes, ``max_rate`` waits for
        its tokens."""
        availability, limiter, ops, timeout = self.availability, self.limiter, plan.ops, self.timeout
        if availability is None and limiter is None:
            return None

        def before(i: int) -> None:
            if availability is not None and not availability.complete:
                try:
                    availability.wait(ops[i].segments, timeout, check)
                except TransferError as exc:
                    if availability.failed is not None:  # tell the client why before the streams close
                        with contextlib.suppress(NetloaderError):
                            channel.send(Error(code="failed", message=str(exc)[:16000]))
                    raise
            if limiter is not None:
                limiter.take(ops[i].nbytes, check)

        return before


def _refuse(conn: socket.socket, code: str, message: str, timeout: float) -> None:
    with contextlib.suppress(NetloaderError):
        send_message(conn, Error(code=code, message=message), timeout=timeout)  # type: ignore[arg-type]
