"""Dead, stalled and silent peers: noticed fast, reported per source, nothing leaked, loads resume elsewhere."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest

import netloader
from conftest import client_result, spawn_client
from models import build, named
from netloader.synthetic import bytes_equal

#: 256 MiB in 1 MiB messages: long enough to be interrupted part-way, deterministically (on_progress)
KIND, PLAN = "llama256", {"chunk_size": 1 << 20, "bucket_size": 1 << 20}


def _bit_exact(model: object, seed: int) -> bool:
    expected = named(build(KIND, seed))
    return all(bytes_equal(t, expected[n]) for n, t in named(model).items())  # type: ignore[arg-type]


class Once:
    """An ``on_progress`` callback that runs ``action`` once, when ``fraction`` of the bytes have arrived."""

    def __init__(self, fraction: float, action: Callable[[], None]) -> None:
        self.fraction, self.action = fraction, action
        self.at: float | None = None  # time.monotonic() when it ran

    def __call__(self, done: int, total: int) -> None:
        if self.at is None and done >= self.fraction * total:
            self.action()
            self.at = time.monotonic()


def test_source_killed_mid_transfer_is_noticed_at_once(source):
    src = source(KIND, seed=1, **PLAN)
    model = build(KIND, None)
    kill_at_30_percent = Once(0.3, src.kill)  # SIGKILL
    threads_before = threading.active_count()
    with pytest.raises(netloader.NoSourceError) as info:
        netloader.load_weights(model, [src.address], model_id="test-model", timeout=20, on_progress=kill_at_30_percent)
    assert kill_at_30_percent.at is not None
    noticed_after = time.monotonic() - kill_at_30_percent.at
    failure = info.value.failures[src.address]
    assert isinstance(failure, netloader.TransferError)
    assert noticed_after < 3, f"took {noticed_after:.1f} s with timeout=20"
    # no thread left behind: a gloo wait that the dead peer left hanging ends by itself within the timeout
    deadline = time.monotonic() + 25
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert threading.active_count() == threads_before, [t.name for t in threading.enumerate()]


def test_killed_source_is_resumed_from_the_next_source(source):
    first, second = source(KIND, seed=1, **PLAN), source(KIND, seed=1, **PLAN)
    model = build(KIND, None)
    kill_first = Once(0.4, first.kill)
    report = netloader.load_weights(model, [first.address, second.address], model_id="test-model",
                                    on_progress=kill_first)
    assert report.source == second.address
    assert isinstance(report.failures[first.address], netloader.TransferError)
    assert report.resumed_at > 0  # did not start over
    total = sum(t.numel() * t.element_size() for t in named(model).values())
    assert report.bytes < 0.7 * total
    # what arrived stayed: kept + fetched again covers the model, and little of it was fetched twice
    assert report.resumed_bytes + report.bytes == total
    assert report.resumed_bytes >= 0.3 * total
    assert report.refetched_bytes <= 0.1 * total
    assert _bit_exact(model, 1)


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


def test_client_killed_mid_transfer_does_not_hurt_the_source(source):
    # timeout=5: gloo does not wake a send that is part-way through the socket when its peer dies, so such a
    # wait (one waiter thread and the group's sockets) lasts until the source's timeout; the slot is freed at
    # once. A short timeout lets the test see that even that wait ends and nothing stays behind.
    src = source(KIND, seed=1, timeout=5, **PLAN)
    warm = build(KIND, None)  # first transfer: process-wide state is created once
    netloader.load_weights(warm, [src.address], model_id="test-model")
    baseline = src.idle_stats()
    doomed = spawn_client({"model": KIND, "expect_seed": 1, "sources": [src.address], "model_id": "test-model",
                           "die_at": 0.3})
    doomed.wait(120)
    assert doomed.returncode == -signal.SIGKILL
    assert src.idle_stats()["active"] == 0  # the slot is free long before the timeout
    stats = src.settled_stats(baseline, timeout=20)
    assert (stats["active"], stats["connections"]) == (0, 0)
    assert stats["threads"] <= baseline["threads"] and stats["fds"] <= baseline["fds"], (baseline, stats)
    assert "ended" in src.log_text() or "failed" in src.log_text()
    result = client_result(spawn_client({"model": KIND, "expect_seed": 1, "sources": [src.address],
                                         "model_id": "test-model"}))
    assert result["ok"], result


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
