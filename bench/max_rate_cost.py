"""What serving costs a live source, with and without ``max_rate``: a CPU matmul loop's rate on the source while
clients load from it back to back, as a fraction of its rate alone.

    OMP_NUM_THREADS=1 .venv/bin/python bench/max_rate_cost.py [--mib 256] [--caps 0 1 0.5 0.2] [--seconds 6]

The source (this process) holds a Llama-shaped model and runs a 512x512 float32 matmul loop on one thread; a client
process loads the model from it over loopback again and again. On a machine with at least two cores the source
process is pinned to core 0 and the client to core 1, as if they were two hosts: what the loop loses is what
serving takes from the source's own core (its sending threads, the kernel's copies), not a client competing for
the same core. Per cap (GB/s; 0: no cap) the loop's iterations
per second are counted over ``--seconds`` while serving, between two measurements of the loop alone; caps
alternate over ``--runs`` rounds and medians are printed, with the serving rate reached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

import netloader
from netloader.synthetic import build_model, llama_of_size

CLIENT = """
import sys, netloader
from netloader.synthetic import build_model, llama_of_size
model = build_model(llama_of_size(int(sys.argv[2])), touch=True)
for line in sys.stdin:
    r = netloader.load_weights(model, [sys.argv[1]], model_id="cost", progress=False)
    print(r.bytes, r.seconds, flush=True)
"""


class Loop:
    def __init__(self) -> None:
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        a = torch.randn(512, 512)
        b = torch.randn(512, 512)
        while not self.stop.is_set():
            torch.mm(a, b)
            self.count += 1

    def rate(self, seconds: float) -> float:
        start, t = self.count, time.perf_counter()
        time.sleep(seconds)
        return (self.count - start) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--caps", type=float, nargs="+", default=[0, 1.0, 0.5, 0.2])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    pin = len(os.sched_getaffinity(0)) >= 2
    if pin:
        os.sched_setaffinity(0, {0})
    model = build_model(llama_of_size(args.mib << 20), touch=True)
    loop = Loop()
    cost: dict[float, list[float]] = {c: [] for c in args.caps}
    reached: dict[float, list[float]] = {c: [] for c in args.caps}
    for run in range(args.runs):
        for cap in args.caps:
            server = netloader.WeightServer(model, model_id="cost", host="127.0.0.1",
                                            max_rate=cap * 1e9 if cap else None).start()
            argv = [sys.executable, "-c", CLIENT, server.address, str(args.mib << 20)]
            client = subprocess.Popen((["taskset", "-c", "1"] if pin else []) + argv,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert client.stdin is not None and client.stdout is not None
            alone = loop.rate(args.seconds / 2)
            stop = threading.Event()
            moved: list[tuple[int, float]] = []

            def drive(c: subprocess.Popen[str] = client, out: list[tuple[int, float]] = moved,
                      s: threading.Event = stop) -> None:
                assert c.stdin is not None and c.stdout is not None
                while not s.is_set():
                    c.stdin.write("go\n")
                    c.stdin.flush()
                    nbytes, secs = c.stdout.readline().split()
                    out.append((int(nbytes), float(secs)))

            driver = threading.Thread(target=drive, daemon=True)
            driver.start()
            time.sleep(1.0)  # the first load under way
            busy = loop.rate(args.seconds)
            stop.set()
            driver.join(120)
            client.stdin.close()
            client.wait(60)
            server.close()
            alone = (alone + loop.rate(args.seconds / 2)) / 2
            cost[cap].append(1 - busy / alone)
            reached[cap].append(sum(b for b, _ in moved) / sum(s for _, s in moved) / 1e9)
            print(f"run {run + 1} cap {cap or 'none'}: matmul slowed by {cost[cap][-1]:.0%}, "
                  f"serving {reached[cap][-1]:.2f} GB/s", flush=True)
    loop.stop.set()
    loop.thread.join()  # torch must not be mid-matmul in a daemon thread at interpreter exit
    print("\n| cap (GB/s) | matmul slowdown on the source | serving rate |\n|---|---|---|")
    for cap in args.caps:
        print(f"| {cap or 'none'} | {statistics.median(cost[cap]):.0%} | {statistics.median(reached[cap]):.2f} GB/s |")


if __name__ == "__main__":
    main()
