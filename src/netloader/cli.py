"""Command line: ``netloader probe [--verify] HOST:PORT``, ``netloader sources --registry URL``,
``netloader serve FILE``, ``netloader demo``, ``netloader bench``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from .errors import NetloaderError


def _probe(args: argparse.Namespace) -> int:
    from .client import probe

    if args.verify:
        return _verify(args)
    info = probe(args.address, token=args.token, timeout=args.timeout)
    if args.json:
        print(info.model_dump_json(indent=2))
        return 0
    layout = ", ".join(f"{k}={v}" for k, v in info.layout.items()) or "-"
    print(f"source     {args.address} (netloader {info.version}, protocol {info.proto})")
    print(f"model_id   {info.model_id}")
    print(f"rank       {info.rank}")
    print(f"layout     {layout}")
    print(f"tensors    {info.tensors} ({info.bytes / 1e9:.3f} GB) on {info.device} via {info.backend}")
    print(
        f"transfers  {info.active_transfers} running of {info.max_concurrent} allowed, {info.transfers_served} served"
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    """The source hashes what it holds now and compares with the digests it serves: 0 all match, 1 some differ."""
    from .client import verify_source

    result = verify_source(args.address, token=args.token, timeout=args.timeout)
    if args.json:
        print(result.model_dump_json(indent=2))
        return 1 if result.mismatches else 0
    basis = ("digests computed by this request (no load served yet: nothing older to compare)" if result.computed_now
             else "the digests it serves (its origin's)")
    print(f"source     {args.address}: {result.tensors} tensors hashed ({result.algorithm}) in {result.seconds:.2f} s, "
          f"compared with {basis}")
    if not result.mismatches:
        print(f"verify     0 of {result.tensors} tensors differ: every tensor matches")
        return 0
    print(f"verify     {result.mismatches} of {result.tensors} tensors differ from the served digests:")
    for name in result.names:
        print(f"  {name}")
    if result.mismatches > len(result.names):
        print(f"  ... and {result.mismatches - len(result.names)} more")
    return 1


def _sources(args: argparse.Namespace) -> int:
    from .registry import open_registry

    if not args.registry:
        print("netloader: give --registry URL or set $NETLOADER_REGISTRY", file=sys.stderr)
        return 2
    with open_registry(args.registry, timeout=args.timeout) as registry:
        live = registry.listing(args.model_id)
    live.sort(key=lambda e: (e.record.model_id, e.record.rank, sorted(e.record.layout.items()), e.record.address))
    if args.json:
        print(json.dumps([{**e.record.model_dump(), "age": round(e.age, 3)} for e in live], indent=2))
        return 0
    rows = [("MODEL", "RANK", "LAYOUT", "ADDRESS", "STATE", "PROGRESS", "TRANSFERS", "AGE")]
    for entry in live:
        r = entry.record
        layout = ",".join(f"{k}={v}" for k, v in r.layout.items()) or "-"
        rows.append((r.model_id, str(r.rank), layout, r.address, r.state, f"{r.progress:.0%}",
                     f"{r.active_transfers}/{r.max_concurrent}", f"{entry.age:.1f}s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from .server import WeightServer

    tensors = load_file(args.file, device=args.device)
    layout = json.loads(args.layout) if args.layout else None
    server = WeightServer(
        tensors, model_id=args.model_id, rank=args.rank, layout=layout, host=args.host, port=args.port,
        token=args.token, registry=args.registry,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        print(f"serving {args.file} as {args.model_id!r} rank {args.rank} on {server.address}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(gib=args.gib, workdir=args.workdir)


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netloader", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    token_help = "shared token (default: $NETLOADER_TOKEN)"

    p = sub.add_parser("probe", help="ask a source what it serves (--verify: check its tensors against its digests)")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--verify", action="store_true", help="the source hashes the tensors it holds now and compares "
                   "them with the digests it serves; exit status 1 when any differ")
    p.add_argument("--token", default=os.environ.get("NETLOADER_TOKEN"), help=token_help)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--json", action="store_true", help="print the raw answer as JSON")
    p.set_defaults(func=_probe)

    p = sub.add_parser("sources", help="list the live sources a registry holds")
    p.add_argument("--registry", default=os.environ.get("NETLOADER_REGISTRY"),
                   help="file:///dir, redis://host:port/db or rediss://... (default: $NETLOADER_REGISTRY)")
    p.add_argument("--model-id", help="only this model's sources")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds each registry call may take")
    p.add_argument("--json", action="store_true", help="print the records as JSON (age: seconds since a heartbeat)")
    p.set_defaults(func=_sources)

    p = sub.add_parser("serve", help="serve the tensors of a safetensors file")
    p.add_argument("file")
    p.add_argument("--model-id", required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--layout", help='JSON object, e.g. \'{"tp": 2, "pp": 1}\'')
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--token", default=os.environ.get("NETLOADER_TOKEN"), help=token_help)
    p.add_argument("--registry", default=os.environ.get("NETLOADER_REGISTRY"),
                   help="publish this source in a registry (default: $NETLOADER_REGISTRY)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("demo", help="move a generated ~1 GiB Llama-shaped model between two processes")
    p.add_argument("--gib", type=float, default=1.0, help="model size in GiB (default 1)")
    p.add_argument("--workdir", help="where to write the temporary safetensors file")
    p.set_defaults(func=_demo)

    from .bench import add_arguments

    p = sub.add_parser("bench", help="every loading method side by side on the same models (what `make bench` runs)")
    add_arguments(p)
    p.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except NetloaderError as exc:
        print(f"netloader: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
