"""The pure layers on their own: manifest, plan, wire protocol."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time

import pytest
import torch

from models import build
from netloader import protocol as P
from netloader.errors import ConfigError, ManifestMismatchError, ProtocolError
from netloader.manifest import Identity, Manifest, TensorSet, TensorSpec, element_size
from netloader.plan import PlanParams, make_plan

# ------------------------------------------------------------------------------------------------ manifest


def test_tied_weights_are_aliases_and_move_once():
    model = build("mixed", 1)
    tensors = TensorSet(model)
    aliases = [s for s in tensors.manifest.specs if s.tied_to]
    assert [(s.name, s.tied_to) for s in aliases] == [("head.weight", "embed.weight")]
    assert len(tensors.tensors) == len(tensors.manifest.specs) - 1
    assert tensors.total_bytes == sum(t.numel() * t.element_size() for t in tensors.tensors)


def test_manifest_round_trips_through_the_wire_format():
    manifest = TensorSet(build("mixed", 1)).manifest
    rows = json.loads(json.dumps(manifest.to_wire()))
    assert Manifest.from_wire(rows) == manifest


@pytest.mark.parametrize(
    "rows",
    [
        [["a", [2], "float32", None], ["a", [2], "float32", None]],  # duplicate name
        [["a", [2], "float99", None]],  # unknown dtype
        [["a", [-1], "float32", None]],  # negative dim
        [["a", [2], "float32", "b"]],  # tied to a later / missing name
    ],
)
def test_invalid_manifests_are_refused(rows):
    with pytest.raises(ConfigError):
        Manifest.from_wire(rows)


def test_manifest_differences_list_every_kind():
    source = Manifest((TensorSpec("a", (2, 3), "float32"), TensorSpec("b", (4,), "bfloat16"),
                       TensorSpec("c", (1,), "int8")))
    client = Manifest((TensorSpec("a", (3, 2), "float32"), TensorSpec("b", (4,), "float16"),
                       TensorSpec("d", (1,), "int8")))
    diffs = client.differences(source)
    assert diffs == [
        "'a': shape [3, 2] here vs [2, 3] at source",
        "'b': dtype float16 here vs bfloat16 at source",
        "'c': missing here (source has int8[1])",
        "'d': extra here (int8[1]; the source has no such tensor)",
    ]
    with pytest.raises(ManifestMismatchError, match="4 place"):
        client.check_matches(source)


def test_identity_validation():
    assert Identity.build("m", 1, {"tp": 2, "pp": "x"}).layout == {"pp": "x", "tp": 2}
    for bad in [("", 0, None), ("m", -1, None), ("m", True, None), ("m", 0, {"tp": 1.0}), ("m", 0, {"a b": 1})]:
        with pytest.raises(ConfigError):
            Identity.build(*bad)  # type: ignore[arg-type]


def test_tensors_on_two_kinds_of_device_are_refused():
    with pytest.raises(ConfigError, match="one kind of device"):
        TensorSet({"a": torch.zeros(2), "b": torch.zeros(2, device="meta")})


# ------------------------------------------------------------------------------------------------ plan


@pytest.mark.parametrize("params", [PlanParams(), PlanParams(64 * 1024, 16 * 1024, 128 * 1024)])
def test_plan_covers_every_byte_exactly_once_within_limits(params):
    manifest = TensorSet(build("mixed", 1)).manifest
    plan = make_plan(manifest, params)
    covered: dict[int, list[tuple[int, int]]] = {}
    for op in plan.ops:
        if op.packed:
            assert op.nbytes <= params.bucket_size
            end = 0
            for seg in op.segments:
                assert seg.offset >= end  # no overlap inside a message
                assert seg.offset % element_size(manifest.moving[seg.index].dtype) == 0  # aligned
                end = seg.offset + seg.length
            assert end == op.nbytes and sum(op.split) == op.nbytes
        else:
            assert len(op.segments) == 1 and op.nbytes <= params.chunk_size
        for seg in op.segments:
            covered.setdefault(seg.index, []).append((seg.start, seg.length))
    for index, spec in enumerate(manifest.moving):
        if spec.nbytes == 0:
            assert index not in covered
            continue
        pieces = sorted(covered[index])
        assert pieces[0][0] == 0
        assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(pieces))
        assert pieces[-1][0] + pieces[-1][1] == spec.nbytes
    assert plan.payload_from(0) == manifest.total_bytes


def test_plan_is_deterministic_and_large_tensors_go_direct():
    manifest = TensorSet(build("llama64", 1)).manifest
    a, b = make_plan(manifest), make_plan(manifest)
    assert a == b
    direct = [op for op in a.ops if not op.packed]
    assert sum(op.payload for op in direct) > 0.99 * manifest.total_bytes


def test_plan_params_are_bounded():
    for bad in [dict(bucket_size=10), dict(bucket_size=1 << 40), dict(direct_threshold=0),
                dict(chunk_size=1), dict(bucket_size=True)]:
        with pytest.raises(ConfigError):
            PlanParams(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ protocol


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


def test_messages_round_trip_and_unknown_fields_are_refused():
    a, b = _pair()
    P.send_message(a, P.Load(model_id="m", rank=1, layout={"tp": 2}, backend="gloo"), timeout=1)
    got = P.read_message(b, timeout=1)
    assert isinstance(got, P.Load) and got.layout == {"tp": 2}
    for body in [b'{"type":"load","model_id":"m","rank":1,"layout":{},"backend":"gloo","x":1}',
                 b'{"type":"load","model_id":"m","rank":"1","layout":{},"backend":"gloo"}',
                 b'{"type":"nope"}', b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe", b"{}"]:
        with pytest.raises(ProtocolError):
            P.decode(body)


def test_frame_cap_and_whole_message_deadline():
    a, b = _pair()
    a.sendall((1 << 30).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="exceeds"):
        P.read_message(b, timeout=1, max_size=4096)

    a, b = _pair()

    def trickle() -> None:
        body = P.encode(P.Probe())
        for byte in body:
            time.sleep(0.1)
            try:
                a.sendall(bytes([byte]))
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(P.FrameTimeoutError):
        P.read_message(b, timeout=0.5)  # bytes keep coming, but not the whole message in time
    assert time.monotonic() - start < 1.0
    a.close()
    b.close()


def test_macs_bind_role_and_both_nonces():
    s, c = P.new_nonce(), P.new_nonce()
    mac = P.client_mac("tok", s, c)
    assert P.macs_equal(mac, P.client_mac("tok", s, c))
    assert not P.macs_equal(mac, P.client_mac("other", s, c))
    assert not P.macs_equal(mac, P.client_mac("tok", P.new_nonce(), c))
    assert not P.macs_equal(mac, P.server_mac("tok", s, c))  # a client MAC is no server proof
    assert not P.macs_equal(mac, None)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("10.0.0.1:80", ("10.0.0.1", 80)), ("[::1]:9000", ("::1", 9000)), ("host.example:1", ("host.example", 1))],
)
def test_parse_address(text, parsed):
    assert P.parse_address(text) == parsed
    assert P.parse_address(P.format_address(*parsed)) == parsed


@pytest.mark.parametrize("text", ["", "host", "host:", ":80", "host:0", "host:70000", "host:x"])
def test_parse_address_refuses(text):
    with pytest.raises(ConfigError):
        P.parse_address(text)
