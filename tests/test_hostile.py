"""Hostile and malformed input never stops a source, leaks nothing, and the next load is bit-exact."""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import socket
import threading
import time

import pytest
import torch

import netloader
import rawpeer
from conftest import client_result, spawn_client
from models import build, named
from netloader import protocol as P
from netloader.synthetic import bytes_equal


def _load_is_bit_exact(address: str, seed: int, **kwargs: object) -> None:
    model = build("mixed", None)
    netloader.load_weights(model, [address], model_id="test-model", **kwargs)  # type: ignore[arg-type]
    expected = named(build("mixed", seed))
    assert all(bytes_equal(t, expected[n]) for n, t in named(model).items())


def _closed_without_answer(data: bytes) -> bool:
    """The server sent its hello (a valid frame) and nothing else a client could act on."""
    length = int.from_bytes(data[:4], "big")
    return len(data) == 4 + length and isinstance(P.decode(data[4:]), P.Hello)


PRE_AUTH_GARBAGE = {
    "random-bytes": os.urandom(4096),
    "huge-length-prefix": b"\xff\xff\xff\xff" + b"x" * 100,
    "http-request": b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\n\r\n",
    "deeply-nested-json": (lambda body: len(body).to_bytes(4, "big") + body)(b"[" * 2000 + b"]" * 2000),
    "not-json": (lambda body: len(body).to_bytes(4, "big") + body)(b"\x00\x01not json at all"),
    "unknown-type": (lambda body: len(body).to_bytes(4, "big") + body)(b'{"type": "shell", "cmd": "rm -rf /"}'),
    "extra-field": (lambda body: len(body).to_bytes(4, "big") + body)(
        json.dumps({"type": "auth", "proto": 1, "nonce": "a" * 64, "mac": None, "x": 1}).encode()),
    "wrong-type": (lambda body: len(body).to_bytes(4, "big") + body)(
        json.dumps({"type": "auth", "proto": "1", "nonce": "a" * 64, "mac": None}).encode()),
    "bad-nonce": (lambda body: len(body).to_bytes(4, "big") + body)(
        json.dumps({"type": "auth", "proto": 1, "nonce": "zz", "mac": None}).encode()),
    "pickle": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94.",
}


@pytest.fixture
def hostile_source(source):
    src = source("mixed", seed=8, handshake_timeout=2.0, max_connections=64, token="tok")
    # the first transfer creates process-wide gloo/libuv state (2 fds) once; leak checks start after it
    _load_is_bit_exact(src.address, 8, token="tok")
    return src


def test_repeated_loads_leak_no_thread_or_fd(hostile_source):
    baseline = hostile_source.idle_stats()
    for _ in range(3):
        _load_is_bit_exact(hostile_source.address, 8, token="tok")
    after = hostile_source.settled_stats(baseline)
    assert (after["threads"], after["fds"], after["connections"]) == (
        baseline["threads"], baseline["fds"], 0), (baseline, after)


def test_garbage_before_authentication_is_dropped(hostile_source):
    src = hostile_source
    baseline = src.idle_stats()
    for name, payload in PRE_AUTH_GARBAGE.items():
        sock = rawpeer.connect(src.address)
        sock.sendall(payload)
        data, seconds = rawpeer.read_until_closed(sock)
        sock.close()
        assert _closed_without_answer(data) or b'"error"' in data, name
        assert seconds < 5, name
    _load_is_bit_exact(src.address, 8, token="tok")
    after = src.settled_stats(baseline)
    assert after["threads"] <= baseline["threads"] and after["fds"] <= baseline["fds"], (baseline, after)
    assert after["connections"] == 0


def test_malformed_requests_after_authentication_are_refused(hostile_source):
    src = hostile_source
    baseline = src.idle_stats()
    good = {"type": "load", "model_id": "test-model", "rank": 0, "layout": {}, "backend": "streams"}
    bad_requests = [
        {**good, "rank": -1},
        {**good, "rank": "0"},
        {**good, "layout": {"bad key!": 1}},
        {**good, "layout": {"tp": [1, 2]}},
        {**good, "model_id": "x" * 5000},
        {**good, "extra": True},
        {**good, "bucket_size": 2**70},
    ]
    bodies = [json.dumps(r).encode() for r in bad_requests]
    bodies.append(b'{"type": "load", "layout": ' + b"[" * 30000 + b"]" * 30000 + b"}")  # deep, under the cap
    bodies.append(b" " * (P.MAX_FRAME + 1))  # over the cap: refused by its length alone
    for body in bodies:
        sock = rawpeer.authenticate(src.address, token="tok")
        if len(body) > P.MAX_FRAME:
            sock.sendall(len(body).to_bytes(4, "big"))
        else:
            rawpeer.send_frame(sock, body)
        data, seconds = rawpeer.read_until_closed(sock)
        sock.close()
        assert seconds < 5
        assert b'"type":"manifest"' not in data  # nothing served
    _load_is_bit_exact(src.address, 8, token="tok")
    assert src.settled_stats(baseline)["connections"] == 0


def test_backend_mismatch_is_refused_before_the_manifest(hostile_source):
    sock = rawpeer.authenticate(hostile_source.address, token="tok")
    P.send_message(sock, P.Load(model_id="test-model", rank=0, layout={}, backend="nccl"), timeout=5)
    with pytest.raises(P.RemoteError, match="transport mismatch") as info:
        P.expect(P.read_message(sock, timeout=5), P.ManifestMsg)
    assert info.value.code == "mismatch"
    sock.close()


def test_a_peer_that_trickles_bytes_is_dropped_at_the_deadline(hostile_source):
    sock = rawpeer.connect(hostile_source.address)
    start = time.monotonic()
    closed = False
    body = json.dumps({"type": "auth", "proto": 1, "nonce": "a" * 64, "mac": None}).encode()
    frame = len(body).to_bytes(4, "big") + body
    for byte in frame:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.25)
        if time.monotonic() - start > 8:
            break
    if not closed:
        _, _ = rawpeer.read_until_closed(sock, timeout=5)
    elapsed = time.monotonic() - start
    sock.close()
    assert elapsed < 2.0 + 3.0  # handshake_timeout is a whole-message deadline, not per byte


def test_fifty_idle_connections_do_not_block_a_load(hostile_source):
    src = hostile_source
    baseline = src.idle_stats()
    idle = [rawpeer.connect(src.address) for _ in range(50)]
    try:
        _load_is_bit_exact(src.address, 8, token="tok")
    finally:
        for sock in idle:
            sock.close()
    stats = src.settled_stats(baseline)
    assert stats["connections"] == 0 and stats["threads"] <= baseline["threads"]


def test_connections_over_the_cap_are_closed_at_once(source):
    src = source("mixed", seed=8, max_connections=4, handshake_timeout=3.0)
    held = [rawpeer.connect(src.address) for _ in range(4)]
    for sock in held:  # each got its hello, so each holds a slot
        P.expect(P.read_message(sock, timeout=5), P.Hello)
    extra = rawpeer.connect(src.address)
    data, seconds = rawpeer.read_until_closed(extra, timeout=5)
    assert data == b"" and seconds < 2
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 10
    while src.stats()["connections"] and time.monotonic() < deadline:
        time.sleep(0.1)
    _load_is_bit_exact(src.address, 8)


def test_probe_reports_what_the_source_serves(source):
    src = source("mixed", seed=8, rank=3, layout={"tp": 4, "pp": 2}, max_concurrent=2)
    info = netloader.probe(src.address)
    model = build("mixed", None)
    tensors = named(model)
    assert info.model_id == "test-model" and info.rank == 3 and dict(info.layout) == {"pp": 2, "tp": 4}
    assert info.tensors == len(tensors)
    assert info.bytes == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert info.active_transfers == 0 and info.max_concurrent == 2 and info.backend == "streams"


def test_busy_source_answers_at_once_and_the_client_moves_on(source):
    busy = source("mixed", seed=8, max_concurrent=1)
    spare = source("mixed", seed=8)
    holder = rawpeer.authenticate(busy.address)  # takes the only transfer slot and sits on the manifest
    P.send_message(holder, P.Load(model_id="test-model", rank=0, layout={}, backend="streams"), timeout=5)
    P.expect(P.read_message(holder, timeout=5), P.ManifestMsg)
    assert netloader.probe(busy.address).active_transfers == 1

    model = build("mixed", None)
    start = time.monotonic()
    report = netloader.load_weights(model, [busy.address, spare.address], model_id="test-model")
    assert time.monotonic() - start < 10
    assert report.source == spare.address
    assert isinstance(report.failures[busy.address], netloader.BusyError)
    expected = named(build("mixed", 8))
    assert all(bytes_equal(t, expected[n]) for n, t in named(model).items())

    holder.close()  # the slot comes back
    deadline = time.monotonic() + 10
    while netloader.probe(busy.address).active_transfers and time.monotonic() < deadline:
        time.sleep(0.1)
    _load_is_bit_exact(busy.address, 8)


def test_close_returns_promptly_with_idle_connections_open():
    model = build("mixed", 1)
    server = netloader.WeightServer(model, model_id="m", host="127.0.0.1").start()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start < 5
    assert server.open_connections == 0
    for sock in idle:
        sock.close()
    with pytest.raises(netloader.NoSourceError):
        netloader.load_weights(build("mixed", None), [f"127.0.0.1:{server.port}"], model_id="m", timeout=2)


# ---------------------------------------------------------------------- the data plane under attack


def _all_zero(model: object) -> bool:
    tensors = named(model).values()  # type: ignore[arg-type]
    return all(not t.reshape(-1).contiguous().view(torch.uint8).any() for t in tensors if t.numel())


@pytest.mark.parametrize("mode", ["wrong-tag", "wrong-length", "huge-length"])
def test_a_source_sending_what_was_not_asked_for_is_refused_before_any_byte_is_written(source, mode):
    fake = rawpeer.FakeSource(build("mixed", 8), mode)
    try:
        model = build("mixed", None)
        with pytest.raises(netloader.NoSourceError) as info:
            netloader.load_weights(model, [fake.address], model_id="test-model", timeout=10)
        failure = info.value.failures[fake.address]
        assert isinstance(failure, netloader.TransferError) and "protocol violation" in str(failure), failure
        assert fake.attaches == 2
        assert _all_zero(model)  # the frames' 0xAB bytes went nowhere
        real = source("mixed", seed=8)
        report = netloader.load_weights(model, [fake.address, real.address], model_id="test-model", timeout=10)
        assert report.source == real.address and "protocol violation" in str(report.failures[fake.address])
        expected = named(build("mixed", 8))
        assert all(bytes_equal(t, expected[n]) for n, t in named(model).items())
    finally:
        fake.close()


def test_an_alive_source_that_sends_no_data_is_abandoned_at_the_timeout():
    fake = rawpeer.FakeSource(build("mixed", 8), "stall")  # heartbeats keep coming: only `timeout` can end it
    try:
        start = time.monotonic()
        with pytest.raises(netloader.NoSourceError) as info:
            netloader.load_weights(build("mixed", None), [fake.address], model_id="test-model", timeout=3,
                                   heartbeat_timeout=30)
        assert time.monotonic() - start < 30
        failure = info.value.failures[fake.address]
        assert isinstance(failure, netloader.TransferTimeoutError) and "no progress" in str(failure), failure
    finally:
        fake.close()


def _frames(data: bytes) -> list[P._Message]:
    """Every frame in ``data``, decoded (raises if anything is not a whole, valid control frame)."""
    out = []
    while data:
        length = int.from_bytes(data[:4], "big")
        assert 4 + length <= len(data), "a partial frame"
        out.append(P.decode(data[4 : 4 + length]))
        data = data[4 + length :]
    return out


class Attacker:
    """Races legitimate loads with everything a peer without the token can try, on every port it finds."""

    def __init__(self, pids: dict[str, int], token_known: bool) -> None:
        self.pids = pids
        self.token_known = token_known  # token=None sources: anyone may authenticate, only ids are secret
        self.ports_seen: dict[str, set[int]] = {name: set() for name in pids}
        self.answers: list[P._Message] = []
        self.attempts = 0
        self.replayable: list[str] = []
        self.stop = threading.Event()

    def _exchange(self, port: int, payload: bytes, *, authenticate: bool = False) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            return
        try:
            sock.settimeout(5)
            data = b""
            if authenticate:
                hello = P.expect(P.read_message(sock, timeout=5), P.Hello)
                P.send_message(sock, P.Auth(proto=P.PROTOCOL_VERSION, nonce=P.new_nonce(), mac=None), timeout=5)
                self.answers.append(hello)
            if payload:
                sock.sendall(payload)
            data, _ = rawpeer.read_until_closed(sock, timeout=15)
        except (OSError, P.ProtocolError, TimeoutError):
            pass
        finally:
            sock.close()
        self.attempts += 1
        self.answers.extend(_frames(data))

    def _attach(self, transfer: str, stream: int) -> bytes:
        return P.encode(P.Attach(transfer=transfer, stream=stream))

    def run(self) -> None:
        rng = random.Random(9)
        while not self.stop.is_set():
            for name, pid in list(self.pids.items()):
                with contextlib.suppress(OSError):
                    self.ports_seen.setdefault(name, set()).update(rawpeer.listening_ports(pid))
            for port in sorted(set().union(*self.ports_seen.values())):
                guessed = secrets.token_hex(16)
                tries = [
                    (os.urandom(rng.randrange(1, 2048)), False),  # garbage
                    (P.DATA_HEADER.pack(0, 1 << 20) + b"\xab" * 4096, False),  # a data frame, unannounced
                    (self._attach(guessed, 0), False),  # attach before authenticating
                    (b"", False),  # a data connection that never authenticates
                    (self._attach(guessed, rng.randrange(8)), True),  # authenticated (or not) with a guessed id
                ]
                if self.replayable:
                    tries.append((self._attach(rng.choice(self.replayable), 0), True))  # a finished transfer's id
                for payload, authenticate in tries:
                    if self.stop.is_set():
                        return
                    self._exchange(port, payload, authenticate=authenticate)


@pytest.mark.parametrize("token", ["tok", None], ids=["token", "no-token"])
def test_a_port_scanning_attacker_gets_no_weight_byte_and_breaks_nothing(source, token):
    src = source("llama64", seed=5, token=token, handshake_timeout=2.0, chunk_size=1 << 20, bucket_size=1 << 20)
    auth = {"token": token} if token else {}
    if token is None:  # an attacker may load a token-less source itself: its transfer id, once done, is a replay
        sock = rawpeer.authenticate(src.address)
        P.send_message(sock, P.Load(model_id="test-model", rank=0, layout={}, backend="streams"), timeout=5)
        P.expect(P.read_message(sock, timeout=10), P.ManifestMsg)
        P.send_message(sock, P.Ready(missing=[(0, 1)]), timeout=5)
        rendezvous = P.expect(P.read_message(sock, timeout=10), P.Rendezvous)
        sock.close()  # never attaches: the source gives the transfer up at the attach deadline
    attacker = Attacker({"source": src.pid}, token_known=token is None)
    if token is None:
        attacker.replayable.append(rendezvous.transfer)
    thread = threading.Thread(target=attacker.run, daemon=True)
    thread.start()
    try:
        for _ in range(4):
            client = spawn_client({"model": "llama64", "expect_seed": 5, "sources": [src.address],
                                   "model_id": "test-model", "timeout": 60, **auth})
            attacker.pids["client"] = client.pid
            result = client_result(client)
            attacker.pids.pop("client", None)
            assert result["ok"], result
    finally:
        attacker.stop.set()
        thread.join(60)
    _host, port = P.parse_address(src.address)
    assert attacker.ports_seen["source"] == {port}  # nothing but the source's own port ever listened
    assert not attacker.ports_seen.get("client")  # a client listens on nothing
    assert attacker.attempts >= 20
    kinds = {type(m).__name__ for m in attacker.answers}
    assert kinds <= {"Hello", "Error", "AuthOk"}, kinds  # no manifest, no attached stream, no data frame
    if token:
        assert "AuthOk" not in kinds
    assert src.proc.poll() is None
    _load_is_bit_exact_kind(src.address, "llama64", 5, **auth)


def _load_is_bit_exact_kind(address: str, kind: str, seed: int, **kwargs: object) -> None:
    model = build(kind, None)
    netloader.load_weights(model, [address], model_id="test-model", **kwargs)  # type: ignore[arg-type]
    expected = named(build(kind, seed))
    assert all(bytes_equal(t, expected[n]) for n, t in named(model).items())


def test_data_connections_that_repeat_or_never_come_are_refused_and_the_slot_comes_back(source):
    src = source("mixed", seed=8, handshake_timeout=2.0, max_concurrent=1)
    ctl = rawpeer.authenticate(src.address)
    P.send_message(ctl, P.Load(model_id="test-model", rank=0, layout={}, backend="streams"), timeout=5)
    P.expect(P.read_message(ctl, timeout=10), P.ManifestMsg)
    P.send_message(ctl, P.Ready(), timeout=5)
    rendezvous = P.expect(P.read_message(ctl, timeout=10), P.Rendezvous)
    first = rawpeer.authenticate(src.address)
    P.send_message(first, P.Attach(transfer=rendezvous.transfer, stream=0), timeout=5)
    assert P.expect(P.read_message(first, timeout=10), P.Attached).stream == 0
    again = rawpeer.authenticate(src.address)  # the same stream a second time
    P.send_message(again, P.Attach(transfer=rendezvous.transfer, stream=0), timeout=5)
    data, _ = rawpeer.read_until_closed(again)
    assert b"attached" not in data
    # stream 1 never comes: the source gives the transfer up at its handshake deadline and frees the slot
    deadline = time.monotonic() + 30
    while src.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert src.stats()["active"] == 0
    late = rawpeer.authenticate(src.address)  # the id died with its transfer
    P.send_message(late, P.Attach(transfer=rendezvous.transfer, stream=1), timeout=5)
    with pytest.raises(P.RemoteError, match="no such transfer"):
        P.expect(P.read_message(late, timeout=10), P.Attached)
    for sock in (ctl, first, again, late):
        sock.close()
    assert "did not attach" in src.log_text()
    _load_is_bit_exact(src.address, 8)


@pytest.mark.parametrize("bad", [[(0, 10**9)], [(3, 2)], [(2, 4), (3, 5)]], ids=["beyond", "empty", "overlapping"])
def test_a_striped_session_asking_for_invalid_more_is_dropped_and_breaks_nothing(source, bad):
    src = source("mixed", seed=9, handshake_timeout=2.0, max_concurrent=1)
    ctl = rawpeer.authenticate(src.address)
    P.send_message(ctl, P.Load(model_id="test-model", rank=0, layout={}, backend="streams"), timeout=5)
    P.expect(P.read_message(ctl, timeout=10), P.ManifestMsg)
    P.send_message(ctl, P.Ready(missing=[(0, 1)], more=True), timeout=5)
    rendezvous = P.expect(P.read_message(ctl, timeout=10), P.Rendezvous)
    streams = []
    for stream in range(rendezvous.streams):
        sock = rawpeer.authenticate(src.address)
        P.send_message(sock, P.Attach(transfer=rendezvous.transfer, stream=stream), timeout=5)
        P.expect(P.read_message(sock, timeout=10), P.Attached)
        streams.append(sock)
    rawpeer.send_frame(ctl, json.dumps({"type": "more", "missing": bad}).encode())
    deadline = time.monotonic() + 30
    while src.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert src.stats()["active"] == 0  # the transfer was dropped and its slot came back
    for sock in (ctl, *streams):
        sock.close()
    assert src.proc.poll() is None
    _load_is_bit_exact(src.address, 9)
