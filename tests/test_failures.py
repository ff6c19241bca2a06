"""Stalled, unreachable and silent peers on loopback: noticed within the timeout, reported per source.

Sources SIGKILLed or SIGSTOPped, clients killed, partitions and the rest of the faults a fleet sees are in the
fault-injection suite (test_faults.py), on emulated hosts.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable

import pytest

import netloader
from models import build, named
from netloader.synthetic import bytes_equal

#: 348 MiB ("llama<N>" is at least that) in 1 MiB messages: long enough to be interrupted part-way, deterministically
#: (on_progress)
KIND, PLAN = "llama256", {"chunk_size": 1 << 20, "bucket_size": 1 << 20}


class Once:
    """An ``on_progress`` callback that runs ``action`` once, when ``fraction`` of the bytes have arrived."""

    def __init__(self, fraction: float, action: Callable[[], None]) -> None:
        self.fraction, self.action = fraction, action
        self.at: float | None = None  # time.monotonic() when it ran

    def __call__(self, done: int, total: int) -> None:
        if self.at is None and done >= self.fraction * total:
            self.action()
            self.at = time.monotonic()


def test_stalled_source_is_abandoned_within_the_timeout(source):
    src = source(KIND, seed=1, **PLAN)
    model = build(KIND, None)
    freeze = Once(0.3, lambda: os.kill(src.pid, signal.SIGSTOP))  # alive but silent: no connection drops

    try:
        with pytest.raises(netloader.NoSourceError) as info:
            netloader.load_weights(model, [src.address], model_id="test-model", timeout=3, on_progress=freeze)
        assert freeze.at is not None
        waited = time.monotonic() - freeze.at
    finally:
        os.kill(src.pid, signal.SIGCONT)
    assert isinstance(info.value.failures[src.address], netloader.TransferError)
    assert 2 < waited < 3 + 5


def test_unreachable_and_silent_sources_are_skipped(source):
    good = source("mixed", seed=4)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_address = f"127.0.0.1:{dead.getsockname()[1]}"  # bound, not listening: connection refused
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never says hello
    silent_address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        model = build("mixed", None)
        start = time.monotonic()
        report = netloader.load_weights(model, [dead_address, silent_address, good.address], model_id="test-model",
                                        timeout=2)
        assert time.monotonic() - start < 10
    finally:
        dead.close()
        silent.close()
    assert report.source == good.address
    assert isinstance(report.failures[dead_address], netloader.ConnectError)
    assert isinstance(report.failures[silent_address], netloader.ConnectError)
    expected = named(build("mixed", 4))
    assert all(bytes_equal(t, expected[n]) for n, t in named(model).items())


def test_all_sources_failing_lists_each_with_its_reason(source):
    other = source("mixed", seed=4, model_id="other")
    with pytest.raises(netloader.NoSourceError) as info:
        netloader.load_weights(build("mixed", None), ["127.0.0.1:1", other.address], model_id="test-model",
                               timeout=2)
    message = str(info.value)
    assert "127.0.0.1:1: ConnectError" in message
    assert f"{other.address}: IdentityMismatchError" in message
    assert set(info.value.failures) == {"127.0.0.1:1", other.address}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_id": ""}, "model_id"),
        ({"rank": -1}, "rank"),
        ({"layout": {"tp": 1.5}}, "layout"),
        ({"timeout": 0}, "timeout"),
        ({"bucket_size": 10}, "bucket_size"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, match):
    with pytest.raises(netloader.ConfigError, match=match):
        netloader.load_weights(build("mixed", None), ["127.0.0.1:1"], **{"model_id": "m", **kwargs})
    with pytest.raises(netloader.ConfigError):
        netloader.load_weights(build("mixed", None), ["not-an-address"], model_id="m")


def test_a_gloo_group_that_never_forms_is_given_up_within_the_timeout(source):
    """The client asks for gloo, then only heartbeats: the source stops waiting for the group at `timeout`
    (not gloo's own, five times longer, wait) and frees its slot."""
    import rawpeer
    from netloader import protocol as P

    src = source("mixed", seed=4, transports=["streams", "gloo"], timeout=4, max_concurrent=1)
    sock = rawpeer.authenticate(src.address)
    P.send_message(sock, P.Load(model_id="test-model", rank=0, layout={}, backend="gloo"), timeout=5)
    P.expect(P.read_message(sock, timeout=10), P.ManifestMsg)
    P.send_message(sock, P.Ready(), timeout=5)
    P.expect(P.read_message(sock, timeout=10), P.Rendezvous)
    started = time.monotonic()
    freed_after = None
    try:
        while time.monotonic() - started < 60:
            P.send_message(sock, P.Heartbeat(), timeout=5)  # alive: only the formation deadline can end it
            if not src.stats()["active"]:
                freed_after = time.monotonic() - started
                break
            time.sleep(0.5)
    finally:
        sock.close()
    assert freed_after is not None and freed_after < 4 * 5, freed_after
    assert "did not join the transfer group in time" in src.log_text() or "did not form" in src.log_text()
    report = netloader.load_weights(build("mixed", None), [src.address], model_id="test-model", transport="gloo")
    assert report.transport == "gloo"
