"""The vLLM plugin on the real vLLM package (its CPU platform): real engine configs, real ``LlamaForCausalLM`` with
fused ``qkv_proj``/``gate_up_proj``, real ``DefaultModelLoader``, TP=2 over gloo, one process per rank.

No forward pass runs here (vLLM's compiled CPU kernels are absent), so every check compares weights bit for bit
with the instance that loaded them from disk.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ENV, HERE

WORKER = str(HERE / "vllm_worker.py")
MODEL = "tiny-llama"
TOKEN = "vllm-plugin-test-token"
VENV_ENV = {**ENV, "VLLM_TARGET_DEVICE": "cpu", "VLLM_HOST_IP": "127.0.0.1", "NETLOADER_TOKEN": TOKEN}
START_TIMEOUT = 240


def _free_port(count: int = 1) -> int:
    """A port p such that p .. p+count-1 are free now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            held = []
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


def _dead_address() -> str:
    return f"127.0.0.1:{_free_port()}"  # nothing listens there


class Instance:
    """One vLLM instance: ``world`` worker processes (one per rank) sharing a gloo world."""

    def __init__(
        self, workdir: Path, name: str, model_dir: Path, world: int, extra: dict[str, Any], *, draft: bool = False
    ) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir()
        dist_port = _free_port()
        self.procs: list[subprocess.Popen[str]] = []
        self.results_paths = [self.dir / f"result{rank}.json" for rank in range(world)]
        self.logs = [self.dir / f"rank{rank}.log" for rank in range(world)]
        for rank in range(world):
            with open(self.logs[rank], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, WORKER, str(model_dir), str(rank), str(world), str(dist_port),
                     json.dumps(extra), str(self.results_paths[rank]), *(["--draft"] if draft else [])],
                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True, env=VENV_ENV,
                ))
        self._results: list[dict[str, Any]] | None = None

    def results(self) -> list[dict[str, Any]]:
        if self._results is None:
            deadline = time.monotonic() + START_TIMEOUT
            while not all(p.exists() for p in self.results_paths):
                for rank, proc in enumerate(self.procs):
                    if proc.poll() is not None and not self.results_paths[rank].exists():
                        pytest.fail(f"{self.name} rank {rank} exited with {proc.returncode}:\n{self.log_tail(rank)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.name} did not finish loading in {START_TIMEOUT} s:\n{self.log_tail(0)}")
                time.sleep(0.2)
            self._results = [json.loads(p.read_text()) for p in self.results_paths]
        return self._results

    def log_tail(self, rank: int, lines: int = 40) -> str:
        return "\n".join(self.logs[rank].read_text(errors="replace").splitlines()[-lines:])

    def log_text(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


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
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=VENV_ENV, capture_output=True)
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
    return _free_port(2)


@pytest.fixture(scope="module")
def source(workdir: Path, checkpoint: Path, listen_port: int) -> Iterator[Instance]:
    """Generation 0: TP=2 from disk, serving on LISTEN_PORT + rank, addresses in OUTPUT_PREFIX files."""
    extra = {"MODEL": MODEL, "LISTEN_PORT": listen_port, "OUTPUT_PREFIX": str(workdir / "gen0-rank")}
    instance = Instance(workdir, "gen0", checkpoint, 2, extra)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def gen1(workdir: Path, no_weights: Path, source: Instance) -> Iterator[Instance]:
    """Generation 1: TP=2, no weight files, SOURCE read from generation 0's OUTPUT_PREFIX files."""
    source.results()
    sources = [{"device_id": rank, "sources": [(workdir / f"gen0-rank{rank}.txt").read_text().strip()]}
               for rank in range(2)]
    extra = {"MODEL": MODEL, "SOURCE": sources, "OUTPUT_PREFIX": str(workdir / "gen1-rank")}
    instance = Instance(workdir, "gen1", no_weights, 2, extra)
    yield instance
    instance.close()


def _digests(instance: Instance) -> list[dict[str, str]]:
    results = instance.results()
    for result in results:
        assert "error" not in result, f"{instance.name} rank {result['rank']}: {result.get('message')}"
    return [result["digests"] for result in results]


def test_source_loads_from_disk_and_serves_on_listen_port(source: Instance, workdir: Path, listen_port: int) -> None:
    results = source.results()
    for rank, result in enumerate(results):
        outcome = result["outcome"]
        assert outcome["path"] == "disk" and outcome["reason"] == f"no SOURCE entry for rank {rank}"
        assert outcome["served_at"] == f"127.0.0.1:{listen_port + rank}"
        assert (workdir / f"gen0-rank{rank}.txt").read_text() == outcome["served_at"] + "\n"
    shards = _digests(source)
    # TP=2 really shards: the fused projections differ between the ranks, and they are the fused vLLM layout
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    assert shards[0][qkv] != shards[1][qkv]
    assert "model.layers.1.mlp.gate_up_proj.weight" in shards[0]


def test_instance_without_weight_files_loads_every_rank_over_the_network(
    source: Instance, gen1: Instance, workdir: Path
) -> None:
    expected = _digests(source)
    got = _digests(gen1)
    for rank in range(2):
        outcome = gen1.results()[rank]["outcome"]
        assert outcome["path"] == "network", outcome
        assert outcome["source"] == source.results()[rank]["outcome"]["served_at"]
        assert outcome["bytes"] > 0
        assert got[rank] == expected[rank]  # every parameter and buffer, bit for bit, same names and shapes
        assert gen1.results()[rank]["shapes"] == source.results()[rank]["shapes"]
        # tensors the attention layers keep outside parameters and buffers came along too
        assert gen1.results()[rank]["attributes"] == source.results()[rank]["attributes"]
        assert any(name.endswith("attn._k_scale_cpu") for name in gen1.results()[rank]["attributes"])
        # and it serves in turn (a free port, since this instance gives no LISTEN_PORT)
        assert (workdir / f"gen1-rank{rank}.txt").read_text().strip() == outcome["served_at"]


def test_second_generation_loads_from_a_network_loaded_instance_and_config_file_wins(
    source: Instance, gen1: Instance, workdir: Path, no_weights: Path
) -> None:
    gen1_addresses = [(workdir / f"gen1-rank{rank}.txt").read_text().strip() for rank in range(2)]
    dead = _dead_address()
    config_file = workdir / "gen2.json"
    # The file's SOURCE replaces the inline one; rank 0 first meets a dead source, then gen 1.
    config_file.write_text(json.dumps({
        "SOURCE": [{"device_id": 0, "sources": [dead, gen1_addresses[0]]},
                   {"device_id": 1, "sources": [gen1_addresses[1]]}],
        "SERVE": False,
    }))
    inline = {
        "MODEL": MODEL,
        "SOURCE": [{"device_id": rank, "sources": [dead]} for rank in range(2)],
        "FALLBACK": False,  # with no weight files and the inline SOURCE, this instance could not start
        "OUTPUT_PREFIX": str(workdir / "gen2-rank"),
        "CONFIG_FILE": str(config_file),
    }
    gen2 = Instance(workdir, "gen2", no_weights, 2, inline)
    try:
        got = _digests(gen2)
        expected = _digests(source)
        for rank in range(2):
            outcome = gen2.results()[rank]["outcome"]
            assert outcome["path"] == "network" and outcome["source"] == gen1_addresses[rank], outcome
            assert got[rank] == expected[rank]
            assert outcome["served_at"] is None  # SERVE false (from the file): no server, no address file
            assert not (workdir / f"gen2-rank{rank}.txt").exists()
        assert dead in gen2.log_text(0)  # the dead first source was tried and skipped
    finally:
        gen2.close()


def test_dead_source_falls_back_to_disk_bit_exact(workdir: Path, checkpoint: Path, source: Instance) -> None:
    dead = _dead_address()
    extra = {"MODEL": MODEL, "SOURCE": [{"device_id": rank, "sources": [dead]} for rank in range(2)],
             "TIMEOUT": 10, "OUTPUT_PREFIX": str(workdir / "fallback-rank")}
    instance = Instance(workdir, "fallback", checkpoint, 2, extra)
    try:
        got = _digests(instance)
        expected = _digests(source)
        for rank in range(2):
            outcome = instance.results()[rank]["outcome"]
            assert outcome["path"] == "disk"
            assert "NoSourceError" in outcome["reason"] and dead in outcome["reason"]
            assert got[rank] == expected[rank]
            # the half-built model was released (vLLM refuses a second model with the same layer names) and the
            # instance still serves what it loaded from disk
            assert (workdir / f"fallback-rank{rank}.txt").read_text().strip() == outcome["served_at"]
        assert "could not load over the network, loading from disk" in instance.log_text(0)
    finally:
        instance.close()


def test_a_different_partition_is_refused_before_any_byte_moves(
    workdir: Path, checkpoint: Path, source: Instance
) -> None:
    """A TP=1 instance asking the TP=2 source's rank 0: same model, same rank number, another shard."""
    address = source.results()[0]["outcome"]["served_at"]
    extra = {"MODEL": MODEL, "SERVE": False, "SOURCE": [{"device_id": 0, "sources": [address]}]}
    instance = Instance(workdir, "tp-mismatch", checkpoint, 1, extra)
    try:
        (result,) = instance.results()
        outcome = result["outcome"]
        assert outcome["path"] == "disk"
        assert "IdentityMismatchError" in outcome["reason"] and "tp" in outcome["reason"], outcome["reason"]
        assert result["shapes"]["model.layers.0.self_attn.qkv_proj.weight"] != (
            source.results()[0]["shapes"]["model.layers.0.self_attn.qkv_proj.weight"]
        )
    finally:
        instance.close()


def test_fallback_false_with_a_dead_source_stops_with_a_clear_error(workdir: Path, checkpoint: Path) -> None:
    dead = _dead_address()
    extra = {"MODEL": MODEL, "SOURCE": [{"device_id": 0, "sources": [dead]}], "FALLBACK": False, "TIMEOUT": 10}
    instance = Instance(workdir, "nofallback", checkpoint, 1, extra)
    try:
        (result,) = instance.results()
        assert result["error"] == "NoSourceError"
        assert dead in result["message"] and "refused" in result["message"].lower()
        assert instance.procs[0].wait(timeout=60) == 3
    finally:
        instance.close()


DRAFT_OFFSET = 7  # a draft model serves on its target's port + DRAFT_PORT_OFFSET


@pytest.fixture(scope="module")
def draft_source(workdir: Path, checkpoint: Path) -> Iterator[Instance]:
    """TP=1 with a draft model (speculative decoding): target on LISTEN_PORT, draft on LISTEN_PORT + offset."""
    base = _free_port(DRAFT_OFFSET + 1)
    extra = {"MODEL": MODEL, "LISTEN_PORT": base, "DRAFT_PORT_OFFSET": DRAFT_OFFSET,
             "OUTPUT_PREFIX": str(workdir / "spec-rank")}
    instance = Instance(workdir, "spec", checkpoint, 1, extra, draft=True)
    yield instance
    instance.close()


def test_draft_model_has_its_own_server_port_and_address_file(draft_source: Instance, workdir: Path) -> None:
    (result,) = draft_source.results()
    target, draft = result["outcome"], result["draft"]["outcome"]
    assert target["role"] == "target" and draft["role"] == "draft"
    host, port = target["served_at"].rsplit(":", 1)
    assert draft["served_at"] == f"{host}:{int(port) + DRAFT_OFFSET}"
    assert (workdir / "spec-rank0.txt").read_text().strip() == target["served_at"]
    assert (workdir / "spec-rankdraft0.txt").read_text().strip() == draft["served_at"]


def test_new_instance_takes_target_and_draft_each_from_its_own_server(
    draft_source: Instance, workdir: Path, no_weights: Path
) -> None:
    (expected,) = draft_source.results()
    extra = {"MODEL": MODEL, "DRAFT_PORT_OFFSET": DRAFT_OFFSET, "SERVE": False,
             "SOURCE": [{"device_id": 0, "sources": [expected["outcome"]["served_at"]]}]}
    instance = Instance(workdir, "spec-client", no_weights, 1, extra, draft=True)
    try:
        (got,) = instance.results()
        assert "error" not in got, got.get("message")
        for part in (got, got["draft"]):
            assert part["outcome"]["path"] == "network", part["outcome"]
        assert got["outcome"]["source"] == expected["outcome"]["served_at"]
        assert got["draft"]["outcome"]["source"] == expected["draft"]["outcome"]["served_at"]
        assert got["digests"] == expected["digests"]
        assert got["draft"]["digests"] == expected["draft"]["digests"]
    finally:
        instance.close()


def test_a_draft_pointed_at_a_target_server_is_refused_and_loads_from_disk(
    draft_source: Instance, workdir: Path, checkpoint: Path
) -> None:
    (expected,) = draft_source.results()
    target_address = expected["outcome"]["served_at"]
    extra = {"MODEL": MODEL, "SERVE": False, "SOURCE": [{"device_id": 0, "sources": [target_address]}],
             "DRAFT_SOURCE": [{"device_id": 0, "sources": [target_address]}]}  # the draft asks the target's server
    instance = Instance(workdir, "spec-mixup", checkpoint, 1, extra, draft=True)
    try:
        (got,) = instance.results()
        assert "error" not in got, got.get("message")
        assert got["outcome"]["path"] == "network"
        draft = got["draft"]["outcome"]
        assert draft["path"] == "disk"
        assert "IdentityMismatchError" in draft["reason"] and "role" in draft["reason"], draft["reason"]
        assert got["draft"]["digests"] == expected["draft"]["digests"]
    finally:
        instance.close()


CHECK_SCRIPT = """
import json, sys
import vllm.plugins
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import get_model_loader
vllm.plugins.load_general_plugins()
out = []
for extra in json.loads(sys.argv[1]):
    try:
        loader = get_model_loader(LoadConfig(load_format="netloader", model_loader_extra_config=extra))
        out.append({"ok": type(loader).__name__, "sources": loader.config.sources_for(0)})
    except Exception as exc:
        out.append({"error": type(exc).__name__, "value_error": isinstance(exc, ValueError), "message": str(exc)})
print("RESULT " + json.dumps(out))
"""

BAD_CONFIGS: list[tuple[dict[str, Any], list[str]]] = [
    ({"SOURCES": []}, ["unknown key 'SOURCES'", "allowed keys", "SOURCE"]),
    ({"listen_port": 9000}, ["unknown key 'listen_port'", "did you mean 'LISTEN_PORT'"]),
    ({"LISTEN_PORT": 80}, ["LISTEN_PORT", "greater than or equal to 1024", "got 80"]),
    ({"LISTEN_PORT": "9000"}, ["LISTEN_PORT", "valid integer"]),
    ({"SOURCE": [{"device_id": 0, "sources": ["no-port"]}]}, ["SOURCE[0].sources", "'no-port'", "host:port"]),
    ({"SOURCE": [{"device_id": -1, "sources": []}]}, ["SOURCE[0].device_id", "greater than or equal to 0"]),
    ({"SOURCE": [{"device_id": 0, "source": ["a:1"]}]}, ["SOURCE[0].source", "'device_id' and 'sources'"]),
    ({"SOURCE": [{"device_id": 0, "sources": ["a:1"]}, {"device_id": 0, "sources": ["b:1"]}]},
     ["SOURCE", "device_id 0 appears twice"]),
    ({"SERVE": "yes"}, ["SERVE", "valid boolean", "'yes'"]),
    ({"FALLBACK": 1}, ["FALLBACK", "valid boolean"]),
    ({"TIMEOUT": 0}, ["TIMEOUT", "greater than 0"]),
    ({"TOKEN": 12345}, ["TOKEN", "valid string", "<hidden>"]),
    ({"INT8_CACHE": "ssd"}, ["INT8_CACHE", "'hbm', 'dram' or 'no'"]),
    ({"CONFIG_FILE": "/nonexistent/netloader.json"}, ["CONFIG_FILE", "/nonexistent/netloader.json", "cannot be read"]),
]


@pytest.fixture(scope="module")
def config_checks(workdir: Path) -> list[dict[str, Any]]:
    bad_file = workdir / "bad-config.json"
    bad_file.write_text(json.dumps({"BUCKET_MIB": 0}))
    good_file = workdir / "good-config.json"
    good_file.write_text(json.dumps({"SOURCE": [{"device_id": 0, "sources": ["10.0.0.2:7000"]}]}))
    configs = [extra for extra, _ in BAD_CONFIGS]
    configs += [
        {"CONFIG_FILE": str(bad_file), "BUCKET_MIB": 64},  # the file's bad value wins over the inline good one
        {"CONFIG_FILE": str(good_file), "SOURCE": [{"device_id": 0, "sources": ["10.0.0.1:7000"]}]},
        {},
    ]
    proc = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, json.dumps(configs)], env=VENV_ENV,
                          capture_output=True, text=True, timeout=START_TIMEOUT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("index", range(len(BAD_CONFIGS)), ids=[json.dumps(c)[:40] for c, _ in BAD_CONFIGS])
def test_invalid_or_unknown_key_stops_start_up_naming_the_key(config_checks: list[dict[str, Any]], index: int) -> None:
    result = config_checks[index]
    assert result.get("error") == "ConfigError" and result["value_error"], result
    for fragment in BAD_CONFIGS[index][1]:
        assert fragment in result["message"], (fragment, result["message"])
    assert "12345" not in result["message"]  # a token is never echoed


def test_config_file_takes_precedence_over_inline_keys(config_checks: list[dict[str, Any]]) -> None:
    bad_in_file, good_in_file, empty = config_checks[len(BAD_CONFIGS):]
    assert bad_in_file.get("error") == "ConfigError" and "BUCKET_MIB" in bad_in_file["message"]
    assert good_in_file == {"ok": "NetloaderModelLoader", "sources": ["10.0.0.2:7000"]}
    assert empty == {"ok": "NetloaderModelLoader", "sources": []}


def test_importing_netloader_never_imports_vllm() -> None:
    code = "import sys, netloader, netloader.integrations.config; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**ENV, "PYTHONPATH": os.pathsep.join(sys.path)})
