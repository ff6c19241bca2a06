"""``netloader bench --fleet``: fan-out and striping on emulated hosts with their own links (root only).

Every host is a network namespace on one bridge (:mod:`netloader.testing.hosts`) with its link limited to
``--fleet-mbit`` (400 Mbit/s) both ways; one *origin* serves a Llama-shaped model of about ``--fleet-mib`` (the
default 200 MiB gives 348 MiB: the smallest shape has one layer and a 32k vocabulary). Worker processes (one per
host, this module's ``worker``) hold the model and stay up for the whole run; each load's target is zeroed before
it starts and its bytes are hashed after it (outside the timing) and compared with the origin's. Measured, medians
of ``--fleet-runs`` runs:

- **unit**: one new instance alone from the origin;
- **pull N** / **relay N** (N = 2, 4, 8 at once): every new instance loads from the origin (today's behaviour), or
  every new instance is a relay (``ready=False``) that fills from the one started before it (instance 1 from the
  origin) while serving: the chain the burst policy of :func:`netloader.registry.rank_sources` forms (least-loaded
  first, relays registered as they start). The time is until the *last* one is ready, as a multiple of the unit;
- **stripe k** (k = 1, 2, 4): one new instance on a ``4 x`` faster link, ``max_sources=k`` over k ready origins;
- **loopback** (no namespaces, no limit): a plain load, a striped one (``max_sources=2``, both sessions on the
  same source) and one from a relay that has finished its fill, side by side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

MiB = 1 << 20
MODEL_ID = "fleet"


# ---------------------------------------------------------------------- the worker (one per host)


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for _, tensor in sorted(model.state_dict(keep_vars=True).items()):
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def worker(spec: dict[str, Any]) -> None:
    """Serve (``origin``) or load on command (``new``); one JSON line per command on stdout."""
    import netloader
    from netloader.synthetic import build_model, fill_, llama_of_size

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    model = build_model(llama_of_size(spec["nbytes"]), touch=True)
    host = spec["host"]
    if spec["role"] == "origin":
        fill_(model, 7)
        server = netloader.WeightServer(model, model_id=MODEL_ID, host=host, max_concurrent=16, timeout=300,
                                        chunk_size=spec.get("chunk", 16 * MiB)).start()
        print(json.dumps({"address": server.address, "digest": _digest(model)}), flush=True)
        sys.stdin.read()
        server.close()
        return
    print(json.dumps({"ready": True}), flush=True)
    relay: netloader.WeightServer | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "relay":  # a fresh relay for the next load: its address now, its fill on "load"
            relay = netloader.WeightServer(model, model_id=MODEL_ID, host=host, ready=False, timeout=300,
                                           chunk_size=spec.get("chunk", 16 * MiB)).start()
            print(json.dumps({"address": relay.address}), flush=True)
            continue
        if cmd["cmd"] != "load":
            continue
        started = time.time()
        kwargs = {"timeout": 300.0, "progress": False, "max_sources": cmd.get("max_sources", 1)}
        if relay is not None:
            report = relay.fill(cmd["sources"], **kwargs)  # type: ignore[arg-type]
        else:
            report = netloader.load_weights(model, cmd["sources"], model_id=MODEL_ID, **kwargs)  # type: ignore[arg-type]
        finished = time.time()
        if relay is not None:  # serve until every downstream is done
            while relay.active_transfers:
                time.sleep(0.05)
        out = {"started": started, "finished": finished, "digest": _digest(model), "sources": report.sources}
        if relay is not None:
            relay.close()
            relay = None
        with torch.no_grad():
            for tensor in model.state_dict(keep_vars=True).values():
                tensor.zero_()
        print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------- the driver


class _Proc:
    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.p = popen

    def send(self, payload: dict[str, Any]) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(payload) + "\n")
        self.p.stdin.flush()

    def read(self, timeout: float = 600) -> dict[str, Any]:
        import select

        assert self.p.stdout is not None
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        line = self.p.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"fleet worker {self.p.pid} did not answer (exit {self.p.poll()})")
        return json.loads(line)


def _spawn(host: Any, role: str, nbytes: int, chunk: int = 16 * MiB) -> _Proc:
    spec = {"role": role, "nbytes": nbytes, "host": host.address if host is not None else "127.0.0.1",
            "chunk": chunk}
    argv = [sys.executable, "-m", "netloader.fleet", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    kwargs: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "env": env}
    popen = host.popen(argv, **kwargs) if host is not None else subprocess.Popen(argv, **kwargs)
    return _Proc(popen)


def _round(news: list[_Proc], sources_of: list[list[str]], digest: str, *, relay: bool = False,
           max_sources: int = 1) -> float:
    """One load on each of ``news`` at once; seconds from the first start to the last instance ready."""
    for proc, sources in zip(news, sources_of, strict=True):
        proc.send({"cmd": "load", "sources": sources, "max_sources": max_sources})
    outs = [proc.read() for proc in news]
    for out in outs:
        if out["digest"] != digest:
            raise RuntimeError("a fleet load was not bit-exact")
    return max(o["finished"] for o in outs) - min(o["started"] for o in outs)


def _chain(news: list[_Proc], origin: str, digest: str) -> float:
    """Every new instance a relay filling from the one before it (the first from the origin)."""
    addresses = []
    for proc in news:
        proc.send({"cmd": "relay"})
        addresses.append(proc.read()["address"])
    sources = [[origin]] + [[addresses[i - 1], origin] for i in range(1, len(news))]
    return _round(news, sources, digest, relay=True)


def run_fleet(nbytes: int = 200 * MiB, runs: int = 3, mbit: float = 400.0, log: Any = print) -> dict[str, Any]:
    from .testing.hosts import Network

    results: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)
        log(f"  {name}: {seconds:.2f} s")

    with Network() as net:
        origin_hosts = [net.add_host(f"o{i}", rate_mbit=mbit) for i in range(4)]
        origins = [_spawn(h, "origin", nbytes) for h in origin_hosts]
        infos = [o.read() for o in origins]
        addresses = [i["address"] for i in infos]
        digest = infos[0]["digest"]
        new_hosts = [net.add_host(f"n{i}", rate_mbit=mbit) for i in range(8)]
        news = [_spawn(h, "new", nbytes) for h in new_hosts]
        for proc in news:
            proc.read()
        wide = net.add_host("wide", rate_mbit=4 * mbit)
        striper = _spawn(wide, "new", nbytes)
        striper.read()
        for run in range(runs):
            log(f"fleet run {run + 1}/{runs}")
            record("unit", _round(news[:1], [[addresses[0]]], digest))
            for n in (2, 4, 8):
                record(f"pull{n}", _round(news[:n], [[addresses[0]]] * n, digest))
                record(f"relay{n}", _chain(news[:n], addresses[0], digest))
            for k in (1, 2, 4):
                record(f"stripe{k}", _round([striper], [addresses[:k]], digest, max_sources=k))
        for proc in [*origins, *news, striper]:
            if proc.p.stdin is not None:
                proc.p.stdin.close()
    # loopback: the new code paths against a plain load
    origin = _spawn(None, "origin", nbytes)
    info = origin.read()
    new = _spawn(None, "new", nbytes)
    new.read()
    for run in range(runs + 2):
        log(f"loopback run {run + 1}/{runs + 2}")
        record("loop_plain", _round([new], [[info["address"]]], info["digest"]))
        record("loop_striped", _round([new], [[info["address"]]], info["digest"], max_sources=2))
        record("loop_relay", _chain([new], info["address"], info["digest"]))
    for proc in (origin, new):
        if proc.p.stdin is not None:
            proc.p.stdin.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    unit = med["unit"]
    from .synthetic import llama_of_size

    return {"nbytes": nbytes, "model_bytes": llama_of_size(nbytes).nbytes, "mbit": mbit, "runs": runs,
            "seconds": results, "median": med,
            "ratio": {k: v / unit for k, v in med.items() if not k.startswith("loop")},
            "loopback_vs_plain": {k: v / med["loop_plain"] for k, v in med.items() if k.startswith("loop")}}


def render(result: dict[str, Any]) -> str:
    m, r = result["median"], result["ratio"]
    lines = [
        f"Fleet: {result.get('model_bytes', result['nbytes']) / MiB:.0f} MiB model (the Llama shape closest to "
        f"{result['nbytes'] / MiB:.0f} MiB: one layer and its 32k vocabulary), every host's link "
        f"{result['mbit']:.0f} Mbit/s both ways, "
        f"medians of {result['runs']} runs, every load bit-exact. Unit (one new instance alone): {m['unit']:.2f} s.",
        "",
        "| new instances at once | pull from the origin | relay chain | goal (relay) |",
        "|---|---|---|---|",
    ]
    goals = {2: "", 4: "<= 1.3x", 8: "<= 1.5x"}
    for n in (2, 4, 8):
        lines.append(f"| {n} | {m[f'pull{n}']:.2f} s ({r[f'pull{n}']:.2f}x) | {m[f'relay{n}']:.2f} s "
                     f"({r[f'relay{n}']:.2f}x) | {goals[n]} |")
    lines += ["", "| sources (new instance at 4x link) | time | of the unit | goal |", "|---|---|---|---|"]
    for k, goal in ((1, ""), (2, "<= 0.6x"), (4, "<= 0.35x")):
        lines.append(f"| {k} | {m[f'stripe{k}']:.2f} s | {r[f'stripe{k}']:.2f}x | {goal} |")
    lb = result["loopback_vs_plain"]
    lines += ["", f"Loopback, no limit: plain {m['loop_plain']:.3f} s; striped code path {lb['loop_striped']:.3f}x, "
              f"relay {lb['loop_relay']:.3f}x of plain (goal: within 5%)."]
    return "\n".join(lines)


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
