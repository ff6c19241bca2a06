"""Test-only SGLang plugin (tests/sglang_env is on PYTHONPATH of the SGLang processes the tests start, and its
``netloader_sglang_probe-0.dist-info`` declares the ``sglang.srt.plugins`` entry point).

In each scheduler process, after SGLang's ``ModelRunner.load_model``, it writes ``rank{R}.json`` into
``$NETLOADER_PROBE_DIR``: the process id, whether ``--load-format netloader`` is registered in this process, the
loader SGLang used and how it went, and the sha256 of every tensor the model holds — parameters, buffers and plain
tensor attributes of every module, walked here independently of netloader's own ``runtime_tensors``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"


def _digest(tensor: Any) -> str:
    import torch

    flat = tensor.detach().contiguous().cpu().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return hashlib.sha256(data).hexdigest()


def _tensors(model: Any) -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers, vars(module)):
            for attr, value in table.items():
                if isinstance(value, torch.Tensor) and value.device.type != "meta":
                    found.setdefault(f"{module_name}.{attr}" if module_name else attr, value)
    return found


def _after_load_model(result: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    out_dir = os.environ.get("NETLOADER_PROBE_DIR")
    if not out_dir:
        return result
    import torch

    from netloader.integrations.sglang_plugin import is_registered

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    loader = getattr(runner, "loader", None)
    outcome = getattr(loader, "outcome", None)
    tensors = _tensors(runner.model)
    report: dict[str, Any] = {
        "rank": rank,
        "pid": os.getpid(),
        "registered": is_registered(),
        "loader": type(loader).__name__,
        "digests": {name: _digest(t) for name, t in tensors.items()},
        "shapes": {name: [*t.shape, str(t.dtype)] for name, t in tensors.items()},
        "outcome": None,
    }
    if outcome is not None:
        report["outcome"] = {
            "path": outcome.path,
            "role": outcome.role,
            "reason": outcome.reason,
            "served_at": outcome.served_at,
            "relayed": outcome.relayed,
            "source": outcome.report.source if outcome.report else None,
            "bytes": outcome.report.bytes if outcome.report else None,
            "tensors": outcome.report.tensors if outcome.report else None,
        }
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)
    return result


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _after_load_model, HookType.AFTER)
