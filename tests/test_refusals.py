"""Nothing moves until both sides agree: every refusal leaves the target untouched and says why."""

from __future__ import annotations

import pytest
import torch

import netloader
from models import build, named
from netloader.synthetic import bytes_equal


def _snapshot(model: object) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in named(model).items()}  # type: ignore[arg-type]


def _unchanged(model: object, snapshot: dict[str, torch.Tensor]) -> bool:
    return all(bytes_equal(t, snapshot[n]) for n, t in named(model).items())  # type: ignore[arg-type]


def _refused(model: object, address: str, **kwargs: object) -> BaseException:
    with pytest.raises(netloader.NoSourceError) as info:
        netloader.load_weights(model, [address], **{"model_id": "test-model", **kwargs})  # type: ignore[arg-type]
    failure = info.value.failures[address]
    assert address in str(info.value)
    return failure


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One source for all identity and manifest refusals: model 'test-model', rank 1, layout tp=2/pp=1."""
    import json
    import subprocess
    import sys

    from conftest import ENV, HERE, Source, _readline

    log = tmp_path_factory.mktemp("refusals") / "source.log"
    spec = {"model": "mixed", "seed": 21, "model_id": "test-model", "rank": 1, "layout": {"tp": 2, "pp": 1}}
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, str(HERE / "source_proc.py"), json.dumps(spec)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
    src = Source(proc, json.loads(_readline(proc, 120))["address"], log)
    yield src
    src.stop()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"model_id": "other-model", "rank": 1, "layout": {"tp": 2, "pp": 1}}, ["model_id", "other-model"]),
        ({"rank": 0, "layout": {"tp": 2, "pp": 1}}, ["rank 0", "rank 1"]),
        ({"rank": 1, "layout": {"tp": 4, "pp": 1}}, ["layout", "'tp': 4", "'tp': 2"]),
        ({"rank": 1}, ["layout"]),
    ],
    ids=["model_id", "rank", "layout-value", "layout-missing"],
)
def test_identity_mismatch_is_refused_and_target_untouched(served, kwargs, words):
    model = build("mixed", 5)
    snap = _snapshot(model)
    failure = _refused(model, served.address, **kwargs)
    assert isinstance(failure, netloader.IdentityMismatchError)
    for word in words:
        assert word in str(failure)
    assert _unchanged(model, snap)


@pytest.mark.parametrize(
    ("variant", "words"),
    [
        ("shape", ["'scalar'", "shape [1] here vs [] at source"]),
        ("dtype", ["'steps'", "dtype int32 here vs int64 at source"]),
        ("extra", ["'extra'", "extra here"]),
        ("untied", ["'head.weight'", "tied to"]),
    ],
)
def test_manifest_mismatch_names_the_tensor_and_what_differs(served, variant, words):
    model = build("mixed", 5, variant)
    snap = _snapshot(model)
    failure = _refused(model, served.address, rank=1, layout={"tp": 2, "pp": 1})
    assert isinstance(failure, netloader.ManifestMismatchError)
    for word in words:
        assert word in str(failure)
    assert failure.differences
    assert _unchanged(model, snap)


def test_missing_tensor_is_named(served):
    model = build("mixed", 5)
    del model.cache  # a buffer the source has
    snap = _snapshot(model)
    failure = _refused(model, served.address, rank=1, layout={"tp": 2, "pp": 1})
    assert isinstance(failure, netloader.ManifestMismatchError)
    assert "'cache': missing here (source has float16[4, 16])" in str(failure)
    assert _unchanged(model, snap)


def test_order_difference_is_named(served):
    tensors = named(build("mixed", 5))
    names = list(tensors)
    names[0], names[1] = names[1], names[0]
    reordered = {n: tensors[n] for n in names}
    failure = _refused(reordered, served.address, rank=1, layout={"tp": 2, "pp": 1})
    assert isinstance(failure, netloader.ManifestMismatchError)
    assert "order differs at position 0" in str(failure)


def test_unsupported_device_is_a_config_error_before_any_connection(served):
    # a model on the meta device has no data plane: a ConfigError, not a per-source failure
    with pytest.raises(netloader.ConfigError, match="meta"):
        netloader.load_weights({"w": torch.empty(2, device="meta")}, [served.address], model_id="test-model")


def test_the_server_survives_refusals_and_then_serves(served):
    model = build("mixed", None)
    netloader.load_weights(model, [served.address], model_id="test-model", rank=1, layout={"tp": 2, "pp": 1})
    expected = named(build("mixed", 21))
    assert all(bytes_equal(t, expected[n]) for n, t in named(model).items())


# ---------------------------------------------------------------------------------------------- authentication


def test_wrong_token_is_refused_and_target_untouched(source):
    src = source("mixed", seed=3, token="s3cret")
    model = build("mixed", 5)
    snap = _snapshot(model)
    failure = _refused(model, src.address, token="wrong")
    assert isinstance(failure, netloader.AuthenticationError)
    assert _unchanged(model, snap)
    assert "authentication from" in src.log_text()  # the source logs the refusal
    assert "s3cret" not in src.log_text() and "s3cret" not in str(failure)


def test_missing_token_is_refused(source):
    src = source("mixed", seed=3, token="s3cret")
    model = build("mixed", 5)
    failure = _refused(model, src.address)
    assert isinstance(failure, netloader.AuthenticationError)
    assert "requires a token" in str(failure)


def test_client_with_token_does_not_trust_a_source_without_one(source):
    src = source("mixed", seed=3)
    assert "has no token" in src.log_text()  # a source without a token warns
    model = build("mixed", 5)
    snap = _snapshot(model)
    failure = _refused(model, src.address, token="s3cret")
    assert isinstance(failure, netloader.AuthenticationError)
    assert _unchanged(model, snap)


def test_right_token_loads(source):
    src = source("mixed", seed=3, token="s3cret")
    model = build("mixed", None)
    netloader.load_weights(model, [src.address], model_id="test-model", token="s3cret")
    expected = named(build("mixed", 3))
    assert all(bytes_equal(t, expected[n]) for n, t in named(model).items())
    src.idle_stats()  # load_weights returns once `done` is sent; the source counts the transfer when it reads it
    info = netloader.probe(src.address, token="s3cret")
    assert info.transfers_served == 1
    with pytest.raises(netloader.AuthenticationError):
        netloader.probe(src.address, token="nope")
