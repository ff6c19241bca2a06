"""The SGLang plugin on real SGLang 0.5.23 engines on CPU: ``sglang.Engine(device="cpu",
attention_backend="torch_native", load_format="netloader")`` with SGLang's own ``LlamaForCausalLM`` (fused
``qkv_proj``/``gate_up_proj``), its ``DefaultModelLoader`` for the disk path, its scheduler processes and a real
forward pass.

SGLang lives in its own environment (.venv-sglang, made by ``make setup``): each instance is a
``tests/sglang_worker.py`` process run with that environment's python, with ``tests/sglang_env`` on its PYTHONPATH
(stand-ins for torchvision and ``vllm._custom_ops``, and a probe plugin that reports, from inside each scheduler
process, the sha256 of every tensor the loaded model holds).

Four engines, two at a time: TP=1 from disk (the source) and TP=2 whose every source is dead (falls back to
disk), then a TP=1 and a TP=2 instance from folders with no weight file, each loading every rank from its
generation-0 counterpart and generating greedily.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ENV, HERE

ROOT = HERE.parent
SGLANG_PYTHON = ROOT / ".venv-sglang" / "bin" / "python"
WORKER = str(HERE / "sglang_worker.py")
SGLANG_ENV_DIR = HERE / "sglang_env"
MODEL = "tiny-llama"
TOKEN = "sglang-plugin-test-token"
START_TIMEOUT = 600
# token ids (the tiny model has no tokenizer); three prompts of different lengths, one batch
PROMPTS = [[1, 17, 42, 99, 7], [5, 300, 2], [450, 451, 452, 453, 10, 11, 12]]
NEW_TOKENS = 12


def _sglang_env(probe_dir: Path) -> dict[str, str]:
    return {**ENV, "PYTHONPATH": str(SGLANG_ENV_DIR), "NETLOADER_PROBE_DIR": str(probe_dir),
            "SGLANG_HOST_IP": "127.0.0.1", "NETLOADER_TOKEN": TOKEN, "VIRTUAL_ENV": str(SGLANG_PYTHON.parent.parent)}


def _free_port(count: int = 1) -> int:
    """A port p such that p .. p+count-1 are free now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        held = []
        try:
            for offset in range(count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free port range")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Instance:
    """One SGLang instance: a worker process whose Engine starts its own scheduler and detokenizer processes."""

    def __init__(self, workdir: Path, name: str, model_dir: Path, extra: dict[str, Any] | None, *, tp: int = 1) -> None:
        self.name = name
        self.dir = workdir / name
        self.probe_dir = self.dir / "probe"
        self.probe_dir.mkdir(parents=True)
        self.result_path = self.dir / "result.json"
        self.log = self.dir / "worker.log"
        spec = {"model": str(model_dir), "extra": extra, "tp": tp, "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS}
        env = _sglang_env(self.probe_dir)
        if tp > 1:  # SGLang on CPU binds each rank to its own cores; without NUMA nodes to go by, it must be told
            env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(str(rank % (os.cpu_count() or 1)) for rank in range(tp))
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [str(SGLANG_PYTHON), WORKER, json.dumps(spec), str(self.result_path)],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                start_new_session=True,
            )
        self._result: dict[str, Any] | None = None

    def result(self) -> dict[str, Any]:
        if self._result is None:
            deadline = time.monotonic() + START_TIMEOUT
            while not self.result_path.exists():
                if self.proc.poll() is not None and not self.result_path.exists():
                    pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.name} did not start in {START_TIMEOUT} s:\n{self.log_tail()}")
                time.sleep(0.5)
            self._result = json.loads(self.result_path.read_text())
        return self._result

    def started(self) -> dict[str, Any]:
        result = self.result()
        assert "error" not in result, f"{self.name}: {result['error']}: {result['message']}\n{self.log_tail()}"
        return result

    def rank(self, rank: int) -> dict[str, Any]:
        return self.started()["ranks"][str(rank)]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        """Ask the worker to shut its engine down (it does when its stdin closes)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def close(self) -> list[int]:
        """Shut the engine down; return the pids of its processes still alive afterwards (none, we assert)."""
        children = (self._result or {}).get("child_pids", [])
        self.stop()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in children if _alive(pid)]
        for pid in left:  # never leak an engine process, even when the test that finds one fails
            os.kill(pid, signal.SIGKILL)
        return left


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SGLANG_PYTHON.exists():
        pytest.fail(f"{SGLANG_PYTHON} is missing: `make setup` creates SGLang's environment")
    return tmp_path_factory.mktemp("sglang")


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    """A tiny Llama checkpoint with random weights, written by transformers (no download)."""
    path = workdir / "checkpoint"
    script = (
        "import sys, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "torch.manual_seed(0)\n"
        "cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,\n"
        "                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)\n"
        "LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([str(SGLANG_PYTHON), "-c", script, str(path)], check=True, capture_output=True,
                   env=_sglang_env(workdir))
    assert list(path.glob("*.safetensors")), "the checkpoint has no weight file"
    return path


@pytest.fixture(scope="module")
def no_weights(workdir: Path, checkpoint: Path) -> Path:
    """The same model's folder without any weight file: only a network load can fill it."""
    path = workdir / "no-weights"
    path.mkdir()
    for name in ("config.json", "generation_config.json"):
        (path / name).write_bytes((checkpoint / name).read_bytes())
    return path


@pytest.fixture(scope="module")
def listen_port() -> int:
    return _free_port()


@pytest.fixture(scope="module")
def dead() -> str:
    return f"127.0.0.1:{_free_port()}"  # nothing listens there


@pytest.fixture(scope="module")
def engines(
    workdir: Path, checkpoint: Path, no_weights: Path, listen_port: int, dead: str
) -> Iterator[dict[str, Instance]]:
    """Generation 0 (two engines side by side), then generation 1 from generation 0; all shut down at the end."""
    started: dict[str, Instance] = {}
    try:
        started["disk"] = Instance(workdir, "disk", checkpoint, {
            "MODEL": MODEL, "LISTEN_PORT": listen_port, "OUTPUT_PREFIX": str(workdir / "disk-rank")})
        started["fallback"] = Instance(workdir, "fallback", checkpoint, {
            "MODEL": MODEL, "SOURCE": [{"device_id": rank, "sources": [dead]} for rank in range(2)],
            "TIMEOUT": 10, "OUTPUT_PREFIX": str(workdir / "fallback-rank")}, tp=2)
        # refused in the launcher, before any scheduler process starts
        started["bad-config"] = Instance(workdir, "bad-config", checkpoint, {"MODEL": MODEL, "listen_port": 9000})
        disk = started["disk"].started()["ranks"]["0"]["outcome"]["served_at"]
        fallback = [started["fallback"].rank(rank)["outcome"]["served_at"] for rank in range(2)]
        started["network"] = Instance(workdir, "network", no_weights, {
            "MODEL": MODEL, "SOURCE": [{"device_id": 0, "sources": [dead, disk]}],
            "OUTPUT_PREFIX": str(workdir / "network-rank")})
        started["network-tp2"] = Instance(workdir, "network-tp2", no_weights, {
            "MODEL": MODEL, "FALLBACK": False, "SERVE": False,
            "SOURCE": [{"device_id": rank, "sources": [fallback[rank]]} for rank in range(2)]}, tp=2)
        yield started
    finally:
        for instance in started.values():  # all shut down at once, then each is waited for
            instance.stop()
        leaked = {name: instance.close() for name, instance in started.items()}
        assert not any(leaked.values()), f"engine processes outlived their shutdown: {leaked}"


def test_instance_from_disk_serves_from_its_scheduler_process(
    engines: dict[str, Instance], workdir: Path, listen_port: int
) -> None:
    instance = engines["disk"]
    result = instance.started()
    rank0 = instance.rank(0)
    assert rank0["outcome"]["path"] == "disk" and rank0["outcome"]["reason"] == "no SOURCE entry for rank 0"
    assert rank0["outcome"]["served_at"] == f"127.0.0.1:{listen_port}"
    assert (workdir / "disk-rank0.txt").read_text() == rank0["outcome"]["served_at"] + "\n"
    # the plugin is active where the model is loaded: in a scheduler process the engine started, not the launcher
    assert rank0["registered"] and rank0["loader"] == "NetloaderModelLoader"
    assert rank0["pid"] in result["child_pids"] and rank0["pid"] != result["pid"]
    # SGLang's runtime layout (fused projections) and a working model: the prompts get different continuations
    assert "model.layers.0.self_attn.qkv_proj.weight" in rank0["digests"]
    assert "model.layers.1.mlp.gate_up_proj.weight" in rank0["digests"]
    assert all(len(tokens) == NEW_TOKENS for tokens in result["tokens"])
    assert len({tuple(tokens) for tokens in result["tokens"]}) == len(PROMPTS)


def test_instance_without_weight_files_loads_over_the_network_and_generates_the_same_tokens(
    engines: dict[str, Instance], workdir: Path, dead: str
) -> None:
    source, instance = engines["disk"], engines["network"]
    got, expected = instance.rank(0), source.rank(0)
    outcome = got["outcome"]
    assert outcome["path"] == "network", outcome
    assert outcome["source"] == expected["outcome"]["served_at"] and outcome["bytes"] > 0
    assert dead in instance.log_text()  # the dead first source was tried and skipped
    # every tensor the model holds, bit for bit, with the same names, shapes and dtypes: parameters, buffers
    # (the rotary cos/sin cache) and plain tensor attributes
    assert got["shapes"] == expected["shapes"]
    assert got["digests"] == expected["digests"]
    assert any("rotary_emb.cos_sin_cache" in name for name in got["digests"])
    # the same greedy continuation of every prompt as the instance that read the checkpoint
    assert instance.started()["tokens"] == source.started()["tokens"]
    # and it serves in turn (a free port: this instance gives no LISTEN_PORT), from the server it started before
    # receiving (RELAY, the default): the one that served while it loaded is kept, no second one is started
    assert (workdir / "network-rank0.txt").read_text().strip() == outcome["served_at"]
    assert outcome["relayed"], outcome
    log = instance.log_text()
    assert f"rank 0 (target) serves on {outcome['served_at']} while it loads (a relay)" in log
    assert log.count("netloader serving 'tiny-llama' rank 0") == 1


def test_dead_source_falls_back_to_disk_and_still_serves(
    engines: dict[str, Instance], workdir: Path, dead: str
) -> None:
    instance = engines["fallback"]
    for rank in range(2):
        outcome = instance.rank(rank)["outcome"]
        assert outcome["path"] == "disk"
        assert "NoSourceError" in outcome["reason"] and dead in outcome["reason"], outcome["reason"]
        assert (workdir / f"fallback-rank{rank}.txt").read_text().strip() == outcome["served_at"]
    assert "could not load over the network, loading from disk" in instance.log_text()
    # TP=2 really shards: the fused projection differs between the ranks
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert instance.rank(0)["shapes"][qkv] == instance.rank(1)["shapes"][qkv]
    assert instance.rank(0)["digests"][qkv] != instance.rank(1)["digests"][qkv]
    assert instance.rank(0)["shapes"][qkv][0] * 2 == engines["disk"].rank(0)["shapes"][qkv][0]


def test_tp2_instance_loads_each_rank_from_its_counterpart_and_generates_the_same_tokens(
    engines: dict[str, Instance],
) -> None:
    source, instance = engines["fallback"], engines["network-tp2"]
    for rank in range(2):
        got, expected = instance.rank(rank), source.rank(rank)
        assert got["outcome"]["path"] == "network", got["outcome"]
        assert got["outcome"]["source"] == expected["outcome"]["served_at"]
        assert got["outcome"]["served_at"] is None  # SERVE false
        assert not got["outcome"]["relayed"]  # nor does it serve while it loads
        assert got["shapes"] == expected["shapes"] and got["digests"] == expected["digests"]
    assert instance.started()["tokens"] == source.started()["tokens"]


def test_bad_config_stops_the_engine_before_it_starts_naming_the_key(engines: dict[str, Instance]) -> None:
    instance = engines["bad-config"]
    result = instance.result()
    assert result["error"] == "ConfigError", result
    assert "unknown key 'listen_port'" in result["message"] and "did you mean 'LISTEN_PORT'" in result["message"]
    assert instance.proc.wait(timeout=60) == 3
    # the launcher raised it (a scheduler's failure kills the launcher, which then writes no result) and no
    # scheduler process began (each logs "Init parallel begin")
    assert "Init parallel begin" not in instance.log_text()
    assert "Init parallel begin" in engines["disk"].log_text()


CHECK_SCRIPT = """
import json, sys
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.model_loader.loader import get_model_loader
out = []
for extra in json.loads(sys.argv[1]):
    try:
        loader = get_model_loader(LoadConfig(load_format="netloader", model_loader_extra_config=extra))
        out.append({"ok": type(loader).__name__, "sources": loader.config.sources_for(0)})
    except Exception as exc:
        out.append({"error": type(exc).__name__, "value_error": isinstance(exc, ValueError), "message": str(exc)})
print("RESULT " + json.dumps(out))
"""

BAD_CONFIGS: list[tuple[dict[str, Any] | str, list[str]]] = [
    ({"SOURCES": []}, ["unknown key 'SOURCES'", "allowed keys", "SOURCE"]),
    ({"listen_port": 9000}, ["unknown key 'listen_port'", "did you mean 'LISTEN_PORT'"]),
    ({"LISTEN_PORT": 80}, ["LISTEN_PORT", "greater than or equal to 1024", "got 80"]),
    ({"SOURCE": [{"device_id": 0, "sources": ["no-port"]}]}, ["SOURCE[0].sources", "'no-port'", "host:port"]),
    ({"FALLBACK": "no"}, ["FALLBACK", "valid boolean", "'no'"]),
    ({"TOKEN": 12345}, ["TOKEN", "valid string", "<hidden>"]),
    ('{"TIMEOUT": 0}', ["TIMEOUT", "greater than 0"]),  # a JSON string, as --model-loader-extra-config passes it
]


@pytest.fixture(scope="module")
def config_checks(workdir: Path) -> list[dict[str, Any]]:
    configs = [extra for extra, _ in BAD_CONFIGS]
    configs.append('{"SOURCE": [{"device_id": 0, "sources": ["10.0.0.2:7000"]}]}')
    configs.append({})
    proc = subprocess.run([str(SGLANG_PYTHON), "-c", CHECK_SCRIPT, json.dumps(configs)],
                          env=_sglang_env(workdir), capture_output=True, text=True, timeout=START_TIMEOUT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("index", range(len(BAD_CONFIGS)), ids=[json.dumps(c)[:40] for c, _ in BAD_CONFIGS])
def test_invalid_or_unknown_key_is_refused_naming_the_key(config_checks: list[dict[str, Any]], index: int) -> None:
    result = config_checks[index]
    assert result.get("error") == "ConfigError" and result["value_error"], result
    for fragment in BAD_CONFIGS[index][1]:
        assert fragment in result["message"], (fragment, result["message"])
    assert "12345" not in result["message"]  # a token is never echoed


def test_valid_configs_give_the_netloader_loader(config_checks: list[dict[str, Any]]) -> None:
    from_string, empty = config_checks[len(BAD_CONFIGS):]
    assert from_string == {"ok": "NetloaderModelLoader", "sources": ["10.0.0.2:7000"]}
    assert empty == {"ok": "NetloaderModelLoader", "sources": []}


def test_importing_netloader_never_imports_sglang(workdir: Path) -> None:
    code = ("import sys, netloader, netloader.integrations.config, netloader.integrations.common, "
            "netloader.integrations.sglang_plugin; assert 'sglang' not in sys.modules, 'sglang imported'")
    subprocess.run([str(SGLANG_PYTHON), "-c", code], check=True, env={**ENV, "PYTHONPATH": ""}, timeout=120)
    assert sys.executable != str(SGLANG_PYTHON)  # the tests themselves run in the other environment
