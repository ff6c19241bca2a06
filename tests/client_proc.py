"""A real client process for the tests: loads a model from tests/models.py and checks it bit for bit.

argv[1] is a JSON spec: {"model": kind, "expect_seed": int, "sources": [...], "model_id": str, ...,
"die_at": fraction (print {"dying_at": time} and SIGKILL itself there), "mark_at": fraction (print
{"mark": fraction} there and go on),
"kill_at": {"pid": int, "fraction": f, "signal": n} (send that signal to that process, e.g. its source, once that
fraction has arrived: a fault at a chosen message), "leaks": true (report its own thread and fd counts before the
load and once settled after it)} ("sources" may be left out for a client that only has a "registry").
Prints one JSON line: {"ok", "mismatched", "source", "bytes", "resumed_bytes", "refetched_bytes", "failed_at"
(source -> wall-clock time its failure was noticed), "failures" (source -> error text), "verified", "corrupt"
(source -> tensor names), "digests" (as on the wire), "by_source" (source -> bytes), "seconds", "finished_at",
"error", "killed_at" (wall-clock time of "kill_at"'s signal), "before"/"after" ({"threads", "fds"}, with "leaks")}.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import netloader
from models import build, named
from netloader.synthetic import bytes_equal


def _counts() -> dict[str, int]:
    return {"threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd"))}


def _settled(before: dict[str, int], timeout: float = 20.0) -> dict[str, int]:
    """Thread and fd counts once back to ``before`` (threads a dead peer left waiting end on their own timeout),
    or the last ones seen after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        now = _counts()
        if all(now[k] <= before[k] for k in now) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


class _FailureTimes(logging.Handler):
    """Wall-clock time at which each source's failure was logged (the moment the client gave up on it)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.times: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("netloader: source ") and record.args:
            self.times.setdefault(str(record.args[0]), record.created)  # type: ignore[index]


def main() -> None:
    spec = json.loads(sys.argv[1])
    kind, seed = spec.pop("model"), spec.pop("expect_seed")
    model = build(kind, None)
    die_at = spec.pop("die_at", None)
    mark_at = spec.pop("mark_at", None)
    kill_at = spec.pop("kill_at", None)
    leaks = spec.pop("leaks", False)
    marked = False
    extra: dict[str, Any] = {}
    failures = _FailureTimes()
    logging.getLogger("netloader").addHandler(failures)

    def on_progress(done: int, total: int) -> None:
        nonlocal marked
        if die_at is not None and done >= die_at * total:
            print(json.dumps({"dying_at": time.time()}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # a client that dies mid-transfer
        if mark_at is not None and not marked and done >= mark_at * total:
            marked = True
            print(json.dumps({"mark": mark_at, "at": time.time()}), flush=True)
        if kill_at is not None and "killed_at" not in extra and done >= kill_at["fraction"] * total:
            os.kill(kill_at["pid"], kill_at.get("signal", signal.SIGKILL))
            extra["killed_at"] = time.time()

    if leaks:
        extra["before"] = _counts()
    try:
        report = netloader.load_weights(model, spec.pop("sources", None), progress=False, on_progress=on_progress,
                                        **spec)
    except netloader.NoSourceError as exc:
        if leaks:
            extra["after"] = _settled(extra["before"])
        print(json.dumps({"ok": False, "error": f"NoSourceError: {exc}", "failed_at": failures.times,
                          "failures": {s: f"{type(e).__name__}: {e}" for s, e in exc.failures.items()}, **extra}),
              flush=True)
        return
    except netloader.NetloaderError as exc:
        if leaks:
            extra["after"] = _settled(extra["before"])
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}", "failed_at": failures.times,
                          "corrupt": getattr(exc, "corrupt", {}), **extra}), flush=True)
        return
    if leaks:
        extra["after"] = _settled(extra["before"])
    expected = named(build(kind, seed))
    mismatched = [n for n, t in named(model).items() if not bytes_equal(t, expected[n])]
    print(json.dumps({"ok": not mismatched, "mismatched": mismatched[:5], "source": report.source,
                      "bytes": report.bytes, "resumed_bytes": report.resumed_bytes,
                      "refetched_bytes": report.refetched_bytes, "failed_at": failures.times,
                      "verified": report.verified, "corrupt": report.corrupt,
                      "digests": report.digests.to_wire() if report.digests else None,
                      "by_source": report.sources, "seconds": report.seconds, "finished_at": time.time(),
                      "failures": {s: f"{type(e).__name__}: {e}" for s, e in report.failures.items()}, **extra}),
          flush=True)


if __name__ == "__main__":
    main()
