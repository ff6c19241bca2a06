"""Partitioned, stopped and silent peers on emulated hosts (network namespaces, 400 Mbit/s links).

Each test builds its own switch and hosts (:mod:`netloader.testing.hosts`); a machine where that is impossible
(not root, no iproute2) fails these tests with the reason, it does not skip them. A link is cut at the source's
switch port, so neither end's kernel sees anything: no FIN, no RST, just silence, as with a pulled cable.
The measured figures are printed (``pytest -s``): time to give up, bytes kept and refetched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import ENV, HERE, Source, _readline
from netloader.testing.hosts import Host, Network

KIND = "llama256"  # 256 MiB: ~5.5 s over a 400 Mbit/s link
RATE = 400
HEARTBEAT = 5.0
#: the data timeout, far above the heartbeat timeout: giving up well before it shows the heartbeat did it
TIMEOUT = 300.0


@pytest.fixture
def net() -> Iterator[Network]:
    with Network() as network:
        yield network


def _start_source(host: Host, tmp_path: Any, seed: int = 1, **kwargs: Any) -> Source:
    spec = {"model": KIND, "seed": seed, "model_id": "test-model", "host": host.address,
            "heartbeat_timeout": HEARTBEAT, "timeout": TIMEOUT, **kwargs}
    log = tmp_path / f"source-{host.name}.log"
    with log.open("w") as err:
        proc = host.popen([sys.executable, str(HERE / "source_proc.py"), json.dumps(spec)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
    src = Source(proc, "", log)
    try:
        src.address = json.loads(_readline(proc, 120))["address"]
    except Exception:
        raise RuntimeError(f"source failed to start:\n{log.read_text()}") from None
    return src


def _start_client(host: Host, sources: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    spec = {"model": KIND, "expect_seed": 1, "sources": sources, "model_id": "test-model", "timeout": TIMEOUT,
            "heartbeat_timeout": HEARTBEAT, "mark_at": 0.5, **kwargs}
    return host.popen([sys.executable, str(HERE / "client_proc.py"), json.dumps(spec)], stdout=subprocess.PIPE,
                      text=True, env=ENV)


def _wait_mark(client: subprocess.Popen[str]) -> None:
    line = json.loads(_readline(client, 180))
    assert "mark" in line, line


def _result(client: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = client.communicate(timeout=240)
    return json.loads(out.strip().splitlines()[-1])


def _wait_idle(src: Source, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        stats = src.stats()
        if stats["active"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def _report(title: str, result: dict[str, Any], first: str, gave_up_after: float) -> None:
    print(f"\n[{title}] gave up on the first source after {gave_up_after:.2f} s (heartbeat_timeout {HEARTBEAT:g} s, "
          f"timeout {TIMEOUT:g} s); kept {result['resumed_bytes'] / 2**20:.1f} MiB, refetched "
          f"{result['refetched_bytes'] / 2**20:.1f} MiB, fetched {result['bytes'] / 2**20:.1f} MiB from the next; "
          f"error: {result['failures'][first]}")


def test_partitioned_source_is_given_up_within_the_heartbeat_timeout_and_the_load_resumes(net, tmp_path):
    a, b, c = net.add_host("a", rate_mbit=RATE), net.add_host("b", rate_mbit=RATE), net.add_host("c")
    first, second = _start_source(a, tmp_path), _start_source(b, tmp_path)
    client = _start_client(c, [first.address, second.address])
    _wait_mark(client)
    net.cut(a)
    cut_at = time.time()
    result = _result(client)
    assert result["ok"], result
    assert result["source"] == second.address
    error = result["failures"][first.address]
    assert "stopped answering" in error and "partitioned" in error, error
    gave_up_after = result["failed_at"][first.address] - cut_at
    assert gave_up_after < TIMEOUT / 5, gave_up_after  # the heartbeat, not the data timeout
    total = result["bytes"] + result["resumed_bytes"]
    assert result["resumed_bytes"] >= 0.4 * total  # what arrived before the cut was kept
    _report("partition", result, first.address, gave_up_after)
    # the partitioned source dropped its silent client by itself and freed the slot (the link is still cut)
    assert _wait_idle(first)["active"] == 0
    assert "stopped answering" in first.log_text()


def test_stopped_source_is_given_up_within_the_heartbeat_timeout_and_the_load_resumes(net, tmp_path):
    a, b, c = net.add_host("a", rate_mbit=RATE), net.add_host("b", rate_mbit=RATE), net.add_host("c")
    first, second = _start_source(a, tmp_path), _start_source(b, tmp_path)
    client = _start_client(c, [first.address, second.address])
    _wait_mark(client)
    os.kill(first.pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        result = _result(client)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert result["ok"], result
    assert result["source"] == second.address
    error = result["failures"][first.address]
    assert "stopped answering" in error and "process is stopped" in error, error
    gave_up_after = result["failed_at"][first.address] - stopped_at
    assert gave_up_after < TIMEOUT / 5, gave_up_after
    assert result["resumed_bytes"] >= 0.4 * (result["bytes"] + result["resumed_bytes"])
    _report("SIGSTOP", result, first.address, gave_up_after)
    assert _wait_idle(first)["active"] == 0  # resumed, it sees the client gone and frees the slot


def test_source_drops_a_stopped_client_and_frees_its_slot(net, tmp_path):
    a, c = net.add_host("a", rate_mbit=RATE), net.add_host("c")
    src = _start_source(a, tmp_path, max_concurrent=1)
    client = _start_client(c, [src.address], mark_at=0.3)
    _wait_mark(client)
    os.kill(client.pid, signal.SIGSTOP)
    try:
        assert src.stats()["active"] == 1
        stats = _wait_idle(src)  # the client is still stopped: only its silence can free the slot
        assert stats["active"] == 0, stats
        assert "client stopped answering" in src.log_text()
    finally:
        os.kill(client.pid, signal.SIGCONT)
        client.kill()
        client.wait()
