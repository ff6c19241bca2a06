"""Discovery through a registry, on both backends: a real shared directory and a real redis-server.

Sources and clients are real processes (tests/source_proc.py, tests/client_proc.py); every load is checked bit for
bit. Records that the tests write by hand stand for hostile or broken publishers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import ENV, client_result, spawn_client
from netloader import Identity, NoSourceError
from netloader.registry import find_sources, identity_key, open_registry
from netloader.registry.base import model_key
from netloader.registry.redis import NAMESPACE
from redis_fixture import RedisServer, free_port, redis_server  # noqa: F401 - the fixture

FAST = {"registry_heartbeat": 0.5, "registry_ttl": 3.0}  # a killed source vanishes within 3 s


@dataclass
class Backend:
    kind: str
    url: str
    directory: Path | None = None
    server: RedisServer | None = None

    def down(self) -> None:
        """The registry becomes unusable: the redis-server is killed / the directory is replaced by a file."""
        if self.server is not None:
            self.server.stop()
        else:  # swapped atomically: a heartbeat in between would recreate the directory
            assert self.directory is not None
            blocker = self.directory.with_name("blocker")
            for attempt in range(20):
                blocker.write_text("not a directory")
                gone = self.directory.with_name(f"gone{attempt}")
                os.rename(self.directory, gone)
                try:
                    os.rename(blocker, self.directory)
                    return
                except OSError:
                    continue
            raise AssertionError("could not replace the registry directory")

    def up(self) -> None:
        if self.server is not None:
            self.server.start()
        else:
            assert self.directory is not None
            self.directory.unlink()
            self.directory.mkdir(exist_ok=True)

    def inject(self, identity: Identity, sid: str, data: bytes, *, expire_ms: int | None = 10_000) -> str:
        """Write ``data`` where a record of ``identity`` with source id ``sid`` lives; returns where."""
        ikey, mkey = identity_key(identity), model_key(identity.model_id)
        if self.directory is not None:
            path = self.directory / f"{mkey}-{ikey}-{sid}.json"
            path.write_bytes(data)
            return str(path)
        assert self.server is not None
        client = self.server.client()
        key = f"{NAMESPACE}:rec:{mkey}:{ikey}:{sid}"
        client.set(key, data, px=expire_ms)
        client.sadd(f"{NAMESPACE}:id:{ikey}", sid)
        client.sadd(f"{NAMESPACE}:model:{mkey}", ikey)
        client.close()
        return key


@pytest.fixture(params=["file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "file":
        directory = tmp_path / "registry"
        directory.mkdir()
        yield Backend("file", f"file://{directory}", directory=directory)
    else:
        server = request.getfixturevalue("redis_server")
        yield Backend("redis", server.url, server=server)


def load(url: str | None, *, sources: list[str] | None = None, expect_seed: int = 1, timeout: float = 30,
         **identity: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": "mixed", "expect_seed": expect_seed, "model_id": "test-model",
                            "timeout": timeout, **identity}
    if url is not None:
        spec["registry"] = url
    if sources is not None:
        spec["sources"] = sources
    return client_result(spawn_client(spec))


def addresses(url: str, **identity: Any) -> set[str]:
    with open_registry(url) as registry:
        return {live.record.address for live in registry.lookup(Identity.build(**identity))}


def wait_until(condition: Any, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def record_bytes(identity: Identity, address: str, **changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "source_id": "00000000000000aa", "model_id": identity.model_id, "rank": identity.rank,
        "layout": dict(identity.layout), "address": address, "state": "ready", "progress": 1.0,
        "active_transfers": 0, "max_concurrent": 4, "tensors": 1, "bytes": 1, "backend": "gloo", "auth": False,
        "version": "0.1.0", "started_at": time.time(), "heartbeat_at": time.time(), "ttl": 10.0,
    }
    fields.update(changes)
    return json.dumps(fields).encode()


# ---------------------------------------------------------------------------------------------------------------


def test_client_with_only_a_registry_loads_bit_exact(source, backend: Backend) -> None:
    src = source("mixed", seed=3, registry=backend.url, token="tok")
    result = load(backend.url, expect_seed=3, token="tok")
    assert result["ok"], result
    assert result["source"] == src.address
    # the record never holds the token
    with open_registry(backend.url) as registry:
        (live,) = registry.listing()
    assert live.record.auth is True and "tok" not in live.record.model_dump_json()


def test_closed_source_leaves_at_once_and_a_killed_one_within_ttl(source, backend: Backend) -> None:
    closed = source("mixed", seed=1, registry=backend.url, **FAST)
    killed = source("mixed", seed=1, registry=backend.url, **FAST)
    both = {closed.address, killed.address}
    assert wait_until(lambda: addresses(backend.url, model_id="test-model") == both)
    closed.stop()  # the process returns from close() before it exits: its record is gone now
    assert closed.address not in addresses(backend.url, model_id="test-model")
    killed.kill()
    started = time.monotonic()
    assert wait_until(lambda: not addresses(backend.url, model_id="test-model")), "a killed source stayed listed"
    print(f"{backend.kind}: a SIGKILLed source left the registry {time.monotonic() - started:.1f} s after the kill")
    if backend.directory is not None:
        assert list(backend.directory.iterdir()) == []  # the reader removed the dead record


def test_identity_isolation_other_model_rank_layout_or_role_is_never_offered(source, backend: Backend) -> None:
    tp2 = {"tp": 2, "dtype": "bfloat16", "role": "target"}
    wanted = {"model_id": "test-model", "rank": 0, "layout": tp2}
    others = [
        {"model_id": "other-model", "rank": 0, "layout": tp2},
        {"model_id": "test-model", "rank": 1, "layout": tp2},
        {"model_id": "test-model", "rank": 0, "layout": {**tp2, "tp": 1}},
        {"model_id": "test-model", "rank": 0, "layout": {**tp2, "role": "draft"}},
        {"model_id": "test-model", "rank": 0, "layout": {**tp2, "dtype": "float16"}},
    ]
    decoys = [source("mixed", seed=10 + n, registry=backend.url, **ident) for n, ident in enumerate(others)]
    mine = source("mixed", seed=5, registry=backend.url, **wanted)
    assert find_sources(backend.url, Identity.build(**wanted)) == [mine.address]
    for decoy, ident in zip(decoys, others, strict=True):
        assert find_sources(backend.url, Identity.build(**ident)) == [decoy.address]
    result = load(backend.url, expect_seed=5, **wanted)
    assert result["ok"] and result["source"] == mine.address, result
    # an identity nobody serves: the error names it and counts the sources of the same model_id
    mine.stop()
    with pytest.raises(NoSourceError) as err:
        find_sources(backend.url, Identity.build(**wanted))
    message = str(err.value)
    assert "has no live source of 'test-model' rank 0" in message
    assert "it has 4 live source(s) of 'test-model' with another rank or layout" in message, message
    result = load(backend.url, **wanted)
    assert not result["ok"] and result["error"].startswith("NoSourceError: registry"), result


def test_registry_down_never_stops_a_source_and_it_republishes_when_back(source, backend: Backend) -> None:
    src = source("mixed", seed=2, registry=backend.url, **FAST)
    backend.down()
    # the source keeps serving clients that know its address
    assert load(None, sources=[src.address], expect_seed=2)["ok"]
    # a client with only the registry gets a clear error within its timeout
    started = time.monotonic()
    result = load(backend.url, timeout=5)
    assert not result["ok"]
    assert result["error"].startswith("NoSourceError: no source given and the registry cannot be read"), result
    assert "RegistryError" in result["error"]
    print(f"{backend.kind}: a registry-only client failed after {time.monotonic() - started:.2f} s (process included)")
    # a source started while the registry is down starts and serves all the same
    late = source("mixed", seed=2, registry=backend.url, **FAST)
    assert load(None, sources=[late.address], expect_seed=2)["ok"]
    time.sleep(4 * FAST["registry_heartbeat"])  # a few failed heartbeats: logged once by each source
    backend.up()
    assert wait_until(lambda: addresses(backend.url, model_id="test-model") == {src.address, late.address})
    result = load(backend.url, expect_seed=2)
    assert result["ok"] and result["source"] in (src.address, late.address), result
    for proc in (src, late):
        log = proc.log_text()
        # one line when the registry went away (not one per heartbeat), one when it came back
        assert log.count("cannot publish") == log.count("published again") >= 1, log
    assert "Traceback" not in src.log_text()


def test_a_registry_that_hangs_never_stops_a_source_starting_serving_or_closing(
    source, redis_server: RedisServer  # noqa: F811
) -> None:
    """A real Redis that stops answering for a while (DEBUG SLEEP), and an endpoint that accepts connections and
    never answers: every registry call gives up after its deadline; sources start, serve and close all the same."""
    src = source("mixed", seed=2, registry=redis_server.url, **FAST)
    client = redis.Redis(port=redis_server.port, socket_timeout=60)
    hang = threading.Thread(target=client.execute_command, args=("DEBUG", "SLEEP", "15"))
    hang.start()
    try:
        time.sleep(0.5)
        assert load(None, sources=[src.address], expect_seed=2)["ok"]
        src.stop()  # returns although the registry does not answer
        assert src.proc.returncode == 0
    finally:
        hang.join()
        client.close()
    # its record could not be removed: it expires by itself
    assert wait_until(lambda: not addresses(redis_server.url, model_id="test-model"))
    assert "did not answer" in src.log_text()

    stuck = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        late = source("mixed", seed=2, registry=f"redis://127.0.0.1:{stuck.getsockname()[1]}/0", **FAST)
        assert load(None, sources=[late.address], expect_seed=2)["ok"]
        late.stop()
        assert late.proc.returncode == 0
        log = late.log_text()
        assert log.count("cannot publish") == 1 and "did not answer" in log, log
    finally:
        stuck.close()


def test_hostile_records_never_crash_or_hang_a_client(source, backend: Backend) -> None:
    identity = Identity.build("test-model", 0, {})
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never speaks netloader
    silent_address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        hostile = {
            "01": b"\x00\xff garbage {{{",
            "02": b"[" * 100_000,  # deeply nested
            "03": record_bytes(identity, "127.0.0.1:1", padding="x" * 200_000),  # huge
            "04": record_bytes(identity, "127.0.0.1:1", rank="0"),  # wrong type
            "05": record_bytes(identity, "127.0.0.1:1", layout=[1, 2]),
            "06": record_bytes(identity, "127.0.0.1:1", token="leaked"),  # unknown field
            "07": record_bytes(identity, "not an address"),
            "08": record_bytes(identity, "127.0.0.1:1", state="exploding"),
            "09": record_bytes(Identity.build("test-model", 1, {}), "127.0.0.1:1"),  # filed under the wrong key
            "10": record_bytes(identity, silent_address),  # valid, but not a netloader source
            "11": b"",
        }
        for n, data in hostile.items():
            sid = f"{int(n):016x}"
            if n == "10":  # lives as long as a record may: the real source below may take a while to start
                data = record_bytes(identity, silent_address, source_id=sid, ttl=300.0)
            backend.inject(identity, sid, data, expire_ms=300_000)
        if backend.directory is not None:
            os.mkfifo(backend.directory / f"{model_key('test-model')}-{identity_key(identity)}-{'f' * 16}.json")
            os.symlink("/dev/zero", backend.directory / f"{model_key('test-model')}-{identity_key(identity)}-"
                                                       f"{'e' * 16}.json")
        else:
            client = backend.server.client()  # type: ignore[union-attr]
            ikey = identity_key(identity)
            client.rpush(f"{NAMESPACE}:rec:{model_key('test-model')}:{ikey}:{'f' * 16}", "a list")
            client.sadd(f"{NAMESPACE}:id:{ikey}", "f" * 16, "../../etc", "x" * 5000)
            client.close()
        # a reader skips all of it and offers the one valid record, without raising
        assert addresses(backend.url, model_id="test-model") == {silent_address}
        real = source("mixed", seed=4, registry=backend.url)
        assert addresses(backend.url, model_id="test-model") == {silent_address, real.address}
        started = time.monotonic()
        result = load(backend.url, expect_seed=4, timeout=5)
        assert result["ok"] and result["source"] == real.address, result
        print(f"{backend.kind}: loaded past the hostile records in {time.monotonic() - started:.2f} s")
        assert real.stats()["served"] == 1
    finally:
        silent.close()


def test_a_record_never_refreshed_expires_whatever_it_claims(backend: Backend) -> None:
    identity = Identity.build("test-model", 0, {"tp": 1})
    far = time.time() + 10**9
    honest = backend.inject(identity, "a" * 16, record_bytes(identity, "127.0.0.1:7001", source_id="a" * 16,
                                                               ttl=2.0), expire_ms=2000)
    backend.inject(identity, "b" * 16, record_bytes(identity, "127.0.0.1:7002", source_id="b" * 16,
                                                     heartbeat_at=far, ttl=300.0), expire_ms=300_000)
    if backend.directory is not None:  # a modification time far in the future
        path = backend.inject(identity, "c" * 16, record_bytes(identity, "127.0.0.1:7003", source_id="c" * 16))
        os.utime(path, (far, far))
    else:  # a key that never expires, and one that outlives its record's ttl
        backend.inject(identity, "c" * 16, record_bytes(identity, "127.0.0.1:7003", source_id="c" * 16),
                       expire_ms=None)
        backend.inject(identity, "d" * 16, record_bytes(identity, "127.0.0.1:7004", source_id="d" * 16, ttl=5.0),
                       expire_ms=10**9)
    got = addresses(backend.url, **identity.to_wire())
    assert got <= {"127.0.0.1:7001"}  # only the honest one, while its ttl lasts
    assert wait_until(lambda: not addresses(backend.url, **identity.to_wire()), timeout=30)
    if backend.directory is not None:
        assert not Path(honest).exists()  # dead: removed by the reader


def test_bad_registry_urls_are_config_errors_and_passwords_are_never_shown(tmp_path: Path) -> None:
    from netloader import ConfigError, load_weights

    for url in ("http://example/x", "file://relative/dir", "redis://", "registry", "redis://h:notaport/0"):
        with pytest.raises(ConfigError):
            open_registry(url)
    # rediss:// goes through the redis client's TLS connection (no TLS server here to talk to)
    from redis.connection import SSLConnection

    tls = open_registry("rediss://:pw@registry.example:6380/2")
    assert tls._client.connection_pool.connection_class is SSLConnection  # type: ignore[attr-defined]
    assert tls.url == "rediss://:***@registry.example:6380/2"
    dead = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(NoSourceError) as err:
        load_weights({}, registry=dead, model_id="m", timeout=3)
    assert "hunter2" not in str(err.value) and ":***@127.0.0.1" in str(err.value)


def test_cli_lists_live_sources(source, backend: Backend) -> None:
    a = source("mixed", seed=1, registry=backend.url, rank=1, layout={"tp": 2, "role": "target"})
    source("mixed", seed=1, registry=backend.url, model_id="other-model")
    run = [sys.executable, "-m", "netloader", "sources", "--registry", backend.url]
    out = subprocess.run([*run, "--model-id", "test-model"], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["MODEL", "RANK", "LAYOUT", "ADDRESS"]
    assert len(lines) == 2 and a.address in lines[1] and "role=target,tp=2" in lines[1] and "ready" in lines[1]
    assert "0/4" in lines[1]
    raw = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, env=ENV, timeout=120).stdout)
    assert {r["model_id"] for r in raw} == {"test-model", "other-model"}
    assert all(0 <= r["age"] < 60 for r in raw)
    bad = subprocess.run([*run[:-1], "ftp://x"], capture_output=True, text=True, env=ENV, timeout=120)
    assert bad.returncode == 2 and "ConfigError" in bad.stderr and "Traceback" not in bad.stderr
