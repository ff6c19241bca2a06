"""What a registry costs: the time of one lookup by identity, and how long a SIGKILLed source stays visible.

    .venv/bin/python bench/registry_lookup.py [--records 10 50] [--lookups 100] [--kills 2]

Both backends on this machine: a directory (file://) and a redis-server started here on a free port (no
persistence), each holding ``--records`` live records of the looked-up identity plus 200 of other identities. A
lookup is :meth:`Registry.lookup` on an open registry (the connection, for Redis, already made), validation of every
record included. The dead-source figure starts a real WeightServer with the default heartbeat and ttl in its own
process, SIGKILLs it at a random point of its heartbeat, and polls every 20 ms until a lookup no longer offers it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from netloader import Identity
from netloader.registry import DEFAULT_HEARTBEAT, DEFAULT_TTL, SourceRecord, open_registry

SERVER = """
import sys, time, torch, netloader
s = netloader.WeightServer({"w": torch.zeros(4)}, model_id="bench", host="127.0.0.1", registry=sys.argv[1]).start()
print(s.address, flush=True)
time.sleep(3600)
"""


def record(identity: Identity, n: int) -> SourceRecord:
    now = time.time()
    return SourceRecord(
        source_id=f"{n:016x}", model_id=identity.model_id, rank=identity.rank, layout=dict(identity.layout),
        address=f"10.0.{n // 250}.{n % 250 + 1}:47000", state="ready", progress=1.0, active_transfers=n % 3,
        max_concurrent=4, tensors=291, bytes=16_060_000_000, backend="nccl", auth=True, version="0.1.0",
        started_at=now, heartbeat_at=now, ttl=60.0,
    )


def lookup_ms(url: str, records: int, lookups: int) -> tuple[float, float]:
    wanted = Identity.build("llama-3-8b", 0, {"tp": 8, "pp": 1, "dtype": "bfloat16", "role": "target"})
    with open_registry(url) as registry:
        for n in range(records):
            registry.publish(record(wanted, n))
        for n in range(200):  # other ranks and other models
            other = Identity.build("llama-3-8b" if n % 2 else "other", 1 + n % 7, dict(wanted.layout))
            registry.publish(record(other, 10_000 + n))
        times = []
        for _ in range(lookups):
            started = time.perf_counter()
            found = registry.lookup(wanted)
            times.append((time.perf_counter() - started) * 1000)
            assert len(found) == records, len(found)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.9)]


def dead_visible_s(url: str) -> float:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, url], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    identity = Identity.build("bench", 0, {})
    time.sleep(DEFAULT_HEARTBEAT * (1 + random.random()))  # kill at a random point of the heartbeat
    with open_registry(url) as registry:
        assert any(e.record.address == address for e in registry.lookup(identity))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        while any(e.record.address == address for e in registry.lookup(identity)):
            time.sleep(0.02)
        return time.monotonic() - killed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--lookups", type=int, default=100)
    parser.add_argument("--kills", type=int, default=2)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="netloader-registry-bench-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        print(f"lookup by identity, {args.lookups} lookups (+200 records of other identities):")
        for records in args.records:
            for kind in ("file", "redis"):
                url = f"file://{workdir}/dir{records}" if kind == "file" else f"redis://127.0.0.1:{port}/{records % 16}"
                median, p90 = lookup_ms(url, records, args.lookups)
                print(f"  {kind:5}  {records:3} records  median {median:.2f} ms  p90 {p90:.2f} ms")
        print(f"a SIGKILLed source stays visible (heartbeat {DEFAULT_HEARTBEAT:g} s, ttl {DEFAULT_TTL:g} s):")
        for kind in ("file", "redis"):
            url = f"file://{workdir}/dead" if kind == "file" else f"redis://127.0.0.1:{port}/15"
            seen = [dead_visible_s(url) for _ in range(args.kills)]
            print(f"  {kind:5}  " + ", ".join(f"{s:.1f} s" for s in seen))
    finally:
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
