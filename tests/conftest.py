from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"process {proc.pid} printed nothing within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process {proc.pid} exited with {proc.wait()} before answering")
    return line


@dataclass
class Source:
    proc: subprocess.Popen[str]
    address: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict[str, int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(_readline(self.proc, 30))

    def idle_stats(self, timeout: float = 15.0) -> dict[str, int]:
        """Stats once no transfer or connection is open. A client's ``load_weights`` returns as soon as it has
        sent ``done``; its source reads that, logs and closes the transfer a moment later."""
        deadline = time.monotonic() + timeout
        last: dict[str, int] = {}
        while True:
            now = self.stats()  # idle, and unchanged since the last look (threads finish after deregistering)
            if ((now["active"], now["connections"]) == (0, 0) and now == last) or time.monotonic() > deadline:
                return now
            last = now
            time.sleep(0.2)

    def settled_stats(self, baseline: dict[str, int], timeout: float = 15.0) -> dict[str, int]:
        """Stats once threads, fds and connections are back to ``baseline`` (or the last ones seen)."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.stats()
            settled = all(now[k] <= baseline[k] for k in ("threads", "fds", "connections", "active"))
            if settled or time.monotonic() > deadline:
                return now
            time.sleep(0.2)

    def flip(self, name: str) -> None:
        """Flip a bit of tensor ``name`` in the running source, in place."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"flip {name}\n")
        self.proc.stdin.flush()
        assert json.loads(_readline(self.proc, 30)) == {"flipped": name}

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(15)
            except (subprocess.TimeoutExpired, OSError):
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Callable[..., Source]]:
    """Start real source processes: ``source(model="mixed", seed=1, model_id=..., **WeightServer kwargs)``."""
    started: list[Source] = []

    def start(model: str = "mixed", seed: int = 1, model_id: str = "test-model", **kwargs: Any) -> Source:
        spec = {"model": model, "seed": seed, "model_id": model_id, **kwargs}
        log = tmp_path / f"source-{len(started)}.log"
        with log.open("w") as err:
            proc = subprocess.Popen([sys.executable, str(HERE / "source_proc.py"), json.dumps(spec)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
        src = Source(proc, "", log)
        started.append(src)
        try:
            src.address = json.loads(_readline(proc, 120))["address"]
        except Exception:
            raise RuntimeError(f"source failed to start:\n{log.read_text()}") from None
        return src

    yield start
    for src in started:
        src.stop()


def spawn_client(spec: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HERE / "client_proc.py"), json.dumps(spec)],
                            stdout=subprocess.PIPE, text=True, env=ENV)


def client_result(proc: subprocess.Popen[str], timeout: float = 180) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def net() -> Iterator[Any]:
    """A switch of emulated hosts (:mod:`netloader.testing.hosts`), torn down after the test. Where namespaces
    cannot be made (not root, no iproute2) the test fails with the reason: it is not skipped."""
    from netloader.testing.hosts import Network

    with Network() as network:
        yield network


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault-injection suite's table (tests/faultlog.py), when fault tests ran."""
    import faultlog

    table = faultlog.lines()
    if table:
        terminalreporter.section("fault injection: every run ends bit-exact or with a clean NetloaderError")
        for line in table:
            terminalreporter.write_line(line)
