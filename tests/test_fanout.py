"""Fan-out and striping on emulated hosts (network namespaces on one bridge, each host's link rate-limited both
ways): a striped load from several sources, sources killed or cut during it, relays that serve while they load,
a chain of relays, a burst of new instances finding each other through a registry. A relay killed mid-chain, and
every other fault: the fault-injection suite, test_faults.py.

Real processes on real (emulated) links; every load is checked bit for bit. Nothing here asserts a duration;
the times are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import Source
from hostprocs import Relay, start_client, start_relay, start_source
from hostprocs import result as _result
from hostprocs import wait_mark as _mark
from netloader.testing.hosts import Host

KIND = "llama96"  # 96 MiB: ~2 s over one 400 Mbit/s link
RATE = 400
FAST = 1600  # a new instance's own link: not what limits a striped load
HEARTBEAT = 5.0
TIMEOUT = 120.0


def _source(host: Host, tmp_path: Path, kind: str = KIND, **kwargs: Any) -> Source:
    spec = {"model": kind, "seed": 1, "model_id": "fan", "heartbeat_timeout": HEARTBEAT, "timeout": TIMEOUT,
            **kwargs}
    return start_source(host, tmp_path, spec)


def _relay(host: Host, tmp_path: Path, kind: str = KIND, **kwargs: Any) -> Relay:
    spec = {"model": kind, "expect_seed": 1, "model_id": "fan", "heartbeat_timeout": HEARTBEAT, "timeout": TIMEOUT,
            **kwargs}
    return start_relay(host, tmp_path, spec)


def _client(host: Host, sources: list[str], kind: str = KIND, **kwargs: Any) -> subprocess.Popen[str]:
    spec = {"model": kind, "expect_seed": 1, "sources": sources, "model_id": "fan", "timeout": TIMEOUT,
            "heartbeat_timeout": HEARTBEAT, **kwargs}
    return start_client(host, spec)


def test_striped_load_over_three_sources_is_bit_exact_with_bytes_from_each(net, tmp_path):
    hosts = [net.add_host(f"s{i}", rate_mbit=RATE) for i in range(3)]
    new = net.add_host("new", rate_mbit=FAST)
    sources = [_source(h, tmp_path) for h in hosts]
    result = _result(_client(new, [s.address for s in sources], max_sources=3))
    assert result["ok"], result
    by_source = result["by_source"]
    assert set(by_source) == {s.address for s in sources}, by_source
    assert all(b > 0 for b in by_source.values()), by_source
    assert sum(by_source.values()) == result["bytes"]
    print(f"\n[striped x3] {result['seconds']:.2f} s; MiB per source: "
          f"{ {a: round(b / 2**20, 1) for a, b in by_source.items()} }")


def test_striped_load_completes_from_the_others_when_a_source_is_killed_and_another_cut(net, tmp_path):
    hosts = [net.add_host(f"s{i}", rate_mbit=RATE) for i in range(3)]
    new = net.add_host("new", rate_mbit=FAST)
    killed, cut, kept = (_source(h, tmp_path, "llama192") for h in hosts)
    client = _client(new, [killed.address, cut.address, kept.address], "llama192", max_sources=3, mark_at=0.25)
    _mark(client)
    os.kill(killed.pid, signal.SIGKILL)
    net.cut(hosts[1])
    result = _result(client)
    assert result["ok"], result
    assert set(result["failures"]) == {killed.address, cut.address}, result["failures"]
    # given up mid-transfer, or (on a busy machine, where the client had not reached it yet at 25%) unreachable
    cut_error = result["failures"][cut.address]
    assert "stopped answering" in cut_error or cut_error.startswith("ConnectError"), result["failures"]
    assert result["by_source"][kept.address] > 0
    assert sum(result["by_source"].values()) == result["bytes"]
    print(f"\n[striped, one killed, one cut] MiB per source: "
          f"{ {a: round(b / 2**20, 1) for a, b in result['by_source'].items()} }; failures: {result['failures']}")


def test_chain_of_three_relays_is_bit_exact(net, tmp_path):
    origin_host = net.add_host("origin", rate_mbit=RATE)
    origin = _source(origin_host, tmp_path)
    relays: list[Relay] = []
    upstream = origin.address
    for i in range(3):  # each fills from the one before while it is itself still filling
        relay = _relay(net.add_host(f"r{i}", rate_mbit=RATE), tmp_path, sources=[upstream])
        relays.append(relay)
        upstream = relay.address
    results = [r.result() for r in relays]
    for result in results:
        assert result["ok"], result
    assert list(results[0]["by_source"]) == [origin.address]
    for i in (1, 2):
        assert list(results[i]["by_source"]) == [relays[i - 1].address], results[i]
    for relay in relays:
        assert relay.stats()["state"] == "ready"
    last = _result(_client(net.add_host("new", rate_mbit=RATE), [relays[-1].address]))
    assert last["ok"], last
    print(f"\n[chain of 3 relays] fill times {[round(r['seconds'], 2) for r in results]} s "
          f"(one link: about {96 * 2**20 * 8 / RATE / 1e6:.1f} s)")


def test_burst_of_four_new_instances_through_a_registry_form_a_chain(net, tmp_path):
    registry = f"file://{tmp_path / 'registry'}"
    fast = {"registry_heartbeat": 0.3, "registry_ttl": 5.0}
    origin = _source(net.add_host("origin", rate_mbit=RATE), tmp_path, "llama192", registry=registry, **fast)
    relays = [_relay(net.add_host(f"n{i}", rate_mbit=RATE), tmp_path, "llama192", registry=registry, server=fast,
                     wait_go=True) for i in range(4)]
    for relay in relays:  # a burst: one starts every 0.7 s, all while the first is still loading (~8 s here)
        relay.go()
        time.sleep(0.7)
    results = [r.result() for r in relays]
    addresses = {r.address for r in relays}
    served = [_served(r) for r in relays]
    for relay, result, n in zip(relays, results, served, strict=True):
        assert result["ok"], result
        from_relay = any(a in addresses for a in result["by_source"])
        assert from_relay or n > 0, (relay.address, result, n)  # each served a new instance or received from one
    assert sum(1 for result in results if origin.address in result["by_source"]) < len(relays)
    print(f"\n[burst of 4, registry] sources: {[list(r['by_source']) for r in results]}; served: {served}; "
          f"fill times {[round(r['seconds'], 2) for r in results]} s")


def _served(relay: Relay, timeout: float = 15.0) -> int:
    """Transfers the relay served (a downstream's ``done`` is logged a moment after its load returns)."""
    deadline = time.monotonic() + timeout
    while True:
        served = relay.stats()["served"]
        if served or time.monotonic() > deadline:
            return served
        time.sleep(0.2)
