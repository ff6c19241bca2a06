"""Relays, striping and max_rate on loopback, in one process (the emulated-host tests are in test_fanout.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import netloader
from models import build, named
from netloader.integrations.config import parse_config
from netloader.synthetic import bytes_equal


def _exact(model: Any, kind: str, seed: int = 1) -> None:
    expected = named(build(kind, seed))
    bad = [n for n, t in named(model).items() if not bytes_equal(t, expected[n])]
    assert not bad, bad[:5]


def _server(kind: str, seed: int | None = 1, **kwargs: Any) -> netloader.WeightServer:
    return netloader.WeightServer(build(kind, seed), model_id="relay-test", host="127.0.0.1", **kwargs).start()


@pytest.mark.parametrize("kind", ["mixed", "many"])
def test_striped_load_is_bit_exact_and_says_where_bytes_came_from(kind):
    servers = [_server(kind) for _ in range(3)]
    try:
        model = build(kind, None)
        report = netloader.load_weights(model, [s.address for s in servers], model_id="relay-test", max_sources=3,
                                        progress=False)
        _exact(model, kind)
        assert sum(report.sources.values()) == report.bytes > 0
        assert set(report.sources) <= {s.address for s in servers}
        assert report.source in report.sources
    finally:
        for s in servers:
            s.close()


def test_a_relay_serves_while_it_fills_also_with_smaller_buckets():
    origin = _server("mixed", bucket_size=1 << 20)
    relay = _server("mixed", None, ready=False)
    assert (relay.state, relay.progress) == ("filling", 0.0)
    model = build("mixed", None)
    out: dict[str, Any] = {}

    def downstream() -> None:
        out["report"] = netloader.load_weights(model, [relay.address], model_id="relay-test", bucket_size=64 << 10,
                                               progress=False)

    thread = threading.Thread(target=downstream)
    thread.start()
    try:
        time.sleep(0.3)  # the downstream waits on the relay's empty tensors
        report = relay.fill([origin.address])
        thread.join(60)
        assert report.sources == {origin.address: report.bytes}
        assert (relay.state, relay.progress) == ("ready", 1.0)
        assert out["report"].sources == {relay.address: out["report"].bytes}
        # the relay served its origin's digests (learned from the origin's manifest, never computed from what it
        # held), and a relayed load checks them by default
        assert out["report"].verified and out["report"].digests == report.digests is not None
        _exact(model, "mixed")
    finally:
        relay.close()
        origin.close()


def test_a_failed_fill_fails_waiting_downstreams_at_once_with_the_reason_and_they_resume_elsewhere():
    origin = _server("mixed")
    relay = _server("mixed", None, ready=False)
    model = build("mixed", None)
    out: dict[str, Any] = {}

    def downstream() -> None:
        out["report"] = netloader.load_weights(model, [relay.address, origin.address], model_id="relay-test",
                                               progress=False, timeout=120)

    thread = threading.Thread(target=downstream)
    thread.start()
    try:
        time.sleep(0.3)
        with pytest.raises(netloader.NoSourceError):
            relay.fill(["127.0.0.1:1"], timeout=5)
        thread.join(60)
        report = out["report"]
        assert report.source == origin.address
        assert "relay's own load failed" in str(report.failures[relay.address])
        _exact(model, "mixed")
        assert relay.fill_error is not None and relay.state == "filling"
        # a later client is refused at once, with the reason
        with pytest.raises(netloader.NoSourceError, match="own load failed"):
            netloader.load_weights(build("mixed", None), [relay.address], model_id="relay-test", progress=False)
    finally:
        relay.close()
        origin.close()


def test_max_rate_caps_what_serving_takes():
    rate = 20e6
    server = _server("mixed", max_rate=rate)
    try:
        model = build("mixed", None)
        report = netloader.load_weights(model, [server.address], model_id="relay-test", progress=False)
        _exact(model, "mixed")
        burst = max(rate / 100, 1 << 20)
        assert report.seconds >= (report.bytes - burst) / rate  # a floor: a slow machine cannot make this fail
    finally:
        server.close()
    with pytest.raises(netloader.ConfigError):
        netloader.WeightServer(build("mixed", 1), model_id="x", max_rate=0)
    assert parse_config({"MAX_RATE_GBPS": 0.5}).MAX_RATE_GBPS == 0.5
    with pytest.raises(netloader.ConfigError, match="MAX_RATE_GBPS"):
        parse_config({"MAX_RATE_GBPS": 0})
