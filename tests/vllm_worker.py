"""One rank of a real vLLM instance on vLLM's CPU platform, for the plugin tests.

Runs the recipe of a vLLM worker: plugins loaded through their entry points, ``EngineArgs(...,
load_format="netloader", model_loader_extra_config=...)``, gloo world of ``--world`` ranks, vLLM's model-parallel
groups, then ``get_model_loader(cfg.load_config).load_model(...)``. Prints one JSON line: the sha256 of every
parameter and buffer the loaded model holds (as vLLM's model sees them) and how the loader went, or the error.
The result goes to RESULT_FILE (written whole, then renamed) because vLLM logs on stdout. Then the worker stays up
(serving, if the loader serves) until its stdin closes; each line written to its stdin meanwhile,
``{"model": MODEL_DIR, "extra": {...}, "result": RESULT_FILE}``, has it load one more model in the same process
(same gloo world, new model-parallel groups), which replaces the previous one and its server. A worker whose first
load fails exits with status 3 once the result is written; a later failed load only writes its result. With
``-`` as MODEL_DIR the worker starts without a model, prints ``WAITING FOR A MODEL`` once vLLM is imported and its
plugins loaded, and waits for the first such line.

Compiled CPU ops that this build of vLLM lacks and that model construction needs get a pure-torch stand-in (see
:func:`register_cpu_op_stand_ins`).

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


#: printed by a worker started without a model once it is ready to load one
WAITING = "WAITING FOR A MODEL"


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
            "sources": outcome.report.sources if outcome.report else {},  # bytes from each source
            "failed": list(outcome.report.failures) if outcome.report else [],  # sources tried before, failed
            "relayed": outcome.relayed,  # it served while it loaded
        }
    return result


def write_result(path: str, result: dict[str, object]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def register_cpu_op_stand_ins() -> None:
    """Pure-torch stand-ins for compiled ops this CPU build of vLLM lacks, registered only where missing.

    ``_C::prepack_moe_weight(weight, output, isa)`` reorders MoE expert weights into the blocked layout of vLLM's
    CPU MoE kernel; ``CPUExpertsBase.process_weights_after_loading`` calls it for every MoE layer, so without it no
    MoE model can even be built here. The stand-in copies the weight unchanged (no forward pass runs in these
    tests): both the disk and the network instance run it, so what they hold stays comparable bit for bit.
    """
    import torch

    try:
        torch.ops._C.prepack_moe_weight  # noqa: B018 - raises when this build lacks the op
        return
    except (AttributeError, RuntimeError):
        pass
    library = torch.library.Library("_C", "FRAGMENT")
    library.define("prepack_moe_weight(Tensor weight, Tensor(a!) output, str isa) -> ()")

    def prepack_moe_weight(weight: torch.Tensor, output: torch.Tensor, isa: str) -> None:
        output.copy_(weight)

    library.impl("prepack_moe_weight", prepack_moe_weight, "CPU")
    _keep_alive.append(library)


_keep_alive: list[object] = []


def load(model_dir: str, extra: dict[str, object], rank: int, world: int, dist_port: int, draft: bool,
         result: dict[str, object]) -> tuple[object, object, object, object]:
    """Build the engine config and load the model (and the draft) with the netloader loader, as a worker does.

    The gloo world is set up on the first call and kept; vLLM's model-parallel groups are made anew for each model.
    """
    from vllm.config import set_current_vllm_config
    from vllm.distributed import (
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import get_draft_load_config

    cfg = EngineArgs(
        model=model_dir,
        load_format="netloader",
        model_loader_extra_config=extra,
        tensor_parallel_size=world,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=128,
        speculative_config=(
            {"model": model_dir, "method": "draft_model", "num_speculative_tokens": 2} if draft else None
        ),
    ).create_engine_config()
    draft_model = draft_loader = None
    with set_current_vllm_config(cfg):
        if model_parallel_is_initialized():  # a later model in this process: groups as a fresh worker makes them
            destroy_model_parallel()  # (which ones exist depends on the model: the expert-parallel group)
        else:
            init_distributed_environment(
                world_size=world,
                rank=rank,
                distributed_init_method=f"tcp://127.0.0.1:{dist_port}",
                local_rank=rank,
                backend="gloo",
            )
        initialize_model_parallel(world, 1)
        loader = get_model_loader(cfg.load_config)
        started = time.perf_counter()
        model = loader.load_model(vllm_config=cfg, model_config=cfg.model_config)
        result["load_seconds"] = time.perf_counter() - started
        if draft:
            assert cfg.speculative_config is not None
            draft_loader = get_model_loader(get_draft_load_config(cfg))
            draft_config = cfg.speculative_config.draft_model_config
            draft_model = draft_loader.load_model(vllm_config=cfg, model_config=draft_config, prefix="draft_model")
    return model, loader, draft_model, draft_loader


def load_and_report(model_dir: str, extra: dict[str, object], args: argparse.Namespace, path: str) -> bool:
    result: dict[str, object] = {"rank": args.rank}
    try:
        model, loader, draft, draft_loader = load(
            model_dir, extra, args.rank, args.world, args.dist_port, args.draft, result
        )
    except Exception as exc:
        result["error"] = type(exc).__name__
        result["message"] = str(exc)
        write_result(path, result)
        return False
    result.update(describe(model, loader))
    if args.draft:
        result["draft"] = describe(draft, draft_loader)
    write_result(path, result)
    return True


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

    vllm.plugins.load_general_plugins()
    register_cpu_op_stand_ins()
    if args.model == "-":
        print(WAITING, flush=True)
    elif not load_and_report(args.model, json.loads(args.extra), args, args.result):
        return 3
    # stay up (and serving) until the test closes our stdin; each line it writes meanwhile is one more model for
    # this same process to load: {"model": MODEL_DIR, "extra": {...}, "result": RESULT_FILE}
    for line in sys.stdin:
        if line.strip():
            step = json.loads(line)
            load_and_report(step["model"], step["extra"], args, step["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
