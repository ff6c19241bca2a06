"""The command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ENV


def _netloader(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netloader", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, check=False)


def test_probe_prints_what_a_source_serves(source):
    src = source("mixed", seed=1, rank=1, layout={"tp": 2}, token="t0k")
    out = _netloader("probe", src.address, "--token", "t0k")
    assert out.returncode == 0, out.stderr
    assert "test-model" in out.stdout and "rank       1" in out.stdout and "tp=2" in out.stdout
    raw = _netloader("probe", src.address, "--token", "t0k", "--json")
    assert json.loads(raw.stdout)["model_id"] == "test-model"


def test_probe_errors_are_one_clear_line(source):
    src = source("mixed", seed=1, token="t0k")
    out = _netloader("probe", src.address, "--token", "wrong")
    assert out.returncode == 2 and "AuthenticationError" in out.stderr and "Traceback" not in out.stderr
    out = _netloader("probe", "127.0.0.1:1", "--timeout", "2")
    assert out.returncode == 2 and "ConnectError" in out.stderr


def test_demo_runs_end_to_end_on_a_small_model(tmp_path):
    out = _netloader("demo", "--gib", "0.1", "--workdir", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bit-exact" in out.stdout and "GB/s" in out.stdout
