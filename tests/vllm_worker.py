"""One rank of a real vLLM instance on vLLM's CPU platform, for the plugin tests.

Runs the recipe of a vLLM worker: plugins loaded through their entry points, ``EngineArgs(...,
load_format="netloader", model_loader_extra_config=...)``, gloo world of ``--world`` ranks, vLLM's model-parallel
groups, then ``get_model_loader(cfg.load_config).load_model(...)``. Prints one JSON line: the sha256 of every
parameter and buffer the loaded model holds (as vLLM's model sees them) and how the loader went, or the error.
The result goes to RESULT_FILE (written whole, then renamed) because vLLM logs on stdout. Then the worker stays up
(serving, if the loader serves) until its stdin closes.

With ``--draft`` the instance also has a draft model (vLLM's ``draft_model`` speculative method, the same
checkpoint), loaded after the target the way vLLM's proposer loads it; its result goes under ``"draft"``.

Usage: python vllm_worker.py MODEL_DIR RANK WORLD DIST_PORT EXTRA_JSON RESULT_FILE [--draft]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def digest(tensor) -> str:  # type: ignore[no-untyped-def]
    import torch

    flat = tensor.detach().contiguous().view(-1).view(torch.uint8) if tensor.numel() else tensor.new_empty(0)
    return hashlib.sha256(flat.numpy().tobytes() if flat.numel() else b"").hexdigest()


def describe(model, loader) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """sha256 of every parameter and buffer as vLLM's model holds them, and how the loader went."""
    from netloader.integrations.vllm import runtime_tensors

    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    result: dict[str, object] = {
        "digests": {name: digest(t) for name, t in tensors.items()},
        "shapes": {name: list(t.shape) for name, t in tensors.items()},
        # what the instance runs with beyond parameters and buffers (tensors kept as plain module attributes)
        "attributes": {name: digest(t) for name, t in runtime_tensors(model).items() if name not in tensors},
    }
    outcome = getattr(loader, "outcome", None)
    if outcome is not None:
        result["outcome"] = {
            "path": outcome.path,
            "role": outcome.role,
            "reason": outcome.reason,
            "served_at": outcome.served_at,
            "source": outcome.report.source if outcome.report else None,
            "bytes": outcome.report.bytes if outcome.report else None,
        }
    return result


def write_result(path: str, result: dict[str, object]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("rank", type=int)
    parser.add_argument("world", type=int)
    parser.add_argument("dist_port", type=int)
    parser.add_argument("extra")
    parser.add_argument("result")
    parser.add_argument("--draft", action="store_true")
    args = parser.parse_args()

    import vllm.plugins
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import get_draft_load_config

    vllm.plugins.load_general_plugins()
    result: dict[str, object] = {"rank": args.rank}
    try:
        cfg = EngineArgs(
            model=args.model,
            load_format="netloader",
            model_loader_extra_config=json.loads(args.extra),
            tensor_parallel_size=args.world,
            skip_tokenizer_init=True,
            enforce_eager=True,
            dtype="bfloat16",
            max_model_len=128,
            speculative_config=(
                {"model": args.model, "method": "draft_model", "num_speculative_tokens": 2} if args.draft else None
            ),
        ).create_engine_config()
        with set_current_vllm_config(cfg):
            init_distributed_environment(
                world_size=args.world,
                rank=args.rank,
                distributed_init_method=f"tcp://127.0.0.1:{args.dist_port}",
                local_rank=args.rank,
                backend="gloo",
            )
            initialize_model_parallel(args.world, 1)
            loader = get_model_loader(cfg.load_config)
            started = time.perf_counter()
            model = loader.load_model(vllm_config=cfg, model_config=cfg.model_config)
            result["load_seconds"] = time.perf_counter() - started
            if args.draft:
                assert cfg.speculative_config is not None
                draft_loader = get_model_loader(get_draft_load_config(cfg))
                draft_config = cfg.speculative_config.draft_model_config
                draft = draft_loader.load_model(vllm_config=cfg, model_config=draft_config, prefix="draft_model")
    except Exception as exc:
        result["error"] = type(exc).__name__
        result["message"] = str(exc)
        write_result(args.result, result)
        return 3
    result.update(describe(model, loader))
    if args.draft:
        result["draft"] = describe(draft, draft_loader)
    write_result(args.result, result)
    sys.stdin.read()  # stay up (and serving) until the test closes our stdin
    return 0


if __name__ == "__main__":
    sys.exit(main())
