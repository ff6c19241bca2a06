"""A real client process for the tests: loads a model from tests/models.py and checks it bit for bit.

argv[1] is a JSON spec: {"model": kind, "expect_seed": int, "sources": [...], "model_id": str, ...} ("sources" may be
left out for a client that only has a "registry").
Prints one JSON line: {"ok", "mismatched", "source", "bytes", "error"}.
"""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import netloader
from models import build, named
from netloader.synthetic import bytes_equal


def main() -> None:
    spec = json.loads(sys.argv[1])
    kind, seed = spec.pop("model"), spec.pop("expect_seed")
    model = build(kind, None)
    die_at = spec.pop("die_at", None)

    def on_progress(done: int, total: int) -> None:
        if die_at is not None and done >= die_at * total:
            os.kill(os.getpid(), signal.SIGKILL)  # a client that dies mid-transfer

    try:
        sources = spec.pop("sources", None)
        report = netloader.load_weights(model, sources, progress=False, on_progress=on_progress, **spec)
    except netloader.NetloaderError as exc:
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return
    expected = named(build(kind, seed))
    mismatched = [n for n, t in named(model).items() if not bytes_equal(t, expected[n])]
    print(json.dumps({"ok": not mismatched, "mismatched": mismatched[:5], "source": report.source,
                      "bytes": report.bytes}), flush=True)


if __name__ == "__main__":
    main()
