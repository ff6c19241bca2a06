"""vLLM integration: ``--load-format netloader``.

vLLM loads :func:`register` in every process through the ``vllm.general_plugins`` entry point; it registers
:class:`NetloaderModelLoader`. A rank with sources builds its model with vLLM's own initialisation, runs
``process_weights_after_loading`` to reach the layout the source runs with, receives every runtime tensor in place
through :func:`netloader.load_weights`, then lets vLLM rebuild host-side state from the received values. Any
failure frees the half-built model and loads from disk with vLLM's default loader (unless ``FALLBACK`` is false).
Whichever path loaded the model, a :class:`netloader.WeightServer` then serves it (unless ``SERVE`` is false); on
the network path (with ``RELAY``, the default) that server starts before the first byte arrives and serves what
is in place while the rank loads (see :func:`.common.receive`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from vllm import __version__ as vllm_version
from vllm.config import ModelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.utils import process_weights_after_loading
from vllm.model_executor.utils import weights_already_processed
from vllm.utils.torch_utils import set_default_torch_dtype

from ..client import LoadReport
from ..errors import ManifestMismatchError, NetloaderError, NoSourceError
from ..manifest import DTYPES, LayoutValue, Manifest
from ..server import WeightServer
from .common import (
    LoadOutcome,
    drop_relay,
    failure_reason,
    global_rank,
    keep_relay,
    layout,
    receive,
    release_memory,
    resolve_sources,
    runtime_tensors,
    serve,
)
from .config import NetloaderConfig, parse_config

logger = logging.getLogger("netloader")

LOAD_FORMAT = "netloader"
ENGINE = "vllm"


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
        rank = global_rank()
        role = "draft" if draft else "target"
        identity = {"model_id": self.config.MODEL or model_config.model, "rank": rank,
                    "layout": _layout(vllm_config, model_config, role)}
        sources, reason = resolve_sources(self.config, identity, draft=draft)
        # a sleeping instance releases its weights' device memory under the tensors a server would read
        serving = self.config.SERVE and not model_config.enable_sleep_mode
        model: nn.Module | None = None
        relay: WeightServer | None = None
        outcome = LoadOutcome("disk", role, rank)
        if not sources:
            outcome.reason = reason
        else:
            try:
                model, outcome.report, relay = self._load_from_sources(
                    vllm_config, model_config, prefix, sources, identity, relay=serving and self.config.RELAY
                )
                outcome.path = "network"
            except Exception as exc:
                outcome.reason = failure_reason(exc, "vLLM")
                if not self.config.FALLBACK:
                    logger.error("netloader: rank %d (%s) could not load over the network: %s", rank, role,
                                 outcome.reason)
                    raise
                logger.warning("netloader: rank %d (%s) could not load over the network, loading from disk: %s",
                               rank, role, outcome.reason)
        if model is None:
            release_memory()
            with _accelerator_guard():
                model = self._disk.load_model(vllm_config, model_config, prefix)
        if self.config.SERVE and model_config.enable_sleep_mode:
            logger.warning("netloader: rank %d does not serve its weights: sleep mode is enabled", rank)
        elif relay is not None:  # it served while it loaded: it stays this rank's server
            outcome.served_at = keep_relay(relay, runtime_tensors(model), self.config, identity, rank=rank,
                                           draft=draft, host=self.config.LISTEN_HOST or _vllm_host(), engine=ENGINE)
            outcome.relayed = True
        elif self.config.SERVE:
            outcome.served_at = serve(runtime_tensors(model), self.config, identity, rank=rank, draft=draft,
                                      host=self.config.LISTEN_HOST or _vllm_host(), engine=ENGINE)
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
        *,
        relay: bool,
    ) -> tuple[nn.Module, LoadReport, WeightServer | None]:
        """Build the model, receive it (serving it meanwhile with ``relay``), finish it. Returns it with the load's
        report and the relay's server (None without one); on failure that server is closed first."""
        load_device = vllm_config.device_config.device if self.load_config.device is None else self.load_config.device
        target_device = torch.device(load_device)
        registered = _registry_snapshot(vllm_config)
        model: nn.Module | None = None
        server: WeightServer | None = None
        try:
            with set_default_torch_dtype(model_config.dtype):
                with target_device:
                    model = self.create_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
                _check_supported(model)
                # The layout the source runs with: processing is shape-driven, the values are overwritten below.
                process_weights_after_loading(model, model_config, target_device)
                report, server = _receive(model, sources, self.config, identity, relay=relay,
                                          host=self.config.LISTEN_HOST or _vllm_host())
                # Host-side state derived from weight values (e.g. float copies of scales) is rebuilt from the
                # received tensors; vLLM skips every tensor transform in this mode.
                with weights_already_processed():
                    process_weights_after_loading(model, model_config, target_device)
            return model.eval(), report, server
        except BaseException:
            if server is not None:  # a model that is not used is not offered either
                drop_relay(server)
            model = server = None  # the traceback keeps this frame: it must not keep the half-built model
            _registry_restore(vllm_config, registered)
            raise


def _receive(
    model: nn.Module, sources: list[str], config: NetloaderConfig, identity: dict[str, Any], *, relay: bool, host: str
) -> tuple[LoadReport, WeightServer | None]:
    """Receive every runtime tensor of ``model`` in place (serving them meanwhile with ``relay``).

    The client learns the source's manifest only in the handshake of a load. When every source refused because
    their manifest holds tensors this model makes only while reading a checkpoint (see
    :func:`create_checkpoint_dependent_tensors`), those are created and the sources asked once more: one more
    handshake, and the client's warning about the first refusal stays in the log. A relay's server describes the
    tensors it was built on, so the first attempt's server (closed when that attempt failed; no byte had moved)
    is not reused: the retry builds a new one on the completed tensor set, on the same port.
    """

    def attempt() -> tuple[LoadReport, WeightServer | None]:
        return receive(runtime_tensors(model), sources, config, identity, rank=int(identity["rank"]),
                       draft=identity["layout"]["role"] == "draft", host=host, relay=relay)

    try:
        return attempt()
    except NoSourceError as exc:
        # a source that refused with a manifest mismatch sent its manifest first; no byte has moved
        offered = [err.source for err in exc.failures.values()
                   if isinstance(err, ManifestMismatchError) and err.source is not None]
        created = create_checkpoint_dependent_tensors(model, offered[0]) if offered else []
        if not created:
            raise
    logger.info("netloader: rank %s: created %s, which this model makes only while reading a checkpoint that "
                "holds them (the source's does); asking the sources again", identity["rank"], ", ".join(created))
    return attempt()


def create_checkpoint_dependent_tensors(model: nn.Module, source: Manifest) -> list[str]:
    """Create in ``model`` the tensors of ``source`` that ``model`` declares but creates only while loading.

    vLLM builds a model's tensors in its constructor, but a model class may make some only while reading the
    checkpoint, and only when the checkpoint holds them: vLLM's Transformers backend (which runs Phi, among others)
    builds its ``lm_head`` without a bias, declared as an empty slot (``register_parameter("bias", None)``), and
    its ``load_weights`` fills the slot when it meets ``lm_head.bias`` in the checkpoint. A network load never
    reads the checkpoint (the new instance may have none), so such a tensor would be missing here.

    What a disk load creates is decided by the checkpoint, and the one fact about it that this instance knows for
    sure before any byte moves is the source's manifest: the source loaded that checkpoint (or received it from an
    instance that did). So every tensor the source holds and this model lacks, whose place here is such a declared
    empty slot (a parameter or buffer registered as ``None`` on an existing module), is created in that slot as
    the source has it: same shape and dtype, on this model's device, a parameter without gradient or a buffer
    with the slot's persistence. Its values arrive with all the others. This is sound because the identity check
    has already pinned the vLLM model class and version (see :func:`_layout`): the same class declares the same
    slots on both sides, so only the checkpoint can have filled one. Nothing else is created: a tensor with no
    declared slot here, or tied to another, is left to the manifest check, which stays strict about every name,
    shape, dtype and tie. The model's own ``load_weights`` cannot make these tensors instead: it wants checkpoint
    tensors (whole, unsharded), and the manifest only holds this rank's runtime shapes. Returns what it created.
    """
    have = runtime_tensors(model)
    device = next(iter(have.values())).device if have else torch.device("cpu")
    created: list[str] = []
    for spec in source.specs:
        if spec.name in have or spec.tied_to is not None or spec.dtype not in DTYPES:
            continue
        module_name, _, attr = spec.name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if attr in module._parameters and module._parameters[attr] is None:
            empty = torch.empty(spec.shape, dtype=DTYPES[spec.dtype], device=device)
            module.register_parameter(attr, nn.Parameter(empty, requires_grad=False))
        elif attr in module._buffers and module._buffers[attr] is None:
            empty = torch.empty(spec.shape, dtype=DTYPES[spec.dtype], device=device)
            module.register_buffer(attr, empty, persistent=attr not in module._non_persistent_buffers_set)
        else:
            continue
        created.append(f"{spec.name} ({spec.describe()})")
    return created


# -- vLLM facts ----------------------------------------------------------------------------------------------------
def _vllm_host() -> str:
    from vllm.utils.network_utils import get_ip

    return get_ip()


def _layout(vllm_config: VllmConfig, model_config: ModelConfig, role: str) -> dict[str, LayoutValue]:
    """What decides a rank's shard and its bytes: parallel sizes, dtype, quantization, target or draft, and the
    vLLM model class and version (they decide which tensors exist and the layout processing leaves them in)."""
    parallel = vllm_config.parallel_config
    extra: dict[str, LayoutValue] = {"engine": ENGINE, "architecture": model_config.architecture, "vllm": vllm_version}
    if parallel.enable_expert_parallel:
        extra["dp_rank"] = parallel.data_parallel_rank
    return layout(tp=parallel.tensor_parallel_size, pp=parallel.pipeline_parallel_size,
                  dp=parallel.data_parallel_size, ep=int(bool(parallel.enable_expert_parallel)),
                  dtype=model_config.dtype, quantization=model_config.quantization, role=role, **extra)


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


__all__ = [
    "LOAD_FORMAT",
    "LoadOutcome",
    "NetloaderModelLoader",
    "create_checkpoint_dependent_tensors",
    "register",
    "runtime_tensors",
]
