"""The vLLM plugin with a registry and no SOURCE, on the real vLLM (CPU platform), TP=2, one process per rank.

Generation 0 gets the registry from ``$NETLOADER_REGISTRY``, finds nothing for its identity, loads from disk and
publishes each rank's server; generation 1 has ``REGISTRY`` in its config, no SOURCE and no weight file, and each
rank finds and loads its own shard, bit for bit. Helpers and fixtures come from tests/test_vllm.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netloader.registry import open_registry
from test_vllm import (  # noqa: F401 - fixtures
    CHECK_SCRIPT,
    MODEL,
    START_TIMEOUT,
    VENV_ENV,
    Instance,
    _digests,
    checkpoint,
    no_weights,
    workdir,
)


@pytest.fixture(scope="module")
def registry_url(workdir: Path) -> str:  # noqa: F811
    directory = workdir / "registry"
    directory.mkdir()
    return f"file://{directory}"


@pytest.fixture(scope="module")
def gen0(workdir: Path, checkpoint: Path, registry_url: str) -> Iterator[Instance]:  # noqa: F811
    """TP=2 from disk; the registry only through the environment."""
    VENV_ENV["NETLOADER_REGISTRY"] = registry_url  # read when the processes start
    try:
        instance = Instance(workdir, "reg-gen0", checkpoint, 2, {"MODEL": MODEL, "OUTPUT_PREFIX": str(workdir / "r0-")})
    finally:
        del VENV_ENV["NETLOADER_REGISTRY"]
    yield instance
    instance.close()


def test_first_instance_finds_nothing_loads_from_disk_and_publishes_every_rank(
    gen0: Instance, registry_url: str, workdir: Path  # noqa: F811
) -> None:
    results = gen0.results()
    for rank, result in enumerate(results):
        outcome = result["outcome"]
        assert outcome["path"] == "disk"
        assert (workdir / f"r0-{rank}.txt").read_text().strip() == outcome["served_at"]  # OUTPUT_PREFIX still works
        assert f"no SOURCE entry for rank {rank}; registry {registry_url} has no live source" in outcome["reason"]
    with open_registry(registry_url) as registry:
        live = {(e.record.rank, e.record.address): e.record for e in registry.listing(MODEL)}
    assert set(live) == {(rank, results[rank]["outcome"]["served_at"]) for rank in range(2)}
    for record in live.values():
        assert record.layout["tp"] == 2 and record.layout["role"] == "target" and record.auth
        assert record.state == "ready" and record.tensors > 0


def test_instance_with_only_a_registry_loads_every_rank_bit_exact(
    gen0: Instance, workdir: Path, no_weights: Path, registry_url: str  # noqa: F811
) -> None:
    expected = _digests(gen0)
    extra = {"MODEL": MODEL, "REGISTRY": registry_url, "FALLBACK": False, "SERVE": True}
    gen1 = Instance(workdir, "reg-gen1", no_weights, 2, extra)
    try:
        got = _digests(gen1)
        for rank in range(2):
            outcome = gen1.results()[rank]["outcome"]
            assert outcome["path"] == "network", outcome
            assert outcome["source"] == gen0.results()[rank]["outcome"]["served_at"]  # its own rank's server
            assert got[rank] == expected[rank]
            assert gen1.results()[rank]["attributes"] == gen0.results()[rank]["attributes"]
        # generation 1 serves in turn: the registry now offers two sources per rank
        with open_registry(registry_url) as registry:
            ranks = sorted(e.record.rank for e in registry.listing(MODEL))
        assert ranks == [0, 0, 1, 1]
    finally:
        gen1.close()
    with open_registry(registry_url) as registry:  # closed instances leave the registry at once
        assert sorted(e.record.rank for e in registry.listing(MODEL)) == [0, 1]


def test_a_tp1_instance_is_never_offered_a_tp2_shard(
    gen0: Instance, workdir: Path, checkpoint: Path, registry_url: str  # noqa: F811
) -> None:
    gen0.results()
    extra = {"MODEL": MODEL, "REGISTRY": registry_url, "SERVE": False}
    instance = Instance(workdir, "reg-tp1", checkpoint, 1, extra)
    try:
        (result,) = instance.results()
        outcome = result["outcome"]
        assert outcome["path"] == "disk"
        assert "has no live source of 'tiny-llama' rank 0" in outcome["reason"]
        assert "it has 2 live source(s) of 'tiny-llama' with another rank or layout" in outcome["reason"]
    finally:
        instance.close()


def test_a_bad_registry_url_stops_start_up_naming_the_key_and_hiding_the_password() -> None:
    configs: list[dict[str, Any]] = [{"REGISTRY": "http://x/y"}, {"REGISTRY": "rediss://:hunter2@h:notaport/0"}]
    proc = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, json.dumps(configs)], env=VENV_ENV,
                          capture_output=True, text=True, timeout=START_TIMEOUT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    scheme, port = json.loads(line.removeprefix("RESULT "))
    assert scheme["error"] == "ConfigError" and "REGISTRY" in scheme["message"] and "'http'" in scheme["message"]
    assert port["error"] == "ConfigError" and "REGISTRY" in port["message"]
    assert "hunter2" not in port["message"]
