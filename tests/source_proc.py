"""A real source process for the tests: serves a model from tests/models.py until its stdin closes.

argv[1] is a JSON spec: {"model": kind, "seed": int, "model_id": str, "host": listen address (127.0.0.1),
...WeightServer keyword arguments}.
Prints {"address", "pid"} once serving. Each stdin line "stats" is answered with a JSON line of the
process's thread count, open file descriptors and the server's counters.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import netloader
from models import build


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(sys.argv[1])
    model = build(spec.pop("model"), spec.pop("seed"), spec.pop("variant", "base"))
    host = spec.pop("host", "127.0.0.1")
    server = netloader.WeightServer(model, host=host, **spec).start()
    print(json.dumps({"address": server.address, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps({
                "threads": threading.active_count(),
                "fds": len(os.listdir("/proc/self/fd")),
                "active": server.active_transfers,
                "connections": server.open_connections,
                "served": server.transfers_served,
            }), flush=True)
    server.close()


if __name__ == "__main__":
    main()
