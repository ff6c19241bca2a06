"""Source, relay and client processes on emulated hosts (:mod:`netloader.testing.hosts`), shared by the tests
that run on them (test_faults.py, test_fanout.py): each starts tests/source_proc.py, relay_proc.py or
client_proc.py inside a host's namespace with a JSON spec and reads what it prints."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import ENV, HERE, Source, _readline
from netloader.testing.hosts import Host


class Relay(Source):
    """A relay process (tests/relay_proc.py): prints its address, then its fill's result, then serves."""

    def result(self, timeout: float = 240) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = json.loads(_readline(self.proc, max(1.0, deadline - time.monotonic())))
            if "mark" not in line:
                return line

    def go(self, sources: list[str] | None = None) -> None:
        """Start the fill of a relay started with ``wait_go`` (from ``sources``, if given)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n" if sources is None else json.dumps(sources) + "\n")
        self.proc.stdin.flush()


def _spawn(script: str, host: Host, log: Path, spec: dict[str, Any]) -> subprocess.Popen[str]:
    with log.open("w") as err:
        return host.popen([sys.executable, str(HERE / script), json.dumps(spec)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)


def ready(*servers: Source) -> None:
    """Wait for each started server to print its address (they start side by side: a process's start, mostly
    importing torch, takes seconds on a busy machine)."""
    for server in servers:
        if not server.address:
            try:
                server.address = json.loads(_readline(server.proc, 120))["address"]
            except Exception:
                raise RuntimeError(f"{server.log.name} failed to start:\n{server.log.read_text()}") from None


def start_source(host: Host, tmp_path: Path, spec: dict[str, Any], *, wait: bool = True) -> Source:
    """A source process on ``host`` listening on its address (or ``spec["host"]``); ``spec`` as source_proc.py.
    ``wait=False``: return at once, :func:`ready` waits for it."""
    log = tmp_path / f"source-{host.name}.log"
    src = Source(_spawn("source_proc.py", host, log, {"host": host.address, **spec}), "", log)
    if wait:
        ready(src)
    return src


def start_relay(host: Host, tmp_path: Path, spec: dict[str, Any], *, wait: bool = True) -> Relay:
    """A relay process (``spec`` as relay_proc.py) on ``host``; ``wait`` as :func:`start_source`."""
    log = tmp_path / f"relay-{host.name}.log"
    relay = Relay(_spawn("relay_proc.py", host, log, {"host": host.address, **spec}), "", log)
    if wait:
        ready(relay)
    return relay


def start_client(host: Host, spec: dict[str, Any]) -> subprocess.Popen[str]:
    return host.popen([sys.executable, str(HERE / "client_proc.py"), json.dumps(spec)], stdout=subprocess.PIPE,
                      text=True, env=ENV)


def result(client: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any]:
    """The client's last JSON line (its result)."""
    out, _ = client.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def wait_mark(proc: subprocess.Popen[str], timeout: float = 180) -> dict[str, Any]:
    line = json.loads(_readline(proc, timeout))
    assert "mark" in line, line
    return line
