"""A real source process for the tests: serves a model from tests/models.py until its stdin closes.

argv[1] is a JSON spec: {"model": kind, "seed": int, "model_id": str, "host": listen address (127.0.0.1),
"digests_seed": serve the digests of the model built from this seed (a source given its origin's digests),
"corrupt": [tensor names whose bits this source flips after taking its digests: a test-only corrupting relay],
...WeightServer keyword arguments}.
Prints {"address", "pid"} once serving. Each stdin line "stats" is answered with a JSON line of the
process's thread count, open file descriptors and the server's counters; "flip NAME" flips a bit of that tensor
in place (what a memory error would do to a running instance) and answers {"flipped": NAME}.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import netloader
from models import build, named
from netloader.integrity import digests_of
from netloader.manifest import TensorSet

#: a corrupted tensor has a bit flipped every this many bytes: every message carrying a piece of it (at least
#: 64 KiB, the smallest chunk) carries a bad byte
FLIP_STRIDE = 64 * 1024


def flip_bit(tensor: torch.Tensor) -> None:
    """Flip the lowest bit of ``tensor``'s first byte (and, when it is contiguous, of every FLIP_STRIDE-th), in
    place."""
    with torch.no_grad():
        if tensor.is_contiguous() and tensor.numel():
            tensor.view(-1).view(torch.uint8)[::FLIP_STRIDE] ^= 1
        else:
            raw = tensor.view(-1)[:1].view(torch.uint8) if tensor.dim() else tensor.view(1).view(torch.uint8)
            raw[0] ^= 1


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(sys.argv[1])
    kind, seed, variant = spec.pop("model"), spec.pop("seed"), spec.pop("variant", "base")
    model = build(kind, seed, variant)
    host = spec.pop("host", "127.0.0.1")
    digests_seed = spec.pop("digests_seed", None)
    if digests_seed is not None:
        spec["digests"] = digests_of(TensorSet(build(kind, digests_seed, variant)))
    elif spec.get("corrupt"):  # the clean bytes' digests, as its origin computed them
        spec["digests"] = digests_of(TensorSet(model))
    tensors = named(model)
    for name in spec.pop("corrupt", []):
        flip_bit(tensors[name])
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
        elif line.startswith("flip "):
            name = line.split(maxsplit=1)[1].strip()
            flip_bit(tensors[name])
            print(json.dumps({"flipped": name}), flush=True)
    server.close()


if __name__ == "__main__":
    main()
