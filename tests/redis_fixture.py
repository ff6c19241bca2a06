"""A real ``redis-server`` for the registry tests: started on a free port of 127.0.0.1 with no persistence, killed at
the end. ``make setup`` installs Debian's redis-server where it is missing; a machine without it fails the tests
that need it (with that hint), it does not skip them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; :meth:`stop` and :meth:`start` again keep its port (a registry that goes down
    and comes back). Given ``host`` (an emulated host, :mod:`netloader.testing.hosts`), it runs in that host's
    namespace, on its address, for processes of the other hosts (only they can reach it), with a password (it is
    reachable from other hosts: nothing listens there without authentication)."""

    def __init__(self, workdir: Path, host: Any = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make setup` (it installs Debian's redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.host = host
        self.bind = "127.0.0.1" if host is None else host.address
        self.password = None if host is None else secrets.token_hex(16)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = "" if self.password is None else f":{self.password}@"
        return f"redis://{auth}{self.bind}:{self.port}/0"

    def start(self) -> None:
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115 - the process owns it
        popen = subprocess.Popen if self.host is None else self.host.popen
        self.proc = popen(
            [self.binary, "--port", str(self.port), "--bind", self.bind, "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes", "--enable-debug-command", "local",
             *(() if self.password is None else ("--requirepass", self.password))],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        if self.host is not None:
            self._wait_in_host()
            return
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log_path = self.workdir / f"redis-{self.port}.log"
                    raise RuntimeError(f"redis-server did not start, see {log_path}") from None
                time.sleep(0.05)
        client.close()

    def _wait_in_host(self) -> None:
        ping = f"import redis; redis.Redis.from_url({self.url!r}, socket_timeout=1).ping()"
        deadline = time.monotonic() + 30
        while True:
            done = subprocess.run(["ip", "netns", "exec", self.host.ns, sys.executable, "-c", ping],
                                  capture_output=True, timeout=30, check=False)
            if done.returncode == 0:
                return
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start in {self.host.name}: {done.stderr[-500:]!r}")
            time.sleep(0.1)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
