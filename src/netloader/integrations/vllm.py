"""vLLM integration: ``--load-format netloader``.

vLLM loads :func:`register` in every process through the ``vllm.general_plugins`` entry point; it registers
:class:`NetloaderModelLoader`. A rank with sources builds its model with vLLM's own initialisation, runs
``process_weights_after_loading`` to reach the layout the source runs with, receives every runtime tensor in place
through :func:`netloader.load_weights`, then lets vLLM rebuild host-side state from the received values. Any
failure frees the half-built model and loads from disk with vLLM's default loader (unless ``FALLBACK`` is false).
Whichever path loaded the model, a :class:`netloader.WeightServer` then serves it (unless ``SERVE`` is false).
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
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import process_weights_after_loading
from vllm.model_executor.utils import weights_already_processed
from vllm.utils.torch_utils import set_default_torch_dtype

from ..client import LoadReport, load_weights
from ..errors import NetloaderError
from ..manifest import LayoutValue
from ..plan import DEFAULT_BUCKET_SIZE
from ..server import WeightServer
from .config import NetloaderConfig, parse_config

logger = logging.getLogger("netloader")

LOAD_FORMAT = "netloader"


@dataclasses.dataclass
class LoadOutcome:
    """How the last :meth:`NetloaderModelLoader.load_model` went (also logged)."""

    path: str  # "network" or "disk"
    role: str  # "target" or "draft"
    rank: int
    report: LoadReport | None = None
    reason: str | None = None  # why the network path was not taken or failed
    served_at: str | None = None  # the address this rank serves on, if it serves


class NetloaderModelLoader(BaseModelLoader):
    """Loads weights from running instances over torch.distributed, else from disk; then serves them."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.config: NetloaderConfig = parse_config(load_config.model_loader_extra_config)
        if self.config.INT8_CACHE != "no" or self.config.INT8_CACHE_NAME:
            logger.info("netloader: INT8_CACHE is accepted for compatibility and not needed: sources serve the "
                        "processed layout, so quantized weights never need their original copy")
        disk_config = dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        self._disk = DefaultModelLoader(disk_config)
        self.outcome: LoadOutcome | None = None

    # -- BaseModelLoader ---------------------------------------------------------------------------------------
    def download_model(self, model_config: ModelConfig) -> None:
        self._disk.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """In-place reload of an existing model's weights (vLLM's reload API) reads the checkpoint."""
        self._disk.load_weights(model, model_config)

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        draft = model_config.runner_type == "draft"
        rank = _global_rank()
        role = "draft" if draft else "target"
        sources = self.config.sources_for(rank, draft=draft)
        identity = {"model_id": self.config.MODEL or model_config.model, "rank": rank,
                    "layout": _layout(vllm_config, model_config, role)}
        model: nn.Module | None = None
        outcome = LoadOutcome("disk", role, rank)
        if not sources:
            outcome.reason = f"no SOURCE entry for rank {rank}"
        else:
            try:
                model, outcome.report = self._load_from_sources(vllm_config, model_config, prefix, sources, identity)
                outcome.path = "network"
            except Exception as exc:
                if not self.config.FALLBACK:
                    raise
                outcome.reason = f"{type(exc).__name__}: {exc}"
                logger.warning("netloader: rank %d (%s) could not load over the network, loading from disk: %s",
                               rank, role, outcome.reason)
        if model is None:
            gc.collect()  # the failed attempt's tensors (its traceback is gone now) before the disk loader allocates
            _empty_cache()
            with _accelerator_guard():
                model = self._disk.load_model(vllm_config, model_config, prefix)
        if self.config.SERVE and model_config.enable_sleep_mode:
            # a sleeping instance releases its weights' device memory under the tensors a server would read
            logger.warning("netloader: rank %d does not serve its weights: sleep mode is enabled", rank)
        elif self.config.SERVE:
            outcome.served_at = _serve(model, self.config, identity, rank=rank, draft=draft)
        self.outcome = outcome
        return model

    # -- network path ------------------------------------------------------------------------------------------
    def _load_from_sources(
        self,
        vllm_config: VllmConfig,
        model_config: ModelConfig,
        prefix: str,
        sources: list[str],
        identity: dict[str, Any],
    ) -> tuple[nn.Module, LoadReport]:
        load_device = vllm_config.device_config.device if self.load_config.device is None else self.load_config.device
        target_device = torch.device(load_device)
        registered = _registry_snapshot(vllm_config)
        model: nn.Module | None = None
        try:
            with set_default_torch_dtype(model_config.dtype):
                with target_device:
                    model = self.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
                _check_supported(model)
                # The layout the source runs with: processing is shape-driven, the values are overwritten below.
                process_weights_after_loading(model, model_config, target_device)
                report = load_weights(runtime_tensors(model), sources, token=self.config.token(),
                                      timeout=self.config.TIMEOUT, bucket_size=self.config.bucket_size(),
                                      heartbeat_timeout=self.config.HEARTBEAT_TIMEOUT,
                                      progress=False, **identity)
                # Host-side state derived from weight values (e.g. float copies of scales) is rebuilt from the
                # received tensors; vLLM skips every tensor transform in this mode.
                with weights_already_processed():
                    process_weights_after_loading(model, model_config, target_device)
            return model.eval(), report
        except BaseException:
            model = None  # the traceback keeps this frame: it must not keep the half-built model
            _registry_restore(vllm_config, registered)
            raise


#: module attributes that hold per-instance state, never weights (the KV cache is bound to attention layers)
_NOT_WEIGHTS = frozenset({"kv_cache"})


def runtime_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor ``model`` runs with, by name: parameters, buffers, then tensors that quantization methods or
    attention back-ends keep as plain module attributes after ``process_weights_after_loading``.

    Tensors on another device type than the parameters (host copies of device scales), meta tensors and the KV
    cache are state that vLLM rebuilds or allocates, not weights, and are left out.
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
            if attr in _NOT_WEIGHTS:
                continue
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                name = f"{module_name}.{attr}" if module_name else attr
                extra.setdefault(name, value)
    for name in sorted(extra):
        if name not in named:
            named[name] = extra[name]
    return {n: t for n, t in named.items() if t.device.type != "meta" and t.device.type == (device_type or "cpu")}


# -- serving -------------------------------------------------------------------------------------------------------
_servers: dict[tuple[str, int], WeightServer] = {}
_servers_lock = threading.Lock()


def _serve(
    model: nn.Module, config: NetloaderConfig, identity: dict[str, Any], *, rank: int, draft: bool
) -> str | None:
    """Start (or replace) this rank's WeightServer and write its OUTPUT_PREFIX file. Never raises."""
    key = ("draft" if draft else "target", rank)
    try:
        host = config.LISTEN_HOST or _vllm_host()
        server = WeightServer(
            runtime_tensors(model),
            host=host,
            port=config.listen_port(rank, draft=draft),
            token=config.token(),
            max_concurrent=config.MAX_CONCURRENT,
            timeout=config.TIMEOUT,
            heartbeat_timeout=config.HEARTBEAT_TIMEOUT,
            bucket_size=config.bucket_size() or DEFAULT_BUCKET_SIZE,
            **identity,
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
            _write_atomically(path, address + "\n")
        logger.info("netloader: rank %d (%s) serves its weights on %s%s", rank, key[0], address,
                    f" (written to {path})" if path else "")
        return address
    except Exception as exc:  # the server is a courtesy to the next instance; never fail this one
        logger.error("netloader: rank %d (%s) does not serve its weights: %s: %s", rank, key[0],
                     type(exc).__name__, exc)
        return None


def _close_servers() -> None:
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()


atexit.register(_close_servers)


def _write_atomically(path: str, text: str) -> None:
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


# -- vLLM facts ----------------------------------------------------------------------------------------------------
def _global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _vllm_host() -> str:
    from vllm.utils.network_utils import get_ip

    return get_ip()


def _layout(vllm_config: VllmConfig, model_config: ModelConfig, role: str) -> dict[str, LayoutValue]:
    """What decides a rank's shard and its bytes: parallel sizes, dtype, quantization, target or draft."""
    parallel = vllm_config.parallel_config
    layout: dict[str, LayoutValue] = {
        "tp": parallel.tensor_parallel_size,
        "pp": parallel.pipeline_parallel_size,
        "dp": parallel.data_parallel_size,
        "ep": int(bool(parallel.enable_expert_parallel)),
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "quantization": str(model_config.quantization or "none"),
        "role": role,
    }
    if parallel.enable_expert_parallel:
        layout["dp_rank"] = parallel.data_parallel_rank
    return layout


def _check_supported(model: nn.Module) -> None:
    """Refuse, before any byte moves, a model whose host-side state vLLM cannot rebuild from processed weights."""
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "uses_meta_device", False):
            raise NetloaderError(f"layer {name!r} uses online quantization, which netloader does not transfer")
        if isinstance(method, QuantizeMethodBase) and not method.supports_pre_processed_weights:
            raise NetloaderError(
                f"layer {name!r}: {type(method).__name__} cannot rebuild its state from processed weights"
            )


def _registry_snapshot(vllm_config: VllmConfig) -> dict[str, Any]:
    """What model construction registers globally (attention layers by name, MoE layers), to undo on failure."""
    snapshot: dict[str, Any] = {}
    for attr, value in vars(vllm_config.compilation_config).items():
        if attr.startswith("static_") and isinstance(value, (dict, list)):
            snapshot[attr] = value.copy()
    return snapshot


def _registry_restore(vllm_config: VllmConfig, snapshot: dict[str, Any]) -> None:
    compilation = vllm_config.compilation_config
    for attr, value in snapshot.items():
        current = getattr(compilation, attr)
        current.clear()
        current.update(value) if isinstance(current, dict) else current.extend(value)


def _empty_cache() -> None:
    if torch.accelerator.current_accelerator() is not None:
        torch.accelerator.empty_cache()


@contextlib.contextmanager
def _accelerator_guard() -> Iterator[None]:
    """vLLM's loaders call ``torch.accelerator.empty_cache()``, which raises on a machine with no accelerator."""
    if torch.accelerator.current_accelerator() is not None:
        yield
        return
    original = torch.accelerator.empty_cache
    torch.accelerator.empty_cache = lambda: None  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.empty_cache = original  # type: ignore[assignment]


_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register ``--load-format netloader`` (idempotent)."""
    global _registered
    if _registered:
        return
    register_model_loader(LOAD_FORMAT)(NetloaderModelLoader)
    if not logger.handlers:  # vLLM configures only its own logger; show netloader's lines the same way
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [netloader] %(message)s", "%m-%d %H:%M:%S"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    _registered = True


__all__ = ["LOAD_FORMAT", "LoadOutcome", "NetloaderModelLoader", "register", "runtime_tensors"]
