"""SGLang plugin: makes ``--load-format netloader`` valid in every SGLang process.

SGLang runs :func:`register` in every process it starts (launcher, engine, each scheduler, detokenizer) through the
``sglang.srt.plugins`` entry point. SGLang has no loader registry: :func:`register` adds ``netloader`` to the
``--load-format`` choices and wraps ``LoadConfig._verify_load_format`` so that the string ``"netloader"`` becomes
:class:`netloader.integrations.sglang.NetloaderModelLoader`, which SGLang's ``get_model_loader`` instantiates as it
does any loader class; it also checks the extra config in the launcher. This module stays light (the hook registry
and the config only): the loader, and SGLang's model-loading modules with it, are imported where a model is loaded.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConfigError
from .config import parse_config

LOAD_FORMAT = "netloader"
#: what register() wraps: LoadConfig's check of ``load_format`` (it accepts a loader class as is)
VERIFY_TARGET = "sglang.srt.configs.load_config.LoadConfig._verify_load_format"
#: ... and the launcher's check of its arguments, to refuse a bad config before any scheduler process starts
#: (``ServerArgs`` is a msgspec struct: a hook on its ``__post_init__`` would never run)
SERVER_ARGS_TARGET = "sglang.srt.server_args.ServerArgs.check_server_args"
#: ``--model-loader-extra-config`` longer than this is refused (it is a small JSON object)
MAX_EXTRA_CONFIG = 1 << 20


def _verify_load_format(original: Any, load_config: Any, *args: Any, **kwargs: Any) -> Any:
    """AROUND hook on ``LoadConfig._verify_load_format``: ``"netloader"`` becomes the loader class."""
    value = load_config.load_format
    if isinstance(value, str) and value.lower() == LOAD_FORMAT:  # no LoadFormat member has this value
        from .sglang import NetloaderModelLoader

        load_config.load_format = NetloaderModelLoader
        return None
    return original(load_config, *args, **kwargs)


def _check_server_args(result: Any, server_args: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook on ``ServerArgs.check_server_args``: with ``--load-format netloader``, validate the extra config in
    the launcher, so that a bad key stops the launch with an error naming it before any scheduler starts."""
    formats = (getattr(server_args, "load_format", None), getattr(server_args, "speculative_draft_load_format", None))
    if any(isinstance(f, str) and f.lower() == LOAD_FORMAT for f in formats):
        parse_config(_extra_config(getattr(server_args, "model_loader_extra_config", None)))
    return result


def _extra_config(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if len(value) > MAX_EXTRA_CONFIG:
        raise ConfigError(f"--model-loader-extra-config is longer than {MAX_EXTRA_CONFIG} characters")
    try:
        return json.loads(value) if value.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"--model-loader-extra-config is not valid JSON: {exc}") from None


_registered = False


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: make ``--load-format netloader`` valid (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import LOAD_FORMAT_CHOICES, add_load_format_choices
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if LOAD_FORMAT not in LOAD_FORMAT_CHOICES:
        add_load_format_choices([LOAD_FORMAT])
    HookRegistry.register(VERIFY_TARGET, _verify_load_format, HookType.AROUND)
    HookRegistry.register(SERVER_ARGS_TARGET, _check_server_args, HookType.AFTER)
    _registered = True


def is_registered() -> bool:
    """Whether this process accepts ``--load-format netloader`` (a failed ``register`` is only logged by SGLang)."""
    from sglang.srt.configs.load_config import LoadConfig

    return isinstance(LoadConfig(load_format=LOAD_FORMAT).load_format, type)


__all__ = ["LOAD_FORMAT", "is_registered", "register"]
