"""The fault-injection suite: every fault a fleet sees, injected into real loads on emulated hosts.

Each test builds its own switch and hosts (:mod:`netloader.testing.hosts`: network namespaces on a bridge, links
rate-limited both ways; a machine where that is impossible fails these tests with the reason, it does not skip
them), starts real source, relay and client processes (tests/source_proc.py, relay_proc.py, client_proc.py) and
breaks something mid-load. Every load must end bit-exact (the client compares every tensor with the origin's
bytes) or with a clean :class:`~netloader.NetloaderError` of the expected type; a dead or silent peer must be
given up within ``heartbeat_timeout`` plus :data:`SLACK`; survivors (sources, relays, clients) must be back to
their thread and file-descriptor counts, which each process counts itself (``/proc/self/fd``).

Every run is recorded in tests/faultlog.py; the table (fault, runs, bit-exact, clean errors, worst time to
notice) is printed at the end of the pytest run. Where several runs of a fault are independent they run side by
side in one test (a process's start, mostly importing torch, is what takes time here).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import netloader
from conftest import Source
from faultlog import record
from hostprocs import Relay, ready, result, start_client, start_relay, start_source, wait_mark
from models import build, named
from netloader.testing.hosts import Host, Network
from netloader.testing.lossy import LossyLink
from redis_fixture import RedisServer

KIND = "mib96"  # 106 MiB: ~2.2 s over a 400 Mbit/s link
MODEL_ID = "faults"
RATE = 400
#: liveness faults are given up after this long (the smallest value is 2 s: twice the heartbeat interval)
HEARTBEAT = 3.0
#: what "nothing waits longer than heartbeat_timeout" allows on top of it: the heartbeat check runs once a second
#: and this 2-core machine is shared with other test runs (a process is not scheduled the moment it could run)
SLACK = 4.0
#: the data timeout, far above the heartbeat timeout: giving up well before it shows the heartbeat did it
TIMEOUT = 120.0
#: 1 MiB messages: a fault can land at any of ~100 of them
PLAN = {"bucket_size": 1 << 20, "chunk_size": 1 << 20}
#: cuts of a flapping link (each followed by a heal): TCP's retransmission backoff makes each cost ~1 s
FLAPS = 4


def _total(kind: str = KIND) -> int:
    return sum(t.numel() * t.element_size() for t in named(build(kind, None)).values())


def _source(on: Host, tmp_path: Path, wait: bool = False, **kwargs: Any) -> Source:
    spec = {"model": KIND, "seed": 1, "model_id": MODEL_ID, "heartbeat_timeout": HEARTBEAT, "timeout": TIMEOUT,
            **PLAN, **kwargs}
    return start_source(on, tmp_path, spec, wait=wait)


def _client(host: Host, sources: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    spec = {"model": KIND, "expect_seed": 1, "sources": sources, "model_id": MODEL_ID, "timeout": TIMEOUT,
            "heartbeat_timeout": HEARTBEAT, "leaks": True, **kwargs}
    return start_client(host, spec)


def _clean(error: str, *expected: type[netloader.NetloaderError]) -> bool:
    """Whether a client's ``error`` ("Type: message") is one of the ``expected`` NetloaderError types."""
    name = error.split(":", 1)[0]
    cls = getattr(netloader, name, None)
    return isinstance(cls, type) and issubclass(cls, expected)


def _no_leak(out: dict[str, Any]) -> None:
    """The client process's own counts after the load (once settled) are back to those before it."""
    before, after = out["before"], out["after"]
    assert after["threads"] <= before["threads"] and after["fds"] <= before["fds"], (before, after)


def _settled(server: Source, baseline: dict[str, int]) -> None:
    """The server (source or relay) process is back to its baseline threads, fds, connections and transfers."""
    stats = server.settled_stats(baseline, timeout=30)
    for key in ("threads", "fds", "connections", "active"):
        assert stats[key] <= baseline[key], (key, baseline, stats)


def _wait_for(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``predicate`` held (polled every 0.1 s), None if it did not within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def _logged_at(server: Source, needle: str, timeout: float = 60) -> float | None:
    """Wall-clock time of the first line of ``server``'s log that contains ``needle`` (waiting for it up to
    ``timeout``), None if none does: when the server noticed something, to the millisecond."""
    deadline = time.monotonic() + timeout
    while True:
        for line in server.log_text().splitlines():
            if needle in line:
                stamp, _, millis = line[:23].partition(",")
                return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def _in_parallel(*jobs: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]


def _given_up(out: dict[str, Any], source: str, since: float) -> float:
    """Seconds from the fault (wall clock ``since``) until the client gave ``source`` up; checked against the
    heartbeat timeout."""
    noticed = out["failed_at"][source] - since
    assert noticed < HEARTBEAT + SLACK, f"gave {source} up after {noticed:.2f} s (heartbeat_timeout {HEARTBEAT:g} s)"
    return noticed


# ------------------------------------------------------------------------------------------ partitions


def test_partition_that_heals_and_one_that_lasts(net: Network, tmp_path: Path) -> None:
    """Two loads side by side. One source's link is cut for 1 s (less than heartbeat_timeout) and healed: its
    load goes on from the same source, nothing given up. The other's stays cut: its client gives it up within
    heartbeat_timeout (TCP_INFO says unacknowledged: "partitioned"), resumes from the backup with what it had;
    the cut source drops its silent client by itself and frees the slot while still cut."""
    healed_host, cut_host, backup_host = (net.add_host(n, rate_mbit=RATE) for n in ("healed", "cut", "backup"))
    healed, cut, backup = (_source(h, tmp_path) for h in (healed_host, cut_host, backup_host))
    ready(healed, cut, backup)
    baselines = {s.address: s.stats() for s in (healed, cut, backup)}
    total = _total()

    short_host, long_host = net.add_host("c1"), net.add_host("c2")  # hosts are added from one thread only

    def heals() -> dict[str, Any]:
        client = _client(short_host, [healed.address, backup.address], mark_at=0.3)
        wait_mark(client)
        net.cut(healed_host)
        time.sleep(1.0)
        net.heal(healed_host)
        return result(client)

    def lasts() -> tuple[dict[str, Any], float, float | None]:
        client = _client(long_host, [cut.address, backup.address], mark_at=0.3)
        wait_mark(client)
        net.cut(cut_host)
        cut_at = time.time()
        out = result(client)
        # the link still cut: only the source's own heartbeat check can end its transfer to the silent client
        freed = _logged_at(cut, f"connection from {long_host.address}")
        return out, cut_at, None if freed is None else freed - cut_at

    short, (long, cut_at, freed_after) = _in_parallel(heals, lasts)

    record("partition healed in 1 s (< heartbeat_timeout)", bit_exact=short["ok"],
           detail="not given up: the same source finishes")
    assert short["ok"], short
    assert short["source"] == healed.address and short["failures"] == {}, short
    _no_leak(short)

    noticed = long["failed_at"].get(cut.address, float("inf")) - cut_at
    dropped = "-" if freed_after is None else f"{freed_after:.2f} s"
    record("partition longer than heartbeat_timeout", bit_exact=long["ok"],
           noticed=max(noticed, float("inf") if freed_after is None else freed_after),
           detail=f"client gives the source up in {noticed:.2f} s, the source drops its client in {dropped}")
    assert long["ok"], long
    assert long["source"] == backup.address
    error = long["failures"][cut.address]
    assert "stopped answering" in error and "partitioned" in error, error
    _given_up(long, cut.address, cut_at)
    assert long["resumed_bytes"] >= 0.2 * total  # what arrived before the cut was kept
    assert long["resumed_bytes"] + long["bytes"] == total
    _no_leak(long)
    # the cut source dropped its silent client by itself (the link still cut), within its heartbeat timeout
    assert freed_after is not None and freed_after < HEARTBEAT + SLACK, freed_after
    assert "stopped answering" in cut.log_text() and _wait_for(lambda: cut.stats()["active"] == 0, 30) is not None
    net.heal(cut_host)
    for server in (healed, cut, backup):
        _settled(server, baselines[server.address])


def test_a_link_that_flaps(net: Network, tmp_path: Path) -> None:
    """Two loads side by side (seeds 1 and 2), each source's link cut and healed again and again (0.2-0.8 s each,
    at random; FLAPS cuts, or fewer if the load ends first): it ends bit-exact, from the flapping source or (given
    up) the backup."""
    backup = _source(net.add_host("backup", rate_mbit=RATE), tmp_path)
    flapping = [net.add_host(f"flap{seed}", rate_mbit=RATE) for seed in (1, 2)]
    sources = [_source(h, tmp_path) for h in flapping]
    ready(backup, *sources)
    baselines = {s.address: s.stats() for s in (backup, *sources)}
    clients = [net.add_host(f"c{seed}") for seed in (1, 2)]  # hosts are added from one thread only

    def flap(seed: int) -> tuple[dict[str, Any], int]:
        host, src = flapping[seed - 1], sources[seed - 1]
        rng = random.Random(seed)
        client = _client(clients[seed - 1], [src.address, backup.address], mark_at=0.1)
        wait_mark(client)
        cuts = 0
        while client.poll() is None and cuts < FLAPS:
            net.cut(host)
            cuts += 1
            time.sleep(rng.uniform(0.2, 0.8))
            net.heal(host)
            time.sleep(rng.uniform(0.2, 0.8))
        return result(client), cuts

    runs = _in_parallel(lambda: flap(1), lambda: flap(2))
    for (out, cuts), src in zip(runs, sources, strict=True):
        record(f"link flapping ({FLAPS} cuts of 0.2-0.8 s)", bit_exact=out["ok"],
               detail="either the same source finishes or it is given up")
        assert out["ok"], out
        assert cuts >= 2, cuts  # the load really was interrupted, more than once
        if src.address in out["failures"]:  # given up during a long cut: the backup finished it
            assert "stopped answering" in out["failures"][src.address], out["failures"]
            assert out["source"] == backup.address
        _no_leak(out)
    for server in (backup, *sources):
        _settled(server, baselines[server.address])


def test_packet_loss_and_delay(net: Network, tmp_path: Path) -> None:
    """Two loads side by side, each over its own lossy link (netloader.testing.lossy: TAP devices and a frame
    forwarder; the kernel has no netem): 1% and 2% of frames dropped, each way, every frame delayed 20 ms.
    TCP retransmits what was lost; the loads end bit-exact, nothing is given up."""
    runs = []
    for seed, loss in ((1, 0.01), (2, 0.02)):
        a, b = net.add_host(f"src{seed}"), net.add_host(f"dst{seed}")
        link = LossyLink(a, b, loss=loss, delay=0.02, seed=seed)
        runs.append((link, b, _source(a, tmp_path, host=link.address(a))))
    ready(*(src for _, _, src in runs))
    baselines = [src.stats() for _, _, src in runs]
    clients = [_client(b, [src.address]) for _, b, src in runs]
    outs = [result(c) for c in clients]
    for (link, _, src), out, baseline in zip(runs, outs, baselines, strict=True):
        _settled(src, baseline)
        link.close()
        record(f"packet loss {link.loss:.0%} + {link.delay * 1e3:.0f} ms delay", bit_exact=out["ok"],
               detail=f"{link.counts.get('dropped', 0)} of {sum(link.counts.values())} frames dropped, "
                      f"{out.get('seconds', 0):.1f} s")
        assert out["ok"], out
        assert out["failures"] == {}, out["failures"]
        assert link.counts["dropped"] > 0, link.counts  # frames really were lost
        _no_leak(out)


# ------------------------------------------------------------------------------------------ processes


def test_source_sigkilled_at_a_random_message(net: Network, tmp_path: Path) -> None:
    """Four loads side by side (seeds 1-4), each of whose source is SIGKILLed by its client at a random message:
    the client notices at once (the connection resets). With a backup (seeds 1-3) it keeps every message in place
    and takes only the missing ones from the backup, bit-exact; alone (seed 4) it fails with NoSourceError naming
    the source's TransferError."""
    seeds = (1, 2, 3, 4)
    backup = _source(net.add_host("backup", rate_mbit=RATE), tmp_path)
    victims = [_source(net.add_host(f"victim{seed}", rate_mbit=RATE), tmp_path) for seed in seeds]
    ready(backup, *victims)
    baseline = backup.stats()
    total = _total()
    fractions = [random.Random(seed).uniform(0.05, 0.95) for seed in seeds]
    clients = [_client(net.add_host(f"c{seed}"), [victim.address, backup.address][:1 if seed == 4 else 2],
                       kill_at={"pid": victim.pid, "fraction": fraction, "signal": int(signal.SIGKILL)})
               for seed, victim, fraction in zip(seeds, victims, fractions, strict=True)]
    outs = [result(c) for c in clients]
    for seed, victim, fraction, out in zip(seeds, victims, fractions, outs, strict=True):
        noticed = out["failed_at"].get(victim.address, float("inf")) - out.get("killed_at", 0)
        clean = not out["ok"] and _clean(out["error"], netloader.NoSourceError)
        record("source SIGKILLed at a random message", bit_exact=out["ok"], clean_error=clean, noticed=noticed,
               detail="the connection resets; 3 runs with a backup, 1 alone")
        assert victim.proc.wait(10) == -signal.SIGKILL
        assert out["failures"][victim.address].startswith("TransferError"), out["failures"]
        _given_up(out, victim.address, out["killed_at"])
        _no_leak(out)
        if seed == 4:
            assert clean, out
            continue
        assert out["ok"], out
        assert out["source"] == backup.address
        # what arrived stayed: kept + fetched again covers the model, and little of it was fetched twice
        assert out["resumed_bytes"] + out["bytes"] == total
        assert out["resumed_bytes"] >= (fraction - 0.1) * total, (fraction, out["resumed_bytes"])
        assert out["refetched_bytes"] <= 0.1 * total
    _settled(backup, baseline)


def test_source_sigstopped(net: Network, tmp_path: Path) -> None:
    """The source is SIGSTOPped by its client at 40%: alive, its host acknowledging, but silent. Given up within
    heartbeat_timeout (TCP_INFO: acknowledged, so "the process is stopped"), the load resumes from the backup;
    continued, the source sees its client gone and is back to its baseline."""
    stopped, backup = (_source(net.add_host(n, rate_mbit=RATE), tmp_path) for n in ("stopped", "backup"))
    ready(stopped, backup)
    baselines = {s.address: s.stats() for s in (stopped, backup)}
    client = _client(net.add_host("c"), [stopped.address, backup.address],
                     kill_at={"pid": stopped.pid, "fraction": 0.4, "signal": int(signal.SIGSTOP)})
    try:
        out = result(client)
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    noticed = out["failed_at"].get(stopped.address, float("inf")) - out.get("killed_at", 0)
    record("source SIGSTOPped", bit_exact=out["ok"], noticed=noticed, detail="heartbeats stop, TCP still acks")
    assert out["ok"], out
    assert out["source"] == backup.address
    error = out["failures"][stopped.address]
    assert "stopped answering" in error and "process is stopped" in error, error
    _given_up(out, stopped.address, out["killed_at"])
    assert out["resumed_bytes"] >= 0.3 * _total()
    _no_leak(out)
    for server in (stopped, backup):
        _settled(server, baselines[server.address])


def test_client_sigkilled_or_sigstopped_mid_transfer(net: Network, tmp_path: Path) -> None:
    """Two clients side by side on one source: one SIGKILLs itself at 30% (the source sees the connection reset
    and frees its slot at once), one is SIGSTOPped at 30% (the source gives it up within heartbeat_timeout and
    frees its slot). The source is back to its baseline and serves the next client bit-exact."""
    src = _source(net.add_host("src", rate_mbit=RATE), tmp_path)
    ready(src)
    baseline = src.stats()
    killed_host, stopped_host = net.add_host("killed"), net.add_host("stopped")
    killed = _client(killed_host, [src.address], die_at=0.3)
    stopped = _client(stopped_host, [src.address], mark_at=0.3)

    def dies() -> float | None:
        out, _ = killed.communicate(timeout=120)
        assert killed.returncode == -signal.SIGKILL, out
        dying_at = json.loads(out.strip().splitlines()[-1])["dying_at"]
        ended = _logged_at(src, f"connection from {killed_host.address}")  # logged with the reason, who it was
        return None if ended is None else max(0.0, ended - dying_at)

    def stops() -> float | None:
        wait_mark(stopped)
        os.kill(stopped.pid, signal.SIGSTOP)
        stopped_at = time.time()
        ended = _logged_at(src, f"connection from {stopped_host.address}")
        return None if ended is None else ended - stopped_at

    try:
        killed_after, stopped_after = _in_parallel(dies, stops)
        freed = _wait_for(lambda: src.stats()["active"] == 0, 60)
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
        stopped.kill()
        stopped.wait()
    settled = src.settled_stats(baseline, timeout=30)
    out = result(_client(net.add_host("next"), [src.address]))
    for fault, after, detail in (("client SIGKILLed mid-transfer", killed_after, "the connection resets"),
                                 ("client SIGSTOPped mid-transfer", stopped_after, "the source drops it")):
        record(fault, bit_exact=out["ok"] and after is not None, noticed=after,
               detail=f"{detail}, frees the slot; the next client is bit-exact")
    assert killed_after is not None and killed_after < HEARTBEAT + SLACK, killed_after
    assert stopped_after is not None and stopped_after < HEARTBEAT + SLACK, stopped_after
    assert freed is not None
    assert "client stopped answering" in src.log_text()
    for key in ("threads", "fds", "connections", "active"):
        assert settled[key] <= baseline[key], (key, baseline, settled)
    assert out["ok"], out
    _no_leak(out)
    _settled(src, baseline)


# ------------------------------------------------------------------------------------------ relays


def _relay(host: Host, tmp_path: Path, **kwargs: Any) -> Relay:
    spec = {"model": KIND, "expect_seed": 1, "model_id": MODEL_ID, "heartbeat_timeout": HEARTBEAT,
            "timeout": TIMEOUT, **kwargs}
    return start_relay(host, tmp_path, spec, wait=False)


def test_relay_killed_mid_chain(net: Network, tmp_path: Path) -> None:
    """origin -> relay1 -> relay2 -> client, relay2 also knowing the origin. relay1 is SIGKILLed at 40% of its
    fill: relay2 resumes its fill from the origin, and the client, loading from relay2 meanwhile, goes on; all
    bit-exact, relay2 back to its baseline."""
    origin = _source(net.add_host("origin", rate_mbit=RATE), tmp_path)
    relay1 = _relay(net.add_host("relay1", rate_mbit=RATE), tmp_path, wait_go=True, mark_at=0.4)
    relay2 = _relay(net.add_host("relay2", rate_mbit=RATE), tmp_path, wait_go=True)
    ready(origin, relay1, relay2)
    baseline = relay2.stats()
    relay1.go([origin.address])
    relay2.go([relay1.address, origin.address])
    client = _client(net.add_host("client", rate_mbit=RATE), [relay2.address])
    wait_mark(relay1.proc)
    relay1.kill()
    killed_at = time.time()
    filled, out = relay2.result(), result(client)
    noticed = filled.get("failed_at", {}).get(relay1.address, float("inf")) - killed_at
    record("relay killed mid-chain", bit_exact=filled["ok"], noticed=noticed,
           detail="the next relay resumes from the origin")
    record("relay killed mid-chain", bit_exact=out["ok"], detail="the next relay resumes from the origin")
    assert filled["ok"], filled
    assert out["ok"], out
    assert relay1.address in filled["failures"], filled
    assert filled["by_source"].get(origin.address, 0) > 0, filled
    assert noticed < HEARTBEAT + SLACK, noticed
    assert out["by_source"] == {relay2.address: out["bytes"]} and out["failures"] == {}, out
    _no_leak(out)
    _settled(relay2, baseline)


def test_corrupting_relay(net: Network, tmp_path: Path) -> None:
    """A test-only source that flips bits in what it serves after taking the clean bytes' digests (a relay whose
    memory or NIC damaged what it forwards). With another source, the client names the tensors and the source,
    refetches only the messages carrying them and ends bit-exact; with none, IntegrityError names them."""
    bad_names = ["large_float32", "small_int8"]  # one direct (large) and one packed (small) tensor
    spec = {"model": "mixed", "seed": 1, "model_id": MODEL_ID}
    bad = start_source(net.add_host("bad", rate_mbit=RATE), tmp_path, {**spec, "corrupt": bad_names}, wait=False)
    good = start_source(net.add_host("good", rate_mbit=RATE), tmp_path, spec, wait=False)
    ready(bad, good)
    client = {"model": "mixed", "expect_seed": 1, "model_id": MODEL_ID, "leaks": True}
    with_other = start_client(net.add_host("c1"), {**client, "sources": [bad.address, good.address]})
    alone = start_client(net.add_host("c2"), {**client, "sources": [bad.address]})
    out, only = result(with_other), result(alone)

    record("relay corrupting what it forwards", bit_exact=out["ok"], detail="origin's digests, per tensor")
    assert out["ok"], out  # client_proc compared every tensor with the seed's bytes
    assert out["source"] == good.address and out["verified"] is True
    assert out["corrupt"] == {bad.address: bad_names}
    failure = out["failures"][bad.address]
    assert failure.startswith("IntegrityError") and "large_float32" in failure, failure
    total = _total("mixed")
    assert 0 < out["bytes"] < total and out["resumed_bytes"] > 0  # only the bad tensors' messages again
    assert "reported a failed load" in bad.log_text() and "do not match the origin's digests" in bad.log_text()
    _no_leak(out)

    clean = _clean(only["error"], netloader.IntegrityError)
    record("relay corrupting what it forwards", clean_error=clean, detail="origin's digests, per tensor")
    assert not only["ok"] and clean, only
    assert "large_float32" in only["error"] and "small_int8" in only["error"] and bad.address in only["error"]
    assert "must not be used" in only["error"]
    assert only["corrupt"] == {bad.address: bad_names}
    _no_leak(only)


# ------------------------------------------------------------------------------------------ registry


def test_registry_dies_mid_burst(net: Network, tmp_path: Path) -> None:
    """A real redis-server (on an emulated host of its own) is SIGKILLed in the middle of a burst of four new
    relays finding their sources through it. Each relay's fill ends bit-exact or with a clean NetloaderError
    (RegistryError/NoSourceError: the registry cannot be read); the origin and every relay keep serving: a load
    striped over all of them afterwards is bit-exact."""
    redis_server = RedisServer(tmp_path, host=net.add_host("redis"))
    redis_server.start()
    fast = {"registry_heartbeat": 0.3, "registry_ttl": 5.0}
    try:
        origin = _source(net.add_host("origin", rate_mbit=RATE), tmp_path, registry=redis_server.url, **fast)
        relays = [_relay(net.add_host(f"n{i}", rate_mbit=RATE), tmp_path, registry=redis_server.url, server=fast,
                         wait_go=True) for i in range(4)]
        ready(origin, *relays)
        started: list[float] = []
        for i, relay in enumerate(relays):  # one every 0.5 s; the registry dies after the second
            if i == 2:
                redis_server.stop()
                killed_at = time.time()
            relay.go()
            started.append(time.time())
            time.sleep(0.5)
        outs = [r.result() for r in relays]
    finally:
        redis_server.stop()
    for relay, out, go_at in zip(relays, outs, started, strict=True):
        clean = not out["ok"] and _clean(out["error"], netloader.RegistryError, netloader.NoSourceError)
        noticed = out["finished_at"] - max(go_at, killed_at) if clean else None
        record("registry (redis) killed mid-burst", bit_exact=out["ok"], clean_error=clean, noticed=noticed,
               detail="a lookup fails at once: connection refused")
        assert out["ok"] or clean, (relay.address, out)
    assert any(out["ok"] for out in outs[:2]), outs  # those that looked up before the registry died
    # every instance keeps serving: the origin and the relays that filled (those that did not answer, too)
    filled = [r.address for r, out in zip(relays, outs, strict=True) if out["ok"]]
    for server in (origin, *relays):
        assert server.proc.poll() is None and "active" in server.stats()
    out = result(_client(net.add_host("after"), [origin.address, *filled], max_sources=1 + len(filled)))
    record("registry (redis) killed mid-burst", bit_exact=out["ok"], detail="a lookup fails at once")
    assert out["ok"], out
