"""A plain one-source load (loopback, no limit) by two versions of netloader side by side: did a change slow it?

    git worktree add /tmp/nl-before <commit>
    .venv/bin/python bench/plain_load_ab.py --before /tmp/nl-before/src [--gib 1] [--runs 9]

Each version gets its own source process and client process (the same Python environment, ``PYTHONPATH`` set to
that version's ``src``); the client holds a touched target and loads on command, the versions alternate run by run
(the order flips every run), the first round is a warm-up, and the medians are compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

SOURCE = """
import sys, netloader
from netloader.synthetic import build_model, llama_of_size, fill_
m = build_model(llama_of_size(int(sys.argv[1])), touch=True); fill_(m, 3)
s = netloader.WeightServer(m, model_id="ab", host="127.0.0.1").start()
print(s.address, flush=True); sys.stdin.read()
"""
CLIENT = """
import sys, netloader
from netloader.synthetic import build_model, llama_of_size
m = build_model(llama_of_size(int(sys.argv[2])), touch=True)
print(netloader.__file__, flush=True)
for line in sys.stdin:
    print(netloader.load_weights(m, [sys.argv[1]], model_id="ab", progress=False).seconds, flush=True)
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before", required=True, help="the src directory of the older checkout")
    p.add_argument("--now", default=str(Path(__file__).resolve().parents[1] / "src"))
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--runs", type=int, default=9)
    args = p.parse_args()
    nbytes = int(args.gib * (1 << 30))
    versions = {"before": args.before, "now": args.now}
    procs = {}
    for name, path in versions.items():
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
        src = subprocess.Popen([sys.executable, "-c", SOURCE, str(nbytes)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert src.stdout is not None
        address = src.stdout.readline().strip()
        client = subprocess.Popen([sys.executable, "-c", CLIENT, address, str(nbytes)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert client.stdout is not None
        print(f"{name}: {client.stdout.readline().strip()}", flush=True)
        procs[name] = (src, client)
    seconds: dict[str, list[float]] = {name: [] for name in versions}
    for run in range(args.runs + 1):
        order = list(procs.items()) if run % 2 == 0 else list(reversed(procs.items()))
        for name, (_, client) in order:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write("go\n")
            client.stdin.flush()
            took = float(client.stdout.readline())
            if run:  # the first round warms both up
                seconds[name].append(took)
    for name, values in seconds.items():
        print(f"{name}: median {statistics.median(values):.4f} s (min {min(values):.4f}, max {max(values):.4f}, "
              f"{len(values)} runs)")
    print(f"now / before: {statistics.median(seconds['now']) / statistics.median(seconds['before']):.3f}")
    for src, client in procs.values():
        for proc in (client, src):
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(60)


if __name__ == "__main__":
    main()
