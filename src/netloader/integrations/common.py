"""What every engine integration does the same way, whatever the engine: name the tensors a model runs with, build
the identity both sides must agree on, serve a loaded model, and record how a load went.

Importing this module needs torch and netloader only, never an engine.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import logging
import os
import tempfile
import threading
from collections.abc import Collection

import torch
from torch import nn

from ..client import LoadReport
from ..errors import ManifestMismatchError, NoSourceError
from ..manifest import Identity, LayoutValue
from ..plan import DEFAULT_BUCKET_SIZE
from ..registry import find_sources_or_reason
from ..server import WeightServer
from .config import NetloaderConfig

logger = logging.getLogger("netloader")


@dataclasses.dataclass
class LoadOutcome:
    """How a loader's last ``load_model`` went (also logged)."""

    path: str  # "network" or "disk"
    role: str  # "target" or "draft"
    rank: int
    report: LoadReport | None = None
    reason: str | None = None  # why the network path was not taken or failed
    served_at: str | None = None  # the address this rank serves on, if it serves


def global_rank() -> int:
    """This process's rank in the engine's torch.distributed world (0 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def layout(
    *,
    tp: int,
    pp: int,
    dp: int,
    ep: int,
    dtype: torch.dtype | str,
    quantization: str | None,
    role: str,
    **extra: LayoutValue,
) -> dict[str, LayoutValue]:
    """The identity's layout: what decides a rank's shard and its bytes (parallel sizes, dtype, quantization,
    target or draft), plus whatever an engine adds (``extra``)."""
    return {
        "tp": tp,
        "pp": pp,
        "dp": dp,
        "ep": ep,
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": str(quantization or "none"),
        "role": role,
        **extra,
    }


#: module attributes that hold per-instance state, never weights (vLLM binds the KV cache to attention layers)
NOT_WEIGHTS = frozenset({"kv_cache"})


def runtime_tensors(model: nn.Module, skip: Collection[str] = NOT_WEIGHTS) -> dict[str, torch.Tensor]:
    """Every tensor ``model`` runs with, by name: parameters, buffers, then tensors that quantization methods,
    attention back-ends or a model's post-load step keep as plain module attributes.

    Attributes named in ``skip`` (per-instance state such as a KV cache bound to a layer), tensors on another
    device type than the parameters (host copies of device values) and meta tensors are left out.
    """
    named: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        named[name] = param
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if buffer is not None:
            named.setdefault(name, buffer)
    device_type = next((t.device.type for t in named.values() if t.device.type != "meta"), None)
    extra: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, value in vars(module).items():
            if attr in skip:
                continue
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                name = f"{module_name}.{attr}" if module_name else attr
                extra.setdefault(name, value)
    for name in sorted(extra):
        if name not in named:
            named[name] = extra[name]
    return {n: t for n, t in named.items() if t.device.type != "meta" and t.device.type == (device_type or "cpu")}


def resolve_sources(config: NetloaderConfig, identity: dict[str, object], *, draft: bool) -> tuple[list[str], str]:
    """The sources this rank tries: its ``SOURCE`` (or ``DRAFT_SOURCE``) entry, else, with a ``REGISTRY``, the live
    sources of exactly its identity (each rank looks up its own). With none, also why (for the load's outcome)."""
    rank = int(identity["rank"])  # type: ignore[call-overload]
    sources = config.sources_for(rank, draft=draft)
    reason = f"no {'DRAFT_SOURCE' if draft and config.DRAFT_SOURCE is not None else 'SOURCE'} entry for rank {rank}"
    if not sources and config.REGISTRY:
        sources, why = find_sources_or_reason(config.REGISTRY, Identity.build(**identity))  # type: ignore[arg-type]
        reason += f"; {why}"
    return sources, reason


def failure_reason(exc: BaseException, engine: str) -> str:
    """Why the network path failed, with what to do about a manifest mismatch (recorded in LoadOutcome)."""
    reason = f"{type(exc).__name__}: {exc}"
    failures = exc.failures.values() if isinstance(exc, NoSourceError) else [exc]
    if any(isinstance(err, ManifestMismatchError) for err in failures):
        reason += (" -- the source holds other tensors than this instance builds (listed before). The source and "
                   f"this instance must run the same model (checkpoint, config and revision) with the same {engine} "
                   "version and engine arguments (dtype, quantization, parallel sizes); restart one of them so "
                   "they match.")
    return reason


def release_memory() -> None:
    """Free what a failed attempt left (its traceback is gone by now) before a disk loader allocates."""
    gc.collect()
    if torch.accelerator.current_accelerator() is not None:
        torch.accelerator.empty_cache()


# -- serving -------------------------------------------------------------------------------------------------------
_servers: dict[tuple[str, str, int], WeightServer] = {}
_servers_lock = threading.Lock()


def serve(
    tensors: dict[str, torch.Tensor],
    config: NetloaderConfig,
    identity: dict[str, object],
    *,
    rank: int,
    draft: bool,
    host: str,
    engine: str,
) -> str | None:
    """Start (or replace) this rank's WeightServer and write its OUTPUT_PREFIX file; return its address.

    Never raises: the server is a courtesy to the next instance and must not fail this one.
    """
    role = "draft" if draft else "target"
    key = (engine, role, rank)
    try:
        server = WeightServer(
            tensors,
            host=config.LISTEN_HOST or host,
            port=config.listen_port(rank, draft=draft),
            token=config.token(),
            max_concurrent=config.MAX_CONCURRENT,
            timeout=config.TIMEOUT,
            heartbeat_timeout=config.HEARTBEAT_TIMEOUT,
            bucket_size=config.bucket_size() or DEFAULT_BUCKET_SIZE,
            registry=config.REGISTRY,
            max_rate=config.MAX_RATE_GBPS * 1e9 if config.MAX_RATE_GBPS is not None else None,
            **identity,  # type: ignore[arg-type]
        )
        with _servers_lock:
            old = _servers.pop(key, None)
            if old is not None:
                old.close()
            server.start()
            _servers[key] = server
        address = server.address
        path = config.output_path(rank, draft=draft)
        if path is not None:
            write_atomically(path, address + "\n")
        logger.info("netloader: rank %d (%s) serves its weights on %s%s", rank, role, address,
                    f" (written to {path})" if path else "")
        return address
    except Exception as exc:
        logger.error("netloader: rank %d (%s) does not serve its weights: %s: %s", rank, role,
                     type(exc).__name__, exc)
        return None


def close_servers() -> None:
    """Stop every server this process started (also run at exit)."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()


atexit.register(close_servers)


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees either nothing or all of it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".netloader-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


__all__ = [
    "NOT_WEIGHTS",
    "LoadOutcome",
    "close_servers",
    "failure_reason",
    "global_rank",
    "layout",
    "release_memory",
    "resolve_sources",
    "runtime_tensors",
    "serve",
    "write_atomically",
]
