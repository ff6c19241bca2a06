"""SGLang integration: the loader behind ``--load-format netloader`` (registered by :mod:`.sglang_plugin`).

A rank with sources builds its model the way SGLang's default loader does, runs the model's post-load step and each
quantization method's ``process_weights_after_loading`` to reach the layout the source runs with, then receives
every runtime tensor in place through :func:`netloader.load_weights`. Any failure frees the half-built model and
loads from disk with SGLang's ``DefaultModelLoader`` (unless ``FALLBACK`` is false). Whichever path loaded the
model, a :class:`netloader.WeightServer` then serves it (unless ``SERVE`` is false); on the network path (with
``RELAY``, the default) that server starts before the first byte arrives and serves what is in place while the
rank loads (see :func:`.common.receive`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig, LoadFormat
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.model_loader.loader import BaseModelLoader, DefaultModelLoader, post_load_weights
from sglang.srt.model_loader.utils import set_default_torch_dtype
from torch import nn

from ..client import LoadReport
from ..errors import NetloaderError
from ..manifest import LayoutValue
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
from .sglang_plugin import LOAD_FORMAT

logger = logging.getLogger("netloader")

ENGINE = "sglang"


class NetloaderModelLoader(BaseModelLoader):
    """Loads weights from running instances over torch.distributed, else from disk; then serves them."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.config: NetloaderConfig = parse_config(load_config.model_loader_extra_config)
        if self.config.INT8_CACHE != "no" or self.config.INT8_CACHE_NAME:
            logger.info("netloader: INT8_CACHE is accepted for compatibility and not needed: sources serve the "
                        "processed layout, so quantized weights never need their original copy")
        # SGLang's default loader refuses extra-config keys it does not know: it gets none of ours
        disk_config = dataclasses.replace(load_config, load_format=LoadFormat.AUTO, model_loader_extra_config={})
        self._disk = DefaultModelLoader(disk_config)
        self.outcome: LoadOutcome | None = None

    # -- BaseModelLoader ---------------------------------------------------------------------------------------
    def download_model(self, model_config: ModelConfig) -> None:
        self._disk.download_model(model_config)

    def load_model(self, *, model_config: ModelConfig, device_config: DeviceConfig) -> nn.Module:
        draft = bool(getattr(model_config, "is_draft_model", False))
        rank = global_rank()
        role = "draft" if draft else "target"
        identity: dict[str, Any] = {"model_id": self.config.MODEL or model_config.model_path, "rank": rank,
                                    "layout": sglang_layout(model_config, role)}
        sources, reason = resolve_sources(self.config, identity, draft=draft)
        model: nn.Module | None = None
        relay: WeightServer | None = None
        outcome = LoadOutcome("disk", role, rank)
        if not sources:
            outcome.reason = reason
        else:
            try:
                model, outcome.report, relay = self._load_from_sources(
                    model_config, device_config, sources, identity, relay=self.config.SERVE and self.config.RELAY
                )
                outcome.path = "network"
            except Exception as exc:
                outcome.reason = failure_reason(exc, "SGLang")
                if not self.config.FALLBACK:
                    logger.error("netloader: rank %d (%s) could not load over the network: %s", rank, role,
                                 outcome.reason)
                    raise
                logger.warning("netloader: rank %d (%s) could not load over the network, loading from disk: %s",
                               rank, role, outcome.reason)
        if model is None:
            release_memory()
            model = self._disk.load_model(model_config=model_config, device_config=device_config)
        if relay is not None:  # it served while it loaded: it stays this rank's server
            outcome.served_at = keep_relay(relay, runtime_tensors(model), self.config, identity, rank=rank,
                                           draft=draft, host=_sglang_host(), engine=ENGINE)
            outcome.relayed = True
        elif self.config.SERVE:
            outcome.served_at = serve(runtime_tensors(model), self.config, identity, rank=rank, draft=draft,
                                      host=_sglang_host(), engine=ENGINE)
        self.outcome = outcome
        logger.info("netloader: rank %d (%s) loaded from %s%s", rank, role,
                    outcome.report.source if outcome.report else "disk",
                    f" ({outcome.report})" if outcome.report else f" ({outcome.reason})")
        return model

    # -- network path ------------------------------------------------------------------------------------------
    def _load_from_sources(
        self,
        model_config: ModelConfig,
        device_config: DeviceConfig,
        sources: list[str],
        identity: dict[str, Any],
        *,
        relay: bool,
    ) -> tuple[nn.Module, LoadReport, WeightServer | None]:
        """Build the model, receive it (serving it meanwhile with ``relay``). Returns it with the load's report and
        the relay's server (None without one); on failure that server is closed first."""
        if model_config.quantization:
            raise NetloaderError(f"quantization {model_config.quantization!r}: netloader's SGLang loader transfers "
                                 "unquantized models only")
        target_device = torch.device(device_config.device)
        model: nn.Module | None = None
        server: WeightServer | None = None
        try:
            # SGLang's own construction: the same classes, shapes and fused layout as a disk load
            model = self._disk.initialize_model_for_startup(model_config=model_config, device_config=device_config)
            with set_default_torch_dtype(model_config.dtype):
                # The layout the source runs with, in the order the default loader reaches it (the model's own
                # post-load step, then each quantization method's): shape-driven, the values are overwritten below,
                # derived tensors included, since they are runtime tensors too.
                post_load_weights(model)
                DefaultModelLoader.postprocess_weights(model, target_device)
            report, server = receive(runtime_tensors(model), sources, self.config, identity,
                                     rank=int(identity["rank"]), draft=identity["layout"]["role"] == "draft",
                                     host=_sglang_host(), relay=relay)
            return model.eval(), report, server
        except BaseException:
            if server is not None:  # a model that is not used is not offered either
                drop_relay(server)
            model = server = None  # the traceback keeps this frame: it must not keep the half-built model
            raise


def sglang_layout(model_config: ModelConfig, role: str) -> dict[str, LayoutValue]:
    """The vLLM plugin's layout keys (tp, pp, dp, ep, dtype, quantization, role) from SGLang's parallel context,
    plus ``engine``: the two engines' runtime tensors differ, so a vLLM instance never serves an SGLang one."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    ep = int(parallel.ep_size)
    extra: dict[str, LayoutValue] = {"engine": ENGINE}
    if ep > 1:
        extra["dp_rank"] = int(parallel.dp_rank)
    if parallel.enable_dp_attention:
        extra["dp_attention"] = 1
    return layout(tp=int(parallel.tp_size), pp=int(parallel.pp_size), dp=int(parallel.dp_size), ep=ep,
                  dtype=model_config.dtype, quantization=model_config.quantization, role=role, **extra)


def _sglang_host() -> str:
    from sglang.srt.utils.network import get_local_ip_auto

    return get_local_ip_auto("127.0.0.1")


__all__ = ["ENGINE", "LOAD_FORMAT", "LoadOutcome", "NetloaderModelLoader", "sglang_layout"]
