"""The vLLM plugin relays while it loads, on the real vLLM (CPU platform), TP=2, one process per rank.

An origin instance loads from disk and serves through a registry, its serving capped (``MAX_RATE_GBPS``) and one
transfer at a time (``MAX_CONCURRENT=1``), so that a new instance's load from it is slow and keeps it busy. Two new
instances with only the registry (no SOURCE, no weight file) start together (their vLLM imported while the origin
loads); the first is told to load, and once each of its ranks' records says ``filling`` (and the origin's say
busy) the second is told too. The burst policy sends the second's ranks to the first's, which serve while they
fill: both end bit-exact, the second names the first's addresses as its only sources with bytes > 0, and the
first's records turn ``ready``. Determinism comes from the order of events, not from sleeps: the second looks up
only after the first registered and the origin's records show it busy, and the first's fill (about 20 s at the
cap) outlasts the second's few seconds to reach its lookup.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from netloader import WeightServer, load_weights
from netloader.errors import ManifestMismatchError, NoSourceError
from netloader.integrations.common import close_servers, keep_relay, receive, serve
from netloader.integrations.config import NetloaderConfig, parse_config
from netloader.registry import open_registry
from test_vllm import START_TIMEOUT, VENV_ENV, Instance, _free_port, workdir  # noqa: F401 - fixture
from vllm_worker import WAITING

MODEL = "relay-llama"
WORLD = 2
#: serving cap of the origin: each rank's ~6 MB shard takes about 20 s past the limiter's first 1 MiB
ORIGIN_RATE_GBPS = 0.00025

Results = list[dict[str, Any]]  # one per rank, as vllm_worker.py writes them


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:  # noqa: F811
    """A small Llama (~12 MB in bf16: large enough that the origin's rate cap paces it), random weights."""
    path = workdir / "relay-checkpoint"
    script = (
        "import sys, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "torch.manual_seed(1)\n"
        "cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,\n"
        "                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)\n"
        "LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=VENV_ENV, capture_output=True)
    return path


@pytest.fixture(scope="module")
def no_weights(workdir: Path, checkpoint: Path) -> Path:  # noqa: F811
    path = workdir / "relay-no-weights"
    path.mkdir()
    for name in ("config.json", "generation_config.json"):
        (path / name).write_bytes((checkpoint / name).read_bytes())
    return path


def _wait_for(what: str, ready: Any, instances: list[Instance], timeout: float = START_TIMEOUT) -> Any:
    """Poll ``ready()`` until it returns something truthy; fail at once if a worker died."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready()
        if value:
            return value
        for instance in instances:
            for rank, proc in enumerate(instance.procs):
                if proc.poll() is not None:
                    pytest.fail(f"{instance.name} rank {rank} exited with {proc.returncode} while waiting for "
                                f"{what}:\n{instance.log_tail(rank)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _load(instance: Instance, model_dir: Path, extra: dict[str, Any]) -> None:
    """Tell a waiting instance's ranks to load (its results go to ``instance.results_paths``)."""
    for rank, proc in enumerate(instance.procs):
        assert proc.stdin is not None
        line = {"model": str(model_dir), "extra": extra, "result": str(instance.results_paths[rank])}
        proc.stdin.write(json.dumps(line) + "\n")
        proc.stdin.flush()


def _records(registry_url: str) -> dict[str, Any]:
    with open_registry(registry_url) as registry:
        return {e.record.address: e.record for e in registry.listing(MODEL)}


@dataclass
class Burst:
    origin: Results
    first: Results
    second: Results
    #: the first instance's records as the second was told to load (address -> record)
    first_filling: dict[str, Any]
    #: the registry's records once both finished
    after: dict[str, Any]
    seconds: float  # from telling the first to load until both finished


@pytest.fixture(scope="module")
def burst(workdir: Path, checkpoint: Path, no_weights: Path) -> Iterator[Burst]:  # noqa: F811
    directory = workdir / "relay-registry"
    directory.mkdir()
    url = f"file://{directory}"
    origin_extra = {"MODEL": MODEL, "REGISTRY": url, "MAX_RATE_GBPS": ORIGIN_RATE_GBPS, "MAX_CONCURRENT": 1}
    new_extra = {"MODEL": MODEL, "REGISTRY": url, "FALLBACK": False}  # RELAY and SERVE by default
    origin = Instance(workdir, "relay-origin", checkpoint, WORLD, origin_extra)
    # started at once, they import vLLM while the origin loads, then wait for their line
    first = Instance(workdir, "relay-first", Path("-"), WORLD, {})
    second = Instance(workdir, "relay-second", Path("-"), WORLD, {})
    try:
        origin_results = origin.results()
        served = {r["outcome"]["served_at"] for r in origin_results}
        for instance in (first, second):
            _wait_for(f"{instance.name} to start", lambda i=instance: all(
                WAITING in i.log_text(rank) for rank in range(WORLD)), [origin, first, second])
        started = time.monotonic()
        _load(first, no_weights, new_extra)

        def first_filling() -> dict[str, Any]:
            """The first's records once both say filling and the origin's say busy (refreshed every 2 s)."""
            records = _records(url)
            relays = {a: r for a, r in records.items() if a not in served and r.state == "filling"}
            busy = all(records[a].active_transfers == 1 for a in served if a in records)
            return relays if len(relays) == WORLD and busy else {}

        filling = _wait_for("the first instance's ranks to fill from the origin", first_filling, [first])
        _load(second, no_weights, new_extra)
        first_results, second_results = first.results(), second.results()
        seconds = time.monotonic() - started
        yield Burst(origin_results, first_results, second_results, filling, _records(url), seconds)
    finally:
        for instance in (second, first, origin):
            instance.close()


def _check(results: Results, name: str) -> None:
    for rank, result in enumerate(results):
        assert "error" not in result, f"{name} rank {rank}: {result.get('error')}: {result.get('message')}"


def test_two_new_instances_with_only_a_registry_load_bit_exact_the_second_relaying_from_the_first(
    burst: Burst,
) -> None:
    _check(burst.origin, "origin")
    _check(burst.first, "first")
    _check(burst.second, "second")
    print(f"two TP={WORLD} relayed loads: {burst.seconds:.1f} s from the first's start until both were loaded; "
          f"load_model: first {max(r['load_seconds'] for r in burst.first):.1f} s, second "
          f"{max(r['load_seconds'] for r in burst.second):.1f} s")
    origin_address = [r["outcome"]["served_at"] for r in burst.origin]
    first_address = [r["outcome"]["served_at"] for r in burst.first]
    for rank in range(WORLD):
        assert burst.origin[rank]["outcome"]["path"] == "disk"
        for results in (burst.first, burst.second):
            outcome = results[rank]["outcome"]
            assert outcome["path"] == "network" and outcome["relayed"], outcome
            assert results[rank]["digests"] == burst.origin[rank]["digests"]  # every parameter and buffer
            assert results[rank]["attributes"] == burst.origin[rank]["attributes"]  # and attribute tensors
        # the first loaded from the origin; the second from the first, which was still filling when it looked
        assert burst.first[rank]["outcome"]["sources"] == {origin_address[rank]: burst.first[rank]["outcome"]["bytes"]}
        second = burst.second[rank]["outcome"]
        assert second["sources"].get(first_address[rank], 0) > 0, second
        assert origin_address[rank] not in second["sources"], second
        # straight to the first: the burst policy ranks an idle relay before a source whose slots are all in use
        # (MAX_CONCURRENT=1 would also have turned it away from the origin, with a "busy" the log would show)
        assert second["failed"] == [], second
        # what the registry offered while the first filled, and after
        assert first_address[rank] in burst.first_filling
        assert burst.first_filling[first_address[rank]].rank == rank
        assert burst.after[first_address[rank]].state == "ready"
        assert burst.after[second["served_at"]].state == "ready"
    # TP=2 really shards: the two ranks hold different halves of the vocabulary embedding
    embed = next(name for name in burst.origin[0]["digests"] if "embed" in name)
    assert burst.origin[0]["digests"][embed] != burst.origin[1]["digests"][embed]


# -- the common relay path, without an engine: real servers and transfers in this process ---------------------------
IDENTITY: dict[str, Any] = {"model_id": "relay-unit", "rank": 0, "layout": {"tp": 1, "role": "target"}}


def _weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(256, 1024, generator=generator) for i in range(4)}  # 4 MiB


def _empty_like(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(t) for name, t in weights.items()}


def _config(tmp_path: Path, **keys: Any) -> NetloaderConfig:
    return parse_config({"MODEL": "relay-unit", "TOKEN": "relay-unit-token", "LISTEN_HOST": "127.0.0.1",
                         "REGISTRY": f"file://{tmp_path / 'registry'}", "TIMEOUT": 20, **keys})


@pytest.fixture
def origin() -> Iterator[tuple[WeightServer, dict[str, torch.Tensor]]]:
    weights = _weights(0)
    server = WeightServer(weights, host="127.0.0.1", token="relay-unit-token", **IDENTITY).start()
    yield server, weights
    server.close()


@pytest.fixture(autouse=True)
def _no_servers_left() -> Iterator[None]:
    yield
    close_servers()


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_relay_is_kept_as_the_rank_s_only_server_with_its_output_file(
    tmp_path: Path, origin: tuple[WeightServer, dict[str, torch.Tensor]]
) -> None:
    server, weights = origin
    config = _config(tmp_path, OUTPUT_PREFIX=str(tmp_path / "rank"))
    target = _empty_like(weights)
    report, relay = receive(target, [server.address], config, IDENTITY, rank=0, draft=False, host="127.0.0.1",
                            relay=True)
    assert relay is not None and relay.state == "ready" and relay.progress == 1.0
    assert report.sources == {server.address: sum(t.nbytes for t in weights.values())}
    assert _equal(target, weights)
    address = keep_relay(relay, target, config, IDENTITY, rank=0, draft=False, host="127.0.0.1", engine="unit")
    assert address == relay.address
    assert (tmp_path / "rank0.txt").read_text() == address + "\n"
    with open_registry(config.REGISTRY) as registry:  # type: ignore[arg-type]
        records = {e.record.address: e.record.state for e in registry.listing("relay-unit")}
    assert records == {address: "ready"}  # the origin here has no registry
    # what it serves is what it received, to any client
    again = _empty_like(weights)
    assert load_weights(again, [address], token="relay-unit-token", **IDENTITY).source == address
    assert _equal(again, weights)


def test_a_tensor_the_engine_rebuilt_with_other_bytes_gets_a_fresh_server(
    tmp_path: Path, origin: tuple[WeightServer, dict[str, torch.Tensor]]
) -> None:
    server, weights = origin
    config = _config(tmp_path)
    target = _empty_like(weights)
    _, relay = receive(target, [server.address], config, IDENTITY, rank=0, draft=False, host="127.0.0.1", relay=True)
    assert relay is not None
    same = {**target, "layer0.weight": target["layer0.weight"].clone()}  # new memory, same bytes: the relay stays
    assert keep_relay(relay, same, config, IDENTITY, rank=0, draft=False, host="127.0.0.1", engine="unit") == \
        relay.address
    other = {**target, "layer1.weight": target["layer1.weight"] + 1}  # other bytes: served anew
    address = keep_relay(relay, other, config, IDENTITY, rank=0, draft=False, host="127.0.0.1", engine="unit")
    assert address is not None and address != relay.address
    got = _empty_like(weights)
    load_weights(got, [address], token="relay-unit-token", **IDENTITY)
    assert _equal(got, other)


def test_a_relay_that_cannot_start_does_not_stop_the_load(
    tmp_path: Path, origin: tuple[WeightServer, dict[str, torch.Tensor]]
) -> None:
    server, weights = origin
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = _config(tmp_path, LISTEN_PORT=taken.getsockname()[1])
        target = _empty_like(weights)
        report, relay = receive(target, [server.address], config, IDENTITY, rank=0, draft=False, host="127.0.0.1",
                                relay=True)
    assert relay is None and report.source == server.address
    assert _equal(target, weights)


def test_a_rank_never_loads_from_its_own_server(
    tmp_path: Path, origin: tuple[WeightServer, dict[str, torch.Tensor]]
) -> None:
    """A SOURCE list shared by every instance names this one too, under any name of this host."""
    server, weights = origin
    port = _free_port()
    config = _config(tmp_path, LISTEN_PORT=port, LISTEN_HOST="0.0.0.0")
    target = _empty_like(weights)
    own = [f"127.0.0.1:{port}", f"localhost:{port}", f"{socket.gethostbyname(socket.gethostname())}:{port}"]
    report, relay = receive(target, [*own, server.address], config, IDENTITY, rank=0, draft=False, host="127.0.0.1",
                            relay=True)
    assert relay is not None and relay.port == port
    assert report.source == server.address and report.failures == {}  # its own addresses were not even tried
    relay.close()
    with pytest.raises(NoSourceError, match="no source to fill from"):  # at once, not after a timeout
        receive(_empty_like(weights), own, config, IDENTITY, rank=0, draft=False, host="127.0.0.1", relay=True)
    assert _port_is_free(port)  # and the relay closed


def test_a_failed_fill_closes_the_relay_and_leaves_no_record(tmp_path: Path) -> None:
    """A source whose tensors differ (another model under the same name): the fill fails, the relay is closed, its
    record gone, and the rank can serve what it loads from disk instead on the same port."""
    other = {name: t[:128] for name, t in _weights(1).items()}
    server = WeightServer(other, host="127.0.0.1", token="relay-unit-token", **IDENTITY).start()
    try:
        port = _free_port()
        config = _config(tmp_path, LISTEN_PORT=port)
        target = _empty_like(_weights(0))
        with pytest.raises(NoSourceError) as failed:
            receive(target, [server.address], config, IDENTITY, rank=0, draft=False, host="127.0.0.1", relay=True)
        assert isinstance(failed.value.failures[server.address], ManifestMismatchError)
        assert _port_is_free(port)
        with open_registry(config.REGISTRY) as registry:  # type: ignore[arg-type]
            assert [e.record.address for e in registry.listing("relay-unit")] == []
        disk = _weights(0)  # what a disk load would give
        address = serve(disk, config, IDENTITY, rank=0, draft=False, host="127.0.0.1", engine="unit")
        assert address == f"127.0.0.1:{port}"
    finally:
        server.close()
