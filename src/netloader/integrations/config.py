"""The configuration of netloader's engine loaders (vLLM, SGLang): ``--model-loader-extra-config`` validated
with pydantic. One config module serves every integration, so the keys mean the same thing in each engine.

Accepts the keys of vllm-ascend's Netloader (``SOURCE``, ``MODEL``, ``LISTEN_PORT``, ``OUTPUT_PREFIX``,
``CONFIG_FILE``, ``INT8_CACHE``, ``INT8_CACHE_NAME``) plus netloader's own. Unlike the original, a bad value or an
unknown key is an error naming the key and what it allows, never a silent default. Importing this module does
not need vLLM or any other engine.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from ..protocol import format_address, parse_address
from ..registry import check_url, redact

#: the environment variable that supplies ``TOKEN`` when the config does not
TOKEN_ENV = "NETLOADER_TOKEN"
#: the environment variable that supplies ``REGISTRY`` when the config does not
REGISTRY_ENV = "NETLOADER_REGISTRY"
#: a ``CONFIG_FILE`` larger than this is refused (it is a small JSON object)
MAX_CONFIG_FILE = 1 << 20


class SourceEntry(BaseModel):
    """One ``SOURCE`` item: the addresses that serve global rank ``device_id``, tried in order."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    device_id: int = Field(ge=0, description="global rank these sources serve")
    sources: list[str] = Field(max_length=64, description='"ip:port" addresses, tried in order')

    @field_validator("sources")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            try:
                parse_address(address)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


class NetloaderConfig(BaseModel):
    """Every key netloader's engine loaders understand, with its default."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    SOURCE: list[SourceEntry] = Field(default_factory=list, description="per-rank sources; none -> load from disk")
    DRAFT_SOURCE: list[SourceEntry] | None = Field(
        None, description="sources of a draft model; default: SOURCE's hosts at port + DRAFT_PORT_OFFSET"
    )
    MODEL: str | None = Field(None, min_length=1, max_length=1024, description="name both sides must agree on")
    LISTEN_PORT: int | None = Field(None, ge=1024, le=65535, description="base port; rank r serves on base + r")
    LISTEN_HOST: str | None = Field(None, min_length=1, description="address to serve on")
    OUTPUT_PREFIX: str | None = Field(None, min_length=1, description="write ip:port to {prefix}{rank}.txt")
    CONFIG_FILE: str | None = Field(None, min_length=1, description="JSON file whose keys take precedence")
    TOKEN: str | None = Field(None, min_length=1, max_length=4096, repr=False, description="shared secret")
    SERVE: bool = Field(True, description="serve this instance's weights after loading")
    RELAY: bool = Field(
        True, description="with SERVE: serve while loading (a relay: what is in place is served, the rest waited for)"
    )
    FALLBACK: bool = Field(True, description="load from disk when the network path fails")
    TIMEOUT: float = Field(60.0, gt=0, le=86400, description="seconds any step may wait on a peer")
    HEARTBEAT_TIMEOUT: float = Field(
        5.0, ge=2, le=3600, description="seconds of silence after which a transfer's peer is given up"
    )
    BUCKET_MIB: int | None = Field(None, ge=1, le=4096, description="packed message size in MiB")
    MAX_CONCURRENT: int = Field(4, ge=1, le=64, description="transfers one rank serves at once")
    MAX_RATE_GBPS: float | None = Field(
        None, gt=0, le=10000, description="most GB/s (10^9 bytes/s) one rank's serving takes, all transfers together"
    )
    DRAFT_PORT_OFFSET: int = Field(10000, ge=1, le=60000, description="draft model serves on port + offset")
    REGISTRY: str | None = Field(
        default_factory=lambda: os.environ.get(REGISTRY_ENV) or None,
        description="registry URL (file:///dir, redis://host:port/db): ranks without SOURCE look up their identity "
        "there; every server publishes there",
    )
    INT8_CACHE: Literal["hbm", "dram", "no"] = Field("no", description="accepted for compatibility; not needed")
    INT8_CACHE_NAME: list[str] | None = Field(None, description="accepted for compatibility; not needed")

    @field_validator("REGISTRY")
    @classmethod
    def _registry(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                check_url(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    def sources_for(self, rank: int, *, draft: bool = False) -> list[str]:
        """The addresses to try for global ``rank`` (empty: load from disk)."""
        if draft and self.DRAFT_SOURCE is not None:
            return _lookup(self.DRAFT_SOURCE, rank)
        found = _lookup(self.SOURCE, rank)
        if not draft:
            return found
        shifted = []
        for address in found:
            host, port = parse_address(address)
            if port + self.DRAFT_PORT_OFFSET <= 65535:
                shifted.append(format_address(host, port + self.DRAFT_PORT_OFFSET))
        return shifted

    def bucket_size(self) -> int | None:
        """``BUCKET_MIB`` in bytes (None: the library's default)."""
        return self.BUCKET_MIB << 20 if self.BUCKET_MIB else None

    def token(self) -> str | None:
        return self.TOKEN if self.TOKEN is not None else (os.environ.get(TOKEN_ENV) or None)

    def listen_port(self, rank: int, *, draft: bool = False) -> int:
        """``LISTEN_PORT + rank`` (+ ``DRAFT_PORT_OFFSET`` for a draft model), or 0 for a free port."""
        if self.LISTEN_PORT is None:
            return 0
        port = self.LISTEN_PORT + rank + (self.DRAFT_PORT_OFFSET if draft else 0)
        if port > 65535:
            raise ConfigError(
                f"LISTEN_PORT {self.LISTEN_PORT} + rank {rank}"
                f"{f' + DRAFT_PORT_OFFSET {self.DRAFT_PORT_OFFSET}' if draft else ''} = {port} is above 65535"
            )
        return port

    def output_path(self, rank: int, *, draft: bool = False) -> str | None:
        if self.OUTPUT_PREFIX is None:
            return None
        return f"{self.OUTPUT_PREFIX}{'draft' if draft else ''}{rank}.txt"


def _lookup(entries: list[SourceEntry], rank: int) -> list[str]:
    return [address for entry in entries if entry.device_id == rank for address in entry.sources]


def parse_config(extra: Mapping[str, Any] | None) -> NetloaderConfig:
    """Validate ``--model-loader-extra-config``; ``CONFIG_FILE``'s keys override the inline ones.

    Raises :class:`~netloader.ConfigError` naming each bad key and what it allows.
    """
    if extra is None:
        extra = {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"--model-loader-extra-config must be a JSON object, got {type(extra).__name__}")
    merged = dict(extra)
    path = merged.get("CONFIG_FILE")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise ConfigError(f"CONFIG_FILE must be a path string, got {path!r}")
        from_file = _read_config_file(path)
        merged.update(from_file)
    try:
        config = NetloaderConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    _check_sources_unique(config.SOURCE, "SOURCE")
    if config.DRAFT_SOURCE is not None:
        _check_sources_unique(config.DRAFT_SOURCE, "DRAFT_SOURCE")
    return config


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"CONFIG_FILE {path!r} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_FILE:
        raise ConfigError(f"CONFIG_FILE {path!r} is larger than {MAX_CONFIG_FILE} bytes")
    try:
        loaded = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"CONFIG_FILE {path!r} is not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"CONFIG_FILE {path!r} must hold a JSON object, got {type(loaded).__name__}")
    if "CONFIG_FILE" in loaded:
        raise ConfigError(f"CONFIG_FILE {path!r} may not itself set CONFIG_FILE")
    return loaded


def _check_sources_unique(entries: list[SourceEntry], key: str) -> None:
    seen: set[int] = set()
    for entry in entries:
        if entry.device_id in seen:
            raise ConfigError(f"{key}: device_id {entry.device_id} appears twice; list all its sources in one entry")
        seen.add(entry.device_id)


def _explain(exc: ValidationError) -> str:
    lines = []
    unknown = []
    for error in exc.errors(include_url=False):
        loc = _format_loc(error["loc"])
        if error["type"] == "extra_forbidden":
            if len(error["loc"]) == 1:
                key = str(error["loc"][0])
                hint = next((k for k in NetloaderConfig.model_fields if k.lower() == key.lower()), None)
                unknown.append(repr(key) + (f" (did you mean {hint!r}?)" if hint else ""))
            else:
                lines.append(f"{loc}: unknown key; a SOURCE entry has exactly 'device_id' and 'sources'")
            continue
        top = str(error["loc"][0]) if error["loc"] else ""
        field = NetloaderConfig.model_fields.get(top)
        what = f" ({field.description})" if field is not None and field.description else ""
        value = "<hidden>" if top == "TOKEN" else repr(error.get("input"))
        if top == "REGISTRY" and isinstance(error.get("input"), str):
            value = repr(redact(error["input"]))  # a Redis URL may hold a password
        if len(value) > 80:
            value = value[:77] + "..."
        lines.append(f"{loc}: {error['msg']}; got {value}{what}")
    if unknown:
        allowed = ", ".join(NetloaderConfig.model_fields)
        lines.insert(0, f"unknown key {', '.join(unknown)}; allowed keys: {allowed}")
    return "invalid netloader config: " + "; ".join(lines)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<config>"
