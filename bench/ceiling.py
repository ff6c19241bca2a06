"""netloader against the link's ceiling, side by side in one run.

- ceiling: a raw gloo send/recv of ONE flat buffer of the model's total size between two processes
  (one connection, already warm; the receiver's buffer already touched);
- netloader: ``load_weights`` end to end (connect, handshake, manifest check, a fresh group, transfer) of
  the Llama-shaped model into a model whose memory was already touched.

All four processes stay up and the two measurements alternate (ceiling, netloader, ceiling, ...), so drift
in the machine's speed hits both alike. Prints median, min and max GB/s of each and the ratio of medians.
Usage: python bench/ceiling.py [--gib 1.0] [--runs 9] [--bucket-mib 32] [--json FILE]
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

TIMEOUT = datetime.timedelta(seconds=300)


def _gloo_pair(rank: int, port: int) -> tuple[object, int]:
    from torch.distributed import ProcessGroupGloo, TCPStore

    store = TCPStore("127.0.0.1", port, None, rank == 0, TIMEOUT, wait_for_workers=False)
    if rank == 0:
        print(json.dumps({"port": store.port}), flush=True)
    opts = ProcessGroupGloo._Options()
    opts._timeout = TIMEOUT
    opts._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return ProcessGroupGloo(store, rank, 2, opts), store


def _role_ceiling(rank: int, nbytes: int, port: int) -> None:
    """rank 0 sends, rank 1 receives one flat buffer per line read from stdin; rank 1 prints seconds."""
    pg, _store = _gloo_pair(rank, port)
    buf = torch.ones(nbytes, dtype=torch.uint8) if rank == 0 else torch.zeros(nbytes, dtype=torch.uint8)
    for tag, _ in enumerate(sys.stdin):
        start = time.perf_counter()
        if rank == 0:
            pg.send([buf], 1, tag).wait()  # type: ignore[attr-defined]
        else:
            pg.recv([buf], 0, tag).wait()  # type: ignore[attr-defined]
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def _role_source(gib: float, bucket: int) -> None:
    import netloader

    model = build_model(llama_of_size(int(gib * 2**30)))
    fill_(model, seed=1)
    server = netloader.WeightServer(model, model_id="bench", host="127.0.0.1", bucket_size=bucket).start()
    print(json.dumps({"address": server.address}), flush=True)
    sys.stdin.readline()
    server.close()


def _role_client(gib: float, address: str) -> None:
    """One load per line read from stdin, into the same (touched) model; prints seconds and bytes."""
    import netloader

    model = build_model(llama_of_size(int(gib * 2**30)), touch=True)
    for _ in sys.stdin:
        report = netloader.load_weights(model, [address], model_id="bench", progress=False)
        print(json.dumps({"seconds": report.seconds, "bytes": report.bytes}), flush=True)


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _ask(proc: subprocess.Popen[str], *others: subprocess.Popen[str]) -> dict[str, float]:
    for p in (proc, *others):
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    assert proc.stdout is not None
    return json.loads(proc.stdout.readline())


def _summary(nbytes: int, seconds: list[float]) -> dict[str, float]:
    rates = [nbytes / s / 1e9 for s in seconds]
    return {"median_gbps": statistics.median(rates), "min_gbps": min(rates), "max_gbps": max(rates)}


def run(gib: float, runs: int, bucket_mib: int) -> dict[str, object]:
    shape = llama_of_size(int(gib * 2**30))
    nbytes = shape.nbytes
    sender = _spawn("ceiling", "0", str(nbytes), "0")
    port = json.loads(sender.stdout.readline())["port"]  # type: ignore[union-attr]
    receiver = _spawn("ceiling", "1", str(nbytes), str(port))
    source = _spawn("source", f"--gib={gib}", f"--bucket-mib={bucket_mib}")
    address = json.loads(source.stdout.readline())["address"]  # type: ignore[union-attr]
    client = _spawn("client", address, f"--gib={gib}")
    ceiling, loads = [], []
    try:
        _ask(receiver, sender)  # warm-up: the ceiling's connection and the client's first-touch state
        _ask(client)
        for _ in range(runs):
            ceiling.append(_ask(receiver, sender)["seconds"])
            loads.append(_ask(client)["seconds"])
    finally:
        for proc in (sender, receiver, client, source):
            if proc.stdin:
                proc.stdin.close()
        for proc in (sender, receiver, client, source):
            proc.wait(60)
    ceil, net = _summary(nbytes, ceiling), _summary(nbytes, loads)
    return {
        "model": {"kind": "llama", "layers": shape.layers, "tensors": shape.tensor_count, "bytes": nbytes},
        "runs": runs, "bucket_mib": bucket_mib, "torch": torch.__version__, "cpus": os.cpu_count(),
        "ceiling": ceil, "netloader": net, "ratio": net["median_gbps"] / ceil["median_gbps"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--bucket-mib", type=int, default=32)
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument("--role", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        role, *rest = args.role
        if role == "ceiling":
            _role_ceiling(int(rest[0]), int(rest[1]), int(rest[2]))
        elif role == "source":
            _role_source(args.gib, args.bucket_mib << 20)
        elif role == "client":
            _role_client(args.gib, rest[0])
        return
    result = run(args.gib, args.runs, args.bucket_mib)
    model, ceil, net = result["model"], result["ceiling"], result["netloader"]
    print(f"model: Llama-shaped, {model['layers']} layers, {model['tensors']} tensors, "  # type: ignore[index]
          f"{model['bytes'] / 2**30:.2f} GiB; {args.runs} alternating runs each; "  # type: ignore[index]
          f"torch {result['torch']}, {result['cpus']} CPUs")
    for label, s in (("ceiling   (raw gloo, one flat buffer)", ceil), ("netloader (load_weights end to end)", net)):
        print(f"{label}: median {s['median_gbps']:.2f} GB/s "  # type: ignore[index]
              f"(min {s['min_gbps']:.2f}, max {s['max_gbps']:.2f})")  # type: ignore[index]
    print(f"ratio netloader / ceiling: {result['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
