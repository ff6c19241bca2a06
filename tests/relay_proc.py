"""A real relay process for the tests: a ``ready=False`` server that fills itself while serving.

argv[1] is a JSON spec: {"model": kind, "expect_seed": int, "model_id": str, "host": listen address,
"sources": [...] (optional), "registry": URL (optional, also the server's own), "max_sources": int,
"timeout": s, "heartbeat_timeout": s, "mark_at": fraction of the fill (print {"mark": ...} there),
"wait_go": true (start the fill only after reading a line from stdin other than "stats"; a JSON list there
replaces "sources"),
"server": {...more WeightServer keyword arguments}}.
Prints {"address", "pid"} once serving, then one JSON line when the fill ends: {"ok", "mismatched", "by_source",
"failures", "failed_at" (source -> wall-clock time its failure was noticed), "seconds", "finished_at", "error"};
then serves until stdin closes, answering each "stats" line with {"active", "connections", "served", "state",
"progress", "threads", "fds"}.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import netloader
from models import build, named
from netloader.synthetic import bytes_equal


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(sys.argv[1])
    kind, seed = spec["model"], spec["expect_seed"]
    model = build(kind, None)
    registry = spec.get("registry")
    server = netloader.WeightServer(
        model, model_id=spec["model_id"], host=spec.get("host", "127.0.0.1"), ready=False, registry=registry,
        timeout=spec.get("timeout", 60.0), heartbeat_timeout=spec.get("heartbeat_timeout", 5.0),
        **spec.get("server", {}),
    ).start()
    print(json.dumps({"address": server.address, "pid": os.getpid()}), flush=True)
    from client_proc import _FailureTimes

    failures = _FailureTimes()
    logging.getLogger("netloader").addHandler(failures)
    mark_at = spec.get("mark_at")
    marked = False

    def on_progress(done: int, total: int) -> None:
        nonlocal marked
        if mark_at is not None and not marked and done >= mark_at * total:
            marked = True
            print(json.dumps({"mark": mark_at, "at": time.time()}), flush=True)

    def stats() -> None:
        print(json.dumps({"active": server.active_transfers, "connections": server.open_connections,
                          "served": server.transfers_served, "state": server.state,
                          "progress": server.progress, "threads": threading.active_count(),
                          "fds": len(os.listdir("/proc/self/fd"))}), flush=True)

    sources = spec.get("sources")
    while spec.get("wait_go"):  # the test says when this instance starts its fill (and from where)
        go = sys.stdin.readline().strip()
        if go == "stats":  # answered before the go too
            stats()
            continue
        if go.startswith("["):
            sources = json.loads(go)
        break
    started = time.time()
    try:
        report = server.fill(sources, max_sources=spec.get("max_sources", 1),
                             timeout=spec.get("timeout", 60.0), heartbeat_timeout=spec.get("heartbeat_timeout", 5.0),
                             on_progress=on_progress, progress=False)
    except netloader.NetloaderError as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}", "failed_at": failures.times,
                          "finished_at": time.time()}), flush=True)
    else:
        expected = named(build(kind, seed))
        mismatched = [n for n, t in named(model).items() if not bytes_equal(t, expected[n])]
        print(json.dumps({"ok": not mismatched, "mismatched": mismatched[:5], "by_source": report.sources,
                          "failures": {s: f"{type(e).__name__}: {e}" for s, e in report.failures.items()},
                          "seconds": time.time() - started, "finished_at": time.time(),
                          "failed_at": failures.times}), flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            stats()
    server.close()


if __name__ == "__main__":
    main()
