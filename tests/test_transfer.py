"""Bit-exact transfers between real processes over real gloo groups."""

from __future__ import annotations

import threading

import pytest
import torch

import netloader
from conftest import client_result, spawn_client
from models import DTYPES, build, named
from netloader.synthetic import DEMO_SHAPE, bytes_equal


def _assert_equal_to_seed(model: object, kind: str, seed: int) -> None:
    expected = named(build(kind, seed))
    got = named(model)  # type: ignore[arg-type]
    assert got.keys() == expected.keys()
    bad = [n for n in got if not bytes_equal(got[n], expected[n])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"


def _storage_facts(model: object) -> dict[str, tuple[object, ...]]:
    return {n: (t.data_ptr(), t.dtype, t.device, tuple(t.shape), tuple(t.stride())) for n, t in named(model).items()}


@pytest.mark.parametrize(
    "server_kwargs",
    [
        {},
        # small buckets and chunks: every large tensor, contiguous or not, arrives in several messages
        {"bucket_size": 64 * 1024, "chunk_size": 128 * 1024},
    ],
    ids=["default-plan", "small-buckets-and-chunks"],
)
def test_every_dtype_noncontiguous_scalar_empty_tied_and_buffers_arrive_bit_exact(source, server_kwargs):
    src = source("mixed", seed=7, **server_kwargs)
    model = build("mixed", None)
    before = _storage_facts(model)
    report = netloader.load_weights(model, [src.address], model_id="test-model")

    _assert_equal_to_seed(model, "mixed", 7)
    # written in place: same storage, dtype, device, shape and strides; ties stay tied
    assert _storage_facts(model) == before
    assert model.head.weight is model.embed.weight
    assert not model.noncontig_large.is_contiguous() and not model.noncontig_small.is_contiguous()
    assert {t.dtype for t in model.parameters()} >= set(DTYPES)
    assert model.scalar.dim() == 0 and model.empty.numel() == 0
    # the tied weight moved once
    assert report.bytes == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert report.source == src.address and report.seconds > 0 and report.throughput > 0


def test_mapping_of_tensors_and_ten_thousand_small_tensors(source):
    src = source("many", seed=3, bucket_size=1 << 20)
    target = build("many", None)
    assert len(target) >= 10_000
    report = netloader.load_weights(target, [src.address], model_id="test-model")
    assert report.tensors == len(target)
    _assert_equal_to_seed(target, "many", 3)


def test_one_gib_llama_model(source):
    src = source("llama1024", seed=11)
    model = build("llama1024", None)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert nbytes >= 1 << 30
    assert DEMO_SHAPE.nbytes == nbytes
    report = netloader.load_weights(model, [src.address], model_id="test-model")
    assert report.bytes == nbytes
    _assert_equal_to_seed(model, "llama1024", 11)


def test_two_ranks_each_side_rank_i_loads_from_rank_i(source):
    layout = {"tp": 2, "pp": 1}
    sources = [source("mixed", seed=100 + r, rank=r, layout=layout) for r in range(2)]
    clients = [
        spawn_client({"model": "mixed", "expect_seed": 100 + r, "sources": [sources[r].address],
                      "model_id": "test-model", "rank": r, "layout": layout})
        for r in range(2)
    ]
    results = [client_result(c) for c in clients]
    for r, res in enumerate(results):
        assert res["ok"], res
        assert res["source"] == sources[r].address


def test_three_concurrent_clients_from_one_source(source):
    src = source("llama128", seed=5, max_concurrent=3)
    clients = [spawn_client({"model": "llama128", "expect_seed": 5, "sources": [src.address],
                             "model_id": "test-model"}) for _ in range(3)]
    results = [client_result(c) for c in clients]
    assert all(r["ok"] for r in results), results
    assert src.idle_stats()["served"] == 3
    assert src.log_text().count("netloader: served") == 3  # one log line per transfer


def test_on_progress_reports_every_byte_in_order(source):
    src = source("llama64", seed=2, chunk_size=1 << 20)
    model = build("llama64", None)
    seen: list[tuple[int, int]] = []
    caller = threading.get_ident()
    threads: set[int] = set()

    def on_progress(done: int, total: int) -> None:
        seen.append((done, total))
        threads.add(threading.get_ident())

    report = netloader.load_weights(model, [src.address], model_id="test-model", on_progress=on_progress)
    assert len(seen) > 10
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (report.bytes, report.bytes)
    assert threads == {caller}


def test_client_bucket_size_is_honoured_and_capped(source):
    src = source("many", seed=4, bucket_size=1 << 20)
    model = build("many", None)
    netloader.load_weights(model, [src.address], model_id="test-model", bucket_size=64 * 1024)
    _assert_equal_to_seed(model, "many", 4)
    model = build("many", None)
    netloader.load_weights(model, [src.address], model_id="test-model", bucket_size=1 << 30)  # capped by source
    _assert_equal_to_seed(model, "many", 4)


def test_serving_does_not_stop_the_owner(source):
    """The owner keeps computing while a transfer is served from background threads (in-process server)."""
    model = build("llama64", 9)
    with netloader.WeightServer(model, model_id="m", host="127.0.0.1") as server:
        done = threading.Event()
        ticks = 0

        def work() -> None:
            nonlocal ticks
            a = torch.randn(64, 64)
            while not done.is_set():
                a = (a @ a).tanh()
                ticks += 1

        worker = threading.Thread(target=work)
        worker.start()
        target = build("llama64", None)
        netloader.load_weights(target, [server.address], model_id="m")
        done.set()
        worker.join()
    assert ticks > 0
    _assert_equal_to_seed(target, "llama64", 9)


def test_gloo_transport_when_asked_for_and_offered(source):
    src = source("mixed", seed=7, transports=["streams", "gloo"], bucket_size=64 * 1024, chunk_size=128 * 1024)
    model = build("mixed", None)
    report = netloader.load_weights(model, [src.address], model_id="test-model", transport="gloo")
    assert report.transport == "gloo"
    _assert_equal_to_seed(model, "mixed", 7)
    again = build("mixed", None)
    assert netloader.load_weights(again, [src.address], model_id="test-model").transport == "streams"
    _assert_equal_to_seed(again, "mixed", 7)


def test_gloo_is_refused_by_a_source_that_does_not_offer_it(source):
    src = source("mixed", seed=7)
    with pytest.raises(netloader.NoSourceError) as info:
        netloader.load_weights(build("mixed", None), [src.address], model_id="test-model", transport="gloo")
    failure = info.value.failures[src.address]
    assert isinstance(failure, netloader.IdentityMismatchError) and "offers streams" in str(failure)
