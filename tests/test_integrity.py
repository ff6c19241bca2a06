"""End-to-end integrity: the origin's digests travel with the manifest and every client checks every tensor.

Real source processes (tests/source_proc.py) and real client processes (tests/client_proc.py). A source given
the digests of another model stands for a relay that recomputed its own; the corrupting relay (a test-only source
that flips bits after taking the clean bytes' digests) is a fault of the fault-injection suite, test_faults.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import netloader
from conftest import ENV, client_result, spawn_client
from models import build, named
from netloader import protocol as P
from netloader.errors import ConfigError, ProtocolError
from netloader.integrity import Digests, StripedVerifier, Verifier, digests_of, mismatches, ops_covering, tensor_digest
from netloader.manifest import TensorSet
from netloader.plan import PlanParams, make_plan
from netloader.synthetic import bytes_equal


def _load(sources: list[str], **extra: object) -> dict[str, object]:
    return client_result(spawn_client({"model": "mixed", "expect_seed": 1, "sources": sources,
                                       "model_id": "test-model", **extra}))


def test_a_clean_load_checks_every_tensor(source):
    src = source("mixed", seed=1)
    out = _load([src.address], verify=True)
    assert out["ok"] and out["verified"] is True and out["corrupt"] == {}
    expected = digests_of(TensorSet(build("mixed", 1)))
    assert out["digests"] == expected.to_wire()  # what the origin computed, as the client got it
    default = _load([src.address])  # the default checks every tensor too (its cost: README, Integrity)
    assert default["ok"] and default["verified"] is True and default["digests"] == expected.to_wire()
    unchecked = _load([src.address], verify=False)
    assert unchecked["ok"] and unchecked["verified"] is False and unchecked["digests"] == expected.to_wire()


def test_a_source_serves_the_digests_it_was_given_unchanged(source):
    # holding seed 1 but given seed 2's digests: a source that recomputed its own would pass every check
    relay = source("mixed", seed=1, digests_seed=2)
    out = _load([relay.address])
    assert not out["ok"] and out["error"].startswith("IntegrityError")
    [names] = out["corrupt"].values()
    differing = [n for n, t in named(build("mixed", 1)).items() if not bytes_equal(t, named(build("mixed", 2))[n])]
    assert set(names) <= set(differing) and len(names) >= len(differing) - 1  # the tied alias moves once


def test_a_relay_passes_its_origins_digests_on(source):
    origin = source("mixed", seed=1)
    middle = build("mixed", None)
    first = netloader.load_weights(middle, [origin.address], model_id="test-model", progress=False, verify=True)
    assert first.verified and first.digests is not None
    with netloader.WeightServer(middle, model_id="test-model", host="127.0.0.1", digests=first.digests) as relay:
        last = _load([relay.address])  # the default checks a relay's bytes
    assert last["ok"] and last["verified"] is True
    assert last["digests"] == first.digests.to_wire()


def _netloader(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netloader", *args], capture_output=True, text=True, env=ENV,
                          timeout=120, check=False)


def test_probe_verify_reports_a_tensor_changed_in_place(source):
    src = source("mixed", seed=1, token="t0k")
    assert _load([src.address], token="t0k")["ok"]  # its first load fixed the digests it serves
    clean = _netloader("probe", "--verify", src.address, "--token", "t0k")
    assert clean.returncode == 0, clean.stderr
    assert "0 of" in clean.stdout and "match" in clean.stdout
    src.flip("large_bfloat16")
    src.flip("scalar")
    changed = _netloader("probe", "--verify", src.address, "--token", "t0k")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert "large_bfloat16" in changed.stdout and "scalar" in changed.stdout and "2 of" in changed.stdout
    wrong = _netloader("probe", "--verify", src.address, "--token", "nope")
    assert wrong.returncode == 2 and "AuthenticationError" in wrong.stderr


# ---------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("algorithm", ["xxh3-64", "sum64"])
def test_a_digest_sees_one_flipped_bit_anywhere_and_ignores_strides(algorithm):
    base = torch.arange(4099, dtype=torch.int32).to(torch.uint8)  # not a multiple of 4 bytes: byte words
    words = torch.arange(1 << 12, dtype=torch.float32)  # 32-bit words
    for t in (base, words):
        d = tensor_digest(t, algorithm)
        raw = t.view(torch.uint8)
        for at in (0, 1, raw.numel() // 2, raw.numel() - 1):
            for bit in (0, 7):
                raw[at] ^= 1 << bit
                assert tensor_digest(t, algorithm) != d, (at, bit)
                raw[at] ^= 1 << bit
        assert tensor_digest(t, algorithm) == d
    swapped = words.clone()
    swapped[[3, 9]] = swapped[[9, 3]]
    assert tensor_digest(swapped, algorithm) != tensor_digest(words, algorithm)
    matrix = torch.randn(64, 48)
    assert tensor_digest(matrix.t().contiguous(), algorithm) == tensor_digest(matrix.t(), algorithm)
    assert tensor_digest(torch.empty(0, 3), algorithm) != tensor_digest(torch.zeros(1), algorithm)


def test_digests_are_validated_before_use():
    tensors = TensorSet(build("mixed", 1))
    digests = digests_of(tensors)
    wire = digests.to_wire()
    assert Digests.from_wire(wire["algorithm"], wire["values"], tensors.manifest) == digests
    with pytest.raises(ProtocolError, match="digests for"):
        Digests.from_wire("xxh3-64", wire["values"][:-1], tensors.manifest)
    with pytest.raises(ProtocolError, match="algorithm"):
        Digests.from_wire("md5", wire["values"], tensors.manifest)
    manifest = {"type": "manifest", "tensors": tensors.manifest.to_wire(), "total_bytes": 1,
                "plan": {"bucket_size": 1 << 20, "direct_threshold": 1 << 20, "chunk_size": 1 << 20}}
    for bad in ({"algorithm": "xxh3-64", "values": ["xyz"]}, {"algorithm": "xxh3-64", "values": ["0" * 17]},
                {"algorithm": "crc", "values": []}, None):
        with pytest.raises(ProtocolError):
            P.decode(P.encode_trusted({**manifest, "digests": bad})[4:])
    with pytest.raises(ConfigError, match="digests"):
        netloader.WeightServer(build("mixed", 1), model_id="m", digests=Digests("xxh3-64", digests.values[:-1]))
    with pytest.raises(ConfigError, match="verify"):
        netloader.load_weights(build("mixed", None), ["127.0.0.1:1"], model_id="m", verify="yes")  # type: ignore


def test_the_verifier_checks_each_tensor_once_its_last_message_is_in_place():
    source = TensorSet(build("mixed", 1))
    digests = digests_of(source)
    target = TensorSet(build("mixed", None))
    plan = make_plan(target.manifest, PlanParams(bucket_size=1 << 16, direct_threshold=1 << 15, chunk_size=1 << 16))
    verified: dict[int, int] = {}
    verifier = Verifier(plan, target, digests, set(), verified)
    verifier.start()  # only the zero-byte tensor is whole before any message
    assert verifier.bad == [] and len(verified) == 1
    for i in range(len(plan.ops)):  # every tensor still zero when its last message "lands": all bad
        verifier.on_op(i)
    assert not verifier.complete and set(verifier.bad) == set(range(len(target.tensors))) - set(verified)
    for src, dst in zip(source.tensors, target.tensors, strict=True):
        dst.copy_(src)
    assert mismatches(target, digests) == []
    covering = ops_covering(plan, [0])
    assert covering and all(any(s.index == 0 for s in plan.ops[i].segments) for i in covering)


def test_a_source_runs_one_verify_at_a_time_and_says_when_its_digests_are_new():
    model = build("mixed", 1)
    with netloader.WeightServer(model, model_id="test-model", host="127.0.0.1", token="t") as server:
        first = netloader.verify_source(server.address, token="t")  # no load served yet: computed by this request
        assert first.computed_now and first.mismatches == 0 and first.tensors == len(server.tensors.tensors)
        again = netloader.verify_source(server.address, token="t")
        assert not again.computed_now and again.mismatches == 0
        busy = pytest.raises(netloader.BusyError, match="verify is already running")
        with server._transfers._verify_lock, busy:  # as if a verify were running
            netloader.verify_source(server.address, token="t")
        with torch.no_grad():
            named(model)["small_float16"].view(-1)[0] += 1
        changed = netloader.verify_source(server.address, token="t")
        assert changed.mismatches == 1 and changed.names == ["small_float16"]


def _distinct_names(kind: str) -> list[str]:
    """One name per tensor storage (flipping a tied alias's bit twice would undo it)."""
    seen: set[int] = set()
    names = []
    for name, t in named(build(kind, 1)).items():
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            names.append(name)
    return names


def test_a_striped_load_drops_a_corrupting_source_and_ends_bit_exact_from_the_others(source):
    every = _distinct_names("llama48")
    bad = source("llama48", seed=1, corrupt=every)  # every message it sends carries a flipped bit
    # relays (checked by default), slower than the corrupting one so that it surely sends some of the tensors
    good = [source("llama48", seed=1, digests_seed=1, max_rate=300e6) for _ in range(2)]
    out = client_result(spawn_client({"model": "llama48", "expect_seed": 1, "model_id": "test-model",
                                      "sources": [bad.address] + [g.address for g in good], "max_sources": 3}))
    assert out["ok"], out  # client_proc compared every tensor with the seed's bytes
    assert out["verified"] is True and out["by_source"].get(bad.address, 0) > 0
    total = sum(t.numel() * t.element_size() for t in TensorSet(build("llama48", 1)).tensors)
    assert out["bytes"] > total  # what it sent was found bad and fetched again
    # a tensor it sent whole is pinned on it (and it is dropped); one it sent a piece of is fetched again whole from
    # one source, which pins it on the corrupting source if that one sends it again
    assert set(out["corrupt"]) <= {bad.address}, out["corrupt"]
    if out["corrupt"]:
        assert set(out["corrupt"][bad.address]) <= set(every)
        assert out["failures"][bad.address].startswith("IntegrityError")
    assert all(out["by_source"].get(g.address, 0) > 0 for g in good)


def test_a_striped_load_with_only_corrupting_sources_fails_with_an_integrity_error(source):
    bad = [source("llama48", seed=1, corrupt=_distinct_names("llama48")) for _ in range(2)]
    out = client_result(spawn_client({"model": "llama48", "expect_seed": 1, "model_id": "test-model",
                                      "sources": [b.address for b in bad], "max_sources": 2}))
    assert not out["ok"] and out["error"].startswith("IntegrityError: ") and "must not be used" in out["error"]
    assert set(out["corrupt"]) == {b.address for b in bad}


def test_a_striped_load_refuses_a_source_offering_other_digests(source):
    origin = source("mixed", seed=1)
    other = source("mixed", seed=1, digests_seed=2)  # the same identity, but its origin held other weights
    out = client_result(spawn_client({"model": "mixed", "expect_seed": 1, "model_id": "test-model",
                                      "sources": [origin.address, other.address], "max_sources": 2, "verify": True}))
    # whichever answers first sets the digests of the load; the other is refused before sending a byte. Then only
    # the bytes that match the origin's digests are kept: from the origin (bit-exact), or from none (a clean error)
    if out["ok"]:
        assert out["verified"] is True and out["by_source"].get(other.address, 0) == 0
        if other.address in out["failures"]:
            assert "other origin digests" in out["failures"][other.address]
    else:
        assert out["error"].startswith("IntegrityError: ") and list(out["corrupt"]) == [other.address], out


def test_the_striped_verifier_pins_bad_bytes_on_their_only_sender_and_refetches_a_mixed_tensor_whole():
    from netloader.stripe import WorkPool

    source_set = TensorSet(build("mixed", 1))
    digests = digests_of(source_set)
    target = TensorSet(build("mixed", None))
    plan = make_plan(target.manifest, PlanParams(bucket_size=1 << 16, direct_threshold=1 << 15, chunk_size=1 << 16))
    for src, dst in zip(source_set.tensors, target.tensors, strict=True):
        dst.copy_(src)
    large = next(i for i, t in enumerate(target.tensors) if len(ops_covering(plan, [i])) > 1)
    with torch.no_grad():
        target.tensors[large].view(-1).view(torch.uint8)[0] ^= 1
    verifier = StripedVerifier(plan, target, digests)
    covering = sorted(ops_covering(plan, [large]))
    bad: list[int] = []
    for i in range(len(plan.ops)):  # the large tensor's first message from "a", the rest from "b"
        bad += verifier.on_op(i, "a" if i == covering[0] or i not in covering else "b")
        assert not verifier.complete
    assert bad == [large]  # found when its last message landed, every other tensor matches
    senders, ops = verifier.blame(large)
    assert senders == {"a", "b"} and sorted(ops) == covering and not verifier.complete
    pool = WorkPool(plan, [], 1 << 20, lambda _: False)
    pool.again(ops, whole=True)
    assert pool.take() == covering and not pool.finished  # one unit: one source sends the whole tensor
    for i in covering:  # "b" sends it all again, still bad: now it is pinned on "b" alone
        bad = verifier.on_op(i, "b")
    assert bad == [large] and verifier.blame(large)[0] == {"b"}
    with torch.no_grad():
        target.tensors[large].copy_(source_set.tensors[large])
    for i in covering:
        bad = verifier.on_op(i, "c")
    assert bad == [] and verifier.complete
