"""One real SGLang instance on CPU for the plugin tests, run with .venv-sglang's python.

Starts ``sglang.Engine(device="cpu", attention_backend="torch_native", load_format=..., tp_size=...)`` on the spec's
model folder, generates greedily (temperature 0) from the spec's prompts (token ids: the tiny model has no
tokenizer), and writes one JSON result (whole, then renamed): the tokens, the engine's child pids, and what each
scheduler process reported through the test probe plugin (tests/sglang_env). A failed start writes the error
instead. Then the instance stays up (serving, if the loader serves) until stdin closes, and shuts down.

Usage: python sglang_worker.py SPEC_JSON RESULT_FILE
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time


def write_result(path: str, result: dict[str, object]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def main() -> int:
    spec = json.loads(sys.argv[1])
    result_path = sys.argv[2]
    probe_dir = os.environ["NETLOADER_PROBE_DIR"]

    import sglang

    result: dict[str, object] = {"pid": os.getpid()}
    kwargs: dict[str, object] = {}
    if spec.get("extra") is not None:
        kwargs = {"load_format": "netloader", "model_loader_extra_config": json.dumps(spec["extra"])}
    started = time.perf_counter()
    try:
        engine = sglang.Engine(
            model_path=spec["model"],
            device="cpu",
            attention_backend="torch_native",
            skip_tokenizer_init=True,
            dtype="bfloat16",
            tp_size=spec.get("tp", 1),
            max_total_tokens=1024,
            max_running_requests=8,
            disable_cuda_graph=True,
            random_seed=0,
            sleep_on_idle=True,  # an idle scheduler otherwise polls without pause: a core per rank
            log_level="info",
            **kwargs,
        )
    except BaseException as exc:  # the scheduler's error reaches the launcher as an exception or an exit
        result["error"] = type(exc).__name__
        result["message"] = str(exc)
        write_result(result_path, result)
        return 3
    try:
        result["start_seconds"] = time.perf_counter() - started
        result["child_pids"] = engine.get_all_child_pids()
        outputs = engine.generate(
            input_ids=spec["prompts"],
            sampling_params={"temperature": 0.0, "max_new_tokens": spec.get("max_new_tokens", 8)},
        )
        result["tokens"] = [out["output_ids"] for out in outputs]
        result["ranks"] = {}
        for path in sorted(glob.glob(os.path.join(probe_dir, "rank*.json"))):
            with open(path) as f:
                probe = json.load(f)
            result["ranks"][str(probe["rank"])] = probe  # type: ignore[index]
        write_result(result_path, result)
        sys.stdin.read()  # stay up (and serving) until the test closes our stdin
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
