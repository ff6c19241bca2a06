"""Discovery: sources publish themselves in a registry, new instances find every live source of their identity.

The backend is chosen by the URL's scheme, like a database URL:

- ``file:///some/dir``: the embedded default, for a filesystem every instance sees (see :mod:`.file`);
- ``redis://[[user]:password@]host:port/db`` and ``rediss://`` (TLS): a Redis server, for fleets (see :mod:`.redis`).

A :class:`~netloader.WeightServer` given ``registry=URL`` publishes its :class:`SourceRecord` and refreshes it from
a background thread (:mod:`.publisher`); :func:`netloader.load_weights` given ``registry=URL`` tries the live
records of exactly its identity after its explicit sources, best first (:func:`find_sources`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import ConfigError, NoSourceError, RegistryError
from ..manifest import Identity
from .base import (
    DEFAULT_HEARTBEAT,
    DEFAULT_TIMEOUT,
    DEFAULT_TTL,
    MAX_RECORD_BYTES,
    MAX_RECORDS_PER_LOOKUP,
    MAX_TTL,
    LiveSource,
    Registry,
    SourceRecord,
    identity_key,
    rank_sources,
)

logger = logging.getLogger("netloader")

SCHEMES = ("file", "redis", "rediss")
#: registry sources a client tries at most, after its explicit ones
MAX_CANDIDATES = 16


def redact(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<invalid registry URL>"


def check_url(url: object) -> str:
    """``url`` if it names a registry netloader can open (nothing is contacted), else :class:`ConfigError`."""
    if not isinstance(url, str) or not url or len(url) > 4096:
        raise ConfigError(f"registry must be a URL string ({', '.join(s + '://' for s in SCHEMES)}), got {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"invalid registry URL {redact(url)}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise ConfigError(
            f"registry URL {redact(url)} has scheme {parts.scheme!r}; netloader knows "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ConfigError(f"registry URL {url!r} must be file:///absolute/directory")
    elif not parts.hostname:
        raise ConfigError(f"registry URL {redact(url)} names no host")
    return url


def open_registry(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> Registry:
    """The registry ``url`` names; nothing is contacted until it is used. Every call it makes is bounded by
    ``timeout`` seconds (Redis: connect and each reply)."""
    check_url(url)
    if not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise ConfigError(f"registry timeout must be a number of seconds in (0, 3600], got {timeout!r}")
    scheme = urlsplit(url).scheme
    if scheme == "file":
        from .file import FileRegistry

        return FileRegistry(url, unquote(urlsplit(url).path))
    from .redis import RedisRegistry

    return RedisRegistry(url, redact(url), float(timeout))


def _describe(identity: Identity) -> str:
    layout = ", ".join(f"{k}={v}" for k, v in identity.layout.items()) or "none"
    return f"{identity.model_id!r} rank {identity.rank} layout {{{layout}}}"


def find_sources(
    registry: str | Registry,
    identity: Identity,
    explicit: Sequence[str] = (),
    *,
    timeout: float = DEFAULT_TIMEOUT,
    limit: int = MAX_CANDIDATES,
) -> list[str]:
    """The sources a client tries: ``explicit`` (in order), then the registry's live records of exactly
    ``identity``, best first (ready, then least busy; equally good ones in random order, so clients that start
    together spread over the sources), at most ``limit`` of them.

    With no explicit source, a registry that has no live record of ``identity`` or cannot be read raises
    :class:`~netloader.NoSourceError` at once, saying so and how many live sources the registry has for other
    identities of the same model (the usual mistake: another rank, TP size, dtype or role).
    """
    explicit = list(explicit)
    reg = open_registry(registry, timeout=timeout) if isinstance(registry, str) else registry
    try:
        try:
            live = reg.lookup(identity)
        except RegistryError as exc:
            if explicit:
                logger.warning("netloader: %s; trying the explicit sources only", exc)
                return explicit
            message = "no source given and the registry cannot be read"
            raise NoSourceError({f"registry {reg.url}": exc}, message) from None
        random.shuffle(live)
        found = [entry.record.address for entry in rank_sources(live)]
        found = [address for address in dict.fromkeys(found) if address not in explicit][:limit]
        if found:
            logger.info("netloader: registry %s offers %d source(s) of %s: %s", reg.url, len(found),
                        _describe(identity), ", ".join(found))
        elif not explicit:
            try:
                others = f"{reg.count_other_identities(identity)}"
            except RegistryError:
                others = "an unknown number of"
            raise NoSourceError(
                {},
                f"registry {reg.url} has no live source of {_describe(identity)}; it has {others} live source(s) "
                f"of {identity.model_id!r} with another rank or layout (TP/PP size, dtype, quantization, role)",
            )
        return explicit + found
    finally:
        if isinstance(registry, str):
            reg.close()


def find_sources_or_reason(
    registry: str, identity: Identity, *, timeout: float = DEFAULT_TIMEOUT
) -> tuple[list[str], str | None]:
    """For engine integrations: the registry's sources of ``identity`` (best first), or no source and why (a
    registry without such a source, or one that cannot be read). Never raises a :class:`NetloaderError`."""
    try:
        return find_sources(registry, identity, timeout=timeout), None
    except NoSourceError as exc:
        return [], str(exc)


__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TTL",
    "MAX_CANDIDATES",
    "MAX_RECORDS_PER_LOOKUP",
    "MAX_RECORD_BYTES",
    "MAX_TTL",
    "LiveSource",
    "Registry",
    "SourceRecord",
    "check_url",
    "find_sources",
    "find_sources_or_reason",
    "identity_key",
    "open_registry",
    "rank_sources",
    "redact",
]
