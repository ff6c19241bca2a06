"""``netloader demo``: a ~1 GiB Llama-shaped model moves from a running source process into a fresh process.

Three processes: this one generates the weights (no download) and writes them to a safetensors file; a
*source* process loads that file, as a real instance would, and serves it; a *client* process with an
empty model loads it over netloader, then loads the same file from disk for comparison, and checks every
tensor bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .synthetic import DEMO_SHAPE, LlamaShape, build_model, bytes_equal, fill_, llama_of_size

MODEL_ID = "netloader-demo-llama"


def load_from_safetensors(model: torch.nn.Module, path: str | os.PathLike[str]) -> int:
    """The ordinary disk loader: copy each tensor of a safetensors file into the model's tensor of that name."""
    params = dict(model.named_parameters())
    total = 0
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = f.get_tensor(name)
            params[name].copy_(tensor)
            total += tensor.numel() * tensor.element_size()
    return total


def evict_from_page_cache(path: str | os.PathLike[str]) -> None:
    """Drop a (clean) file's pages from the page cache, so the next read comes from the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _shape_from(args: list[str]) -> LlamaShape:
    return LlamaShape(**json.loads(args[0]))


def _source(shape: LlamaShape, path: str) -> None:
    import netloader

    model = build_model(shape, touch=False)
    load_from_safetensors(model, path)
    with netloader.WeightServer(model, model_id=MODEL_ID, host="127.0.0.1") as server:
        print(json.dumps({"address": server.address}), flush=True)
        sys.stdin.readline()  # until the demo says stop


def _client(shape: LlamaShape, path: str, address: str) -> None:
    import netloader

    model = build_model(shape, touch=True)
    report = netloader.load_weights(model, [address], model_id=MODEL_ID)
    disk_model = build_model(shape, touch=True)
    evict_from_page_cache(path)
    t0 = time.perf_counter()
    disk_bytes = load_from_safetensors(disk_model, path)
    cold_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_from_safetensors(disk_model, path)
    warm_seconds = time.perf_counter() - t0
    reference = dict(disk_model.named_parameters())
    mismatched = [name for name, p in model.named_parameters() if not bytes_equal(p, reference[name])]
    print(
        json.dumps(
            {
                "tensors": report.tensors,
                "bytes": report.bytes,
                "seconds": report.seconds,
                "disk_bytes": disk_bytes,
                "cold_seconds": cold_seconds,
                "warm_seconds": warm_seconds,
                "mismatched": mismatched,
            }
        ),
        flush=True,
    )


def run_demo(gib: float = 1.0, workdir: str | None = None) -> int:
    shape = llama_of_size(int(gib * 2**30)) if gib != 1.0 else DEMO_SHAPE
    with tempfile.TemporaryDirectory(prefix="netloader-demo-", dir=workdir) as tmp:
        path = str(Path(tmp) / "model.safetensors")
        print(
            f"netloader demo: Llama-shaped model, {shape.layers} layers, {shape.tensor_count} tensors, "
            f"{shape.nbytes / 2**30:.2f} GiB {shape.dtype}; generating weights ...",
            flush=True,
        )
        model = build_model(shape, touch=False)
        fill_(model, seed=0)
        save_file({n: p.data for n, p in model.named_parameters()}, path)
        del model
        spec = json.dumps(asdict(shape))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "netloader.demo"]
        source = subprocess.Popen(
            [*cmd, "source", spec, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            line = source.stdout.readline() if source.stdout else ""
            if not line:
                print("netloader demo: the source process failed to start", file=sys.stderr)
                return 1
            address = json.loads(line)["address"]
            print(
                f"source process {source.pid} serves it on {address}; starting a fresh client process ...", flush=True
            )
            client = subprocess.run(
                [*cmd, "client", spec, path, address], stdout=subprocess.PIPE, text=True, env=env, check=False
            )
        finally:
            if source.stdin:
                source.stdin.close()
            source.wait(timeout=60)
        if client.returncode != 0 or not client.stdout.strip():
            print("netloader demo: the client process failed", file=sys.stderr)
            return 1
        result = json.loads(client.stdout.strip().splitlines()[-1])
    rows = [
        ("netloader (source process -> fresh process)", result["bytes"], result["seconds"]),
        ("safetensors file, cold page cache", result["disk_bytes"], result["cold_seconds"]),
        ("safetensors file, warm page cache", result["disk_bytes"], result["warm_seconds"]),
    ]
    print()
    print(f"  {'load path (into already-touched memory)':<46} {'seconds':>8} {'GB/s':>7}")
    for label, nbytes, seconds in rows:
        print(f"  {label:<46} {seconds:>8.2f} {nbytes / seconds / 1e9:>7.2f}")
    print()
    if result["mismatched"]:
        print(f"FAILED: {len(result['mismatched'])} tensors differ, e.g. {result['mismatched'][:3]}")
        return 1
    print(
        f"OK: all {result['tensors']} tensors ({result['bytes'] / 1e9:.2f} GB) bit-exact with the file; "
        f"netloader took {result['seconds'] / result['cold_seconds']:.2f}x the time of the cold file load "
        f"and {result['seconds'] / result['warm_seconds']:.2f}x the warm one."
    )
    print("  (here the link is loopback TCP on 2 cores; on GPUs netloader uses NCCL over NVLink/RDMA)")
    return 0


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "source":
        _source(_shape_from(rest), rest[1])
    elif role == "client":
        _client(_shape_from(rest), rest[1], rest[2])
    else:
        raise SystemExit(f"unknown role {role!r}")
