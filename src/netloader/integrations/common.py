"""What every engine integration does the same way, whatever the engine: name the tensors a model runs with, build
the identity both sides must agree on, receive a model while serving it (a relay), serve a loaded model, and
record how a load went.

Importing this module needs torch and netloader only, never an engine.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Collection

import torch
from torch import nn

from ..client import LoadReport, load_weights
from ..errors import ConfigError, ManifestMismatchError, NoSourceError
from ..manifest import Identity, LayoutValue, TensorSet
from ..plan import DEFAULT_BUCKET_SIZE
from ..protocol import parse_address
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
    relayed: bool = False  # it served while it loaded (its server started before the first byte arrived)


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


def _new_server(
    tensors: dict[str, torch.Tensor],
    config: NetloaderConfig,
    identity: dict[str, object],
    *,
    rank: int,
    draft: bool,
    host: str,
    ready: bool,
) -> WeightServer:
    """This rank's WeightServer as the config describes it (not started)."""
    return WeightServer(
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
        ready=ready,
        **identity,  # type: ignore[arg-type]
    )


def _keep(server: WeightServer, config: NetloaderConfig, *, rank: int, draft: bool, engine: str) -> str:
    """Make ``server`` (started here if it is not yet) this rank's server, replacing any earlier one, and write its
    OUTPUT_PREFIX file; return its address."""
    role = "draft" if draft else "target"
    key = (engine, role, rank)
    with _servers_lock:
        old = _servers.pop(key, None)
        if old is not None and old is not server:
            old.close()
        server.start()  # after the old one closed: it may have held the same LISTEN_PORT
        _servers[key] = server
    address = server.address
    path = config.output_path(rank, draft=draft)
    if path is not None:
        write_atomically(path, address + "\n")
    logger.info("netloader: rank %d (%s) serves its weights on %s%s", rank, role, address,
                f" (written to {path})" if path else "")
    return address


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
    try:
        server = _new_server(tensors, config, identity, rank=rank, draft=draft, host=host, ready=True)
        return _keep(server, config, rank=rank, draft=draft, engine=engine)
    except Exception as exc:
        logger.error("netloader: rank %d (%s) does not serve its weights: %s: %s", rank,
                     "draft" if draft else "target", type(exc).__name__, exc)
        return None


# -- receiving while serving (a relay) ------------------------------------------------------------------------------
def receive(
    tensors: dict[str, torch.Tensor],
    sources: list[str],
    config: NetloaderConfig,
    identity: dict[str, object],
    *,
    rank: int,
    draft: bool,
    host: str,
    relay: bool,
) -> tuple[LoadReport, WeightServer | None]:
    """Receive ``tensors`` (a model's runtime tensors, already in the layout the sources run with) in place from
    ``sources``, with the options the plugin config gives (``TIMEOUT``, ``HEARTBEAT_TIMEOUT``, ``BUCKET_MIB``).

    With ``relay``, this rank's WeightServer starts first, with ``ready=False`` on these very tensors, and its
    :meth:`~netloader.WeightServer.fill` does the load: the server registers as ``filling`` and serves every
    message already in place to the instances that start after this one (they wait for the rest), then says
    ``ready``. Returns the load's report and that server, still running: the caller hands it to :func:`keep_relay`
    once the model is complete, or to :func:`drop_relay` if the model is not used after all. A server that cannot
    start (its port taken, say) is logged and the load goes on without it (None). If the load fails, the server
    refuses everything not in place (the fill's doing), its record is gone, and it is closed before the error is
    raised: nothing of a failed load is ever offered.

    A rank never loads from its own server: every source that is this server's listening address (under any name
    of this host) is left out; a relay registers only after its fill's sources are chosen, so the registry never
    offers it either.
    """
    server = _start_relay(tensors, config, identity, rank=rank, draft=draft, host=host) if relay else None
    if server is None:
        report = load_weights(tensors, sources, token=config.token(), timeout=config.TIMEOUT,
                              heartbeat_timeout=config.HEARTBEAT_TIMEOUT, bucket_size=config.bucket_size(),
                              progress=False, **identity)  # type: ignore[arg-type]
        return report, None
    try:
        report = server.fill([s for s in sources if not _is_own_address(s, server)], registry=None,
                             timeout=config.TIMEOUT, heartbeat_timeout=config.HEARTBEAT_TIMEOUT,
                             bucket_size=config.bucket_size(), progress=False)
    except BaseException:
        drop_relay(server)
        raise
    return report, server


def _start_relay(
    tensors: dict[str, torch.Tensor],
    config: NetloaderConfig,
    identity: dict[str, object],
    *,
    rank: int,
    draft: bool,
    host: str,
) -> WeightServer | None:
    try:
        server = _new_server(tensors, config, identity, rank=rank, draft=draft, host=host, ready=False)
        server.start()
    except Exception as exc:  # the relay is a courtesy to the next instance; this instance loads without it
        logger.warning("netloader: rank %d (%s) cannot serve while it loads, loading without relaying: %s: %s",
                       rank, "draft" if draft else "target", type(exc).__name__, exc)
        return None
    logger.info("netloader: rank %d (%s) serves on %s while it loads (a relay)", rank,
                "draft" if draft else "target", server.address)
    return server


def _is_own_address(source: str, server: WeightServer) -> bool:
    """Whether ``source`` reaches ``server`` itself: its advertised address, or its port on the address it listens
    on (any address of this host when it listens on all of them): a shared SOURCE list naming every instance
    names this one too. Resolves names only for sources on the server's own port."""
    if source == server.address:
        return True
    try:
        host, port = parse_address(source)
    except ConfigError:
        return False
    if port != server.port:
        return False
    try:
        targets = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        if server.host not in ("", "0.0.0.0", "::"):
            listening = {info[4][0] for info in socket.getaddrinfo(server.host, port, type=socket.SOCK_STREAM)}
            return bool(targets & listening)
    except OSError:
        return False
    for address in targets:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((address, 0))  # succeeds only for an address of this host
        except OSError:
            continue
        return True
    return False


def keep_relay(
    server: WeightServer,
    tensors: dict[str, torch.Tensor],
    config: NetloaderConfig,
    identity: dict[str, object],
    *,
    rank: int,
    draft: bool,
    host: str,
    engine: str,
) -> str | None:
    """Keep a filled relay as this rank's server (OUTPUT_PREFIX written, no second server started); return its
    address. Never raises.

    ``tensors`` are the model's runtime tensors as it will run. An engine's post-load step may rebuild host-side
    state from the received values as new tensors (vLLM's ``_k_scale_cpu``, say): the relay then serves the ones
    it received into, which hold the same bytes, and keeps going (its downstream clients may still be loading).
    Only if the model's tensors differ otherwise (names, shapes, dtypes, or bytes) is the relay closed and these
    served instead (:func:`serve`).
    """
    try:
        changed = _changed(server.tensors, TensorSet(tensors))
        if changed is None:
            return _keep(server, config, rank=rank, draft=draft, engine=engine)
        logger.warning("netloader: rank %d: the model's tensors changed after loading (%s); serving them anew",
                       rank, changed)
    except Exception as exc:
        logger.error("netloader: rank %d keeps no relay: %s: %s", rank, type(exc).__name__, exc)
    drop_relay(server)
    return serve(tensors, config, identity, rank=rank, draft=draft, host=host, engine=engine)


def _changed(before: TensorSet, after: TensorSet) -> str | None:
    """How ``after`` differs from what ``before`` serves (names, shapes, dtypes, ties, bytes), or None. A tensor
    now in other memory is compared by value: only the ones that moved, usually a few small host-side copies."""
    if before.manifest != after.manifest:
        old, new = set(before.manifest.specs), set(after.manifest.specs)
        return f"{sorted(old - new)[:3]} became {sorted(new - old)[:3]}"
    for spec, x, y in zip(before.manifest.moving, before.tensors, after.tensors, strict=True):
        moved = x.data_ptr() != y.data_ptr() or x.stride() != y.stride() or x.device != y.device
        if moved and not torch.equal(_bytes(x), _bytes(y)):
            return f"{spec.name} holds other bytes"
    return None


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def drop_relay(server: WeightServer) -> None:
    """Close a relay whose model is not used (never raises)."""
    try:
        server.close()
    except Exception as exc:
        logger.warning("netloader: closing a relay failed: %s: %s", type(exc).__name__, exc)


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
    "drop_relay",
    "failure_reason",
    "global_rank",
    "keep_relay",
    "layout",
    "receive",
    "release_memory",
    "resolve_sources",
    "runtime_tensors",
    "serve",
    "write_atomically",
]
