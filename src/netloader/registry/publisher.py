"""Keeps one source's record fresh in a registry from a background thread, without ever disturbing the source.

:class:`Publisher` publishes once when started, then every ``heartbeat`` seconds, and removes the record when
stopped, all from its own thread: starting and stopping wait at most the registry's timeout. A registry that is
down or slow is logged once (and once more when it is back) and never raises into the owner: the source keeps
serving and the record reappears with the next heartbeat that reaches the registry.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..errors import NetloaderError
from . import open_registry
from .base import DEFAULT_HEARTBEAT, DEFAULT_TIMEOUT, DEFAULT_TTL, Registry, SourceRecord, check_ttl

logger = logging.getLogger("netloader")


def server_fields(server: Any) -> dict[str, Any]:
    """A :class:`~netloader.WeightServer`'s record fields, from its public state. ``state`` and ``progress``
    default to a server that holds every weight (``ready``, 1.0); a filling server will set them."""
    identity = server.identity
    return {
        "model_id": identity.model_id,
        "rank": identity.rank,
        "layout": dict(identity.layout),
        "address": server.address,
        "state": getattr(server, "state", "ready"),
        "progress": float(getattr(server, "progress", 1.0)),
        "active_transfers": server.active_transfers,
        "max_concurrent": server.max_concurrent,
        "tensors": len(server.tensors.manifest),
        "bytes": server.tensors.total_bytes,
        "backend": server.backend,
        "auth": server.token is not None,
    }


class Publisher:
    """Publish the record ``fields()`` describes to ``registry`` every ``heartbeat`` seconds until stopped."""

    def __init__(
        self,
        registry: str | Registry,
        fields: Callable[[], dict[str, Any]],
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        ttl: float = DEFAULT_TTL,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        check_ttl(ttl, heartbeat)
        self.registry = open_registry(registry, timeout=timeout) if isinstance(registry, str) else registry
        self.fields = fields
        self.heartbeat = float(heartbeat)
        self.ttl = float(ttl)
        self.timeout = float(timeout)
        self.source_id = secrets.token_hex(8)
        self.started_at = time.time()
        self.published = 0  # heartbeats that reached the registry
        self._record: SourceRecord | None = None
        self._healthy: bool | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop() and poke(): publish now
        self._first = threading.Event()
        self._remove = True
        self._thread: threading.Thread | None = None

    def start(self) -> Publisher:
        """Start refreshing from a daemon thread; returns once the first heartbeat is done, or after the registry's
        timeout if it hangs (a directory on a hung network filesystem, say)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="netloader-registry", daemon=True)
            self._thread.start()
            self._first.wait(self.timeout + 1.0)
        return self

    def stop(self, remove: bool = True) -> None:
        """Stop refreshing and remove the record, waiting at most the registry's timeout (a record that could not
        be removed expires ``ttl`` seconds after its last heartbeat)."""
        self._remove = remove
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1.0)
            if self._thread.is_alive():
                logger.warning("netloader: registry %s did not answer within %.0f s; the record expires within "
                               "%.0f s", self.registry.url, self.timeout, self.ttl)

    def poke(self) -> None:
        """Publish now rather than at the next heartbeat (a relay that just became ready)."""
        self._wake.set()

    def _run(self) -> None:
        self._beat()
        self._first.set()
        while True:
            self._wake.wait(self.heartbeat)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._beat()
        record = self._record
        try:
            if self._remove and record is not None:
                self.registry.remove(record)
                logger.info("netloader: removed %s from registry %s", record.address, self.registry.url)
        except NetloaderError as exc:
            logger.info("netloader: %s; the record expires within %.0f s", exc, self.ttl)
        except Exception:
            logger.exception("netloader: unexpected error removing a record from registry %s", self.registry.url)
        finally:
            with contextlib.suppress(Exception):
                self.registry.close()

    def _beat(self) -> None:
        """One heartbeat; never raises."""
        try:
            now = time.time()
            record = SourceRecord(
                source_id=self.source_id,
                version=__version__,
                started_at=self.started_at,
                heartbeat_at=now,
                ttl=self.ttl,
                **self.fields(),
            )
            self._record = record  # before publishing: a write that timed out may still have landed
            self.registry.publish(record)
        except Exception as exc:
            if self._healthy is not False:
                reason = str(exc) if isinstance(exc, NetloaderError) else f"{type(exc).__name__}: {exc}"
                logger.warning("netloader: cannot publish (%s); the source keeps serving and publishes again "
                               "when the registry is back", reason)
            self._healthy = False
            return
        if self._healthy is False:
            logger.info("netloader: registry %s is back; %s published again", self.registry.url, record.address)
        elif self._healthy is None:
            logger.info("netloader: published %s to registry %s (heartbeat %.1f s, ttl %.1f s)", record.address,
                        self.registry.url, self.heartbeat, self.ttl)
        self._healthy = True
        self.published += 1
