"""netloader against the link's ceiling, side by side in one run.

- ceiling: a raw gloo send/recv of ONE flat buffer of the model's total size between two processes
  (the receiver's buffer already touched);
- netloader: ``load_weights`` end to end (connect, handshake, manifest check, group, transfer) of the
  Llama-shaped model into a model whose memory was already touched.

Each is run ``--runs`` times; the median, min and max are printed with the ratio of medians.
Usage: python bench/ceiling.py [--gib 1.0] [--runs 5] [--bucket-mib 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from netloader.synthetic import build_model, fill_, llama_of_size


def _role_ceiling_send(nbytes: int, runs: int) -> None:
    from torch.distributed import ProcessGroupGloo, TCPStore

    store = TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=120), wait_for_workers=False)
    print(json.dumps({"port": store.port}), flush=True)
    opts = ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=120)
    opts._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    pg = ProcessGroupGloo(store, 0, 2, opts)
    buf = torch.ones(nbytes, dtype=torch.uint8)
    for i in range(runs + 1):
        pg.send([buf], 1, i).wait()
    pg.recv([torch.empty(1, dtype=torch.uint8)], 1, 10_000).wait()


def _role_ceiling_recv(nbytes: int, runs: int, port: int) -> None:
    from torch.distributed import ProcessGroupGloo, TCPStore

    store = TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=120))
    opts = ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=120)
    opts._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    pg = ProcessGroupGloo(store, 1, 2, opts)
    buf = torch.zeros(nbytes, dtype=torch.uint8)  # touched
    times = []
    for i in range(runs + 1):  # the first run warms up the connection
        t0 = time.perf_counter()
        pg.recv([buf], 0, i).wait()
        if i:
            times.append(time.perf_counter() - t0)
    pg.send([torch.empty(1, dtype=torch.uint8)], 0, 10_000).wait()
    print(json.dumps({"seconds": times}), flush=True)


def _role_source(gib: float, bucket: int) -> None:
    import netloader

    model = build_model(llama_of_size(int(gib * 2**30)))
    fill_(model, seed=1)
    server = netloader.WeightServer(model, model_id="bench", host="127.0.0.1", bucket_size=bucket).start()
    print(json.dumps({"address": server.address}), flush=True)
    sys.stdin.readline()
    server.close()


def _role_client(gib: float, runs: int, address: str) -> None:
    import netloader

    model = build_model(llama_of_size(int(gib * 2**30)), touch=True)
    times = []
    for i in range(runs + 1):
        report = netloader.load_weights(model, [address], model_id="bench", progress=False)
        if i:
            times.append(report.seconds)
    print(json.dumps({"seconds": times, "bytes": report.bytes}), flush=True)


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _summary(nbytes: int, seconds: list[float]) -> dict[str, float]:
    rates = [nbytes / s / 1e9 for s in seconds]
    return {"median_gbps": statistics.median(rates), "min_gbps": min(rates), "max_gbps": max(rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bucket-mib", type=int, default=32)
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        role, *rest = args.role
        if role == "send":
            _role_ceiling_send(int(rest[0]), args.runs)
        elif role == "recv":
            _role_ceiling_recv(int(rest[0]), args.runs, int(rest[1]))
        elif role == "source":
            _role_source(args.gib, args.bucket_mib << 20)
        elif role == "client":
            _role_client(args.gib, args.runs, rest[0])
        return

    shape = llama_of_size(int(args.gib * 2**30))
    nbytes = shape.nbytes
    print(
        f"model: Llama-shaped, {shape.layers} layers, {shape.tensor_count} tensors, {nbytes / 2**30:.2f} GiB; "
        f"{args.runs} runs each; torch {torch.__version__}, {os.cpu_count()} CPUs",
        flush=True,
    )

    sender = _spawn("send", str(nbytes), f"--runs={args.runs}")
    port = json.loads(sender.stdout.readline())["port"]  # type: ignore[union-attr]
    receiver = _spawn("recv", str(nbytes), str(port), f"--runs={args.runs}")
    ceiling = json.loads(receiver.stdout.readline())["seconds"]  # type: ignore[union-attr]
    receiver.wait()
    sender.wait()

    source = _spawn("source", f"--gib={args.gib}", f"--bucket-mib={args.bucket_mib}")
    address = json.loads(source.stdout.readline())["address"]  # type: ignore[union-attr]
    client = _spawn("client", address, f"--gib={args.gib}", f"--runs={args.runs}")
    loaded = json.loads(client.stdout.readline())  # type: ignore[union-attr]
    client.wait()
    source.communicate("stop\n")

    ceil, net = _summary(nbytes, ceiling), _summary(loaded["bytes"], loaded["seconds"])
    print(
        f"ceiling   (raw gloo, one {nbytes / 2**30:.2f} GiB buffer): median {ceil['median_gbps']:.2f} GB/s "
        f"(min {ceil['min_gbps']:.2f}, max {ceil['max_gbps']:.2f})"
    )
    print(
        f"netloader (load_weights end to end):        median {net['median_gbps']:.2f} GB/s "
        f"(min {net['min_gbps']:.2f}, max {net['max_gbps']:.2f})"
    )
    print(f"ratio netloader / ceiling: {net['median_gbps'] / ceil['median_gbps']:.3f}")


if __name__ == "__main__":
    main()
