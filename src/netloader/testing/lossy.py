"""A lossy, slow link between two emulated hosts, for kernels without netem: TAP devices and a frame forwarder.

What it emulates: a point-to-point Ethernet link (a cable with a bad switch in the middle) that drops a random
fraction of the frames crossing it, independently in each direction, and delivers the others after a fixed
one-way delay, in order. Every frame is affected alike (ARP, TCP data, ACKs, SYNs), so the hosts' TCP stacks see
real packet loss and a real round-trip time, and recover as they would on a real network (retransmission,
congestion control). It does not emulate reordering, duplication, corruption (the kernel's checksums would
catch it), bandwidth limits (the forwarder's own speed is the only one) or jitter.

How: :class:`LossyLink` starts a forwarder process (``python -m netloader.testing.lossy``) that opens one TAP
device inside each of the two hosts' network namespaces (``setns`` before ``TUNSETIFF``: the device is created in
that namespace and the forwarder keeps its file descriptor), gives each an address on a /24 of its own, and then
moves raw frames between the two descriptors: each frame read from one side is dropped with probability ``loss``
(a seeded ``random.Random``, so a run can be repeated) or written to the other side ``delay`` seconds later.
The TAP devices use a 9000-byte MTU (jumbo frames), so that a 1-2% loss still leaves TCP a usable throughput.
Root only, like :mod:`netloader.testing.hosts`; a missing ``/dev/net/tun`` raises :class:`HostsUnavailable`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import fcntl
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any

from .hosts import Host, HostsUnavailable, _run

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
MTU = 9000
#: lossy links get addresses 10.213.<100 + n>.{1,2}
SUBNET_BASE = 100


def _open_tap(ns: str, name: str) -> int:
    """A TAP device called ``name`` created inside network namespace ``ns``; returns its file descriptor."""
    libc = ctypes.CDLL(None, use_errno=True)
    nsfd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(nsfd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
    finally:
        os.close(nsfd)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def forward(fds: tuple[int, int], loss: float, delay: float, seed: int, counts: dict[str, int]) -> None:
    """Move frames between the two TAP descriptors until SIGTERM: drop each with probability ``loss``, deliver
    the others ``delay`` seconds after they were read (a FIFO per direction: the delay is the same for all);
    ``counts`` (forwarded, dropped) is kept up to date."""
    rng = random.Random(seed)
    queues: list[collections.deque[tuple[float, bytes]]] = [collections.deque(), collections.deque()]
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    for fd in fds:
        os.set_blocking(fd, False)
    while not stop:
        now = time.monotonic()
        waits = [q[0][0] - now for q in queues if q]
        timeout = max(0.0, min(waits)) if waits else 1.0
        try:
            readable, _, _ = select.select(list(fds), [], [], min(timeout, 0.5))
        except InterruptedError:
            continue
        now = time.monotonic()
        for side, fd in enumerate(fds):
            if fd not in readable:
                continue
            for _ in range(64):  # drain what is there, a bounded batch at a time
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if rng.random() < loss:
                    counts["dropped"] += 1
                    continue
                queues[side].append((now + delay, frame))
        now = time.monotonic()
        for side, queue in enumerate(queues):
            out = fds[1 - side]
            while queue and queue[0][0] <= now:
                _, frame = queue.popleft()
                with contextlib.suppress(BlockingIOError, OSError):  # a full queue drops, as a switch would
                    os.write(out, frame)
                    counts["forwarded"] += 1


class LossyLink:
    """A second link between hosts ``a`` and ``b`` (besides the switch) that loses and delays frames.

    ``link.address(a)`` / ``link.address(b)``: each host's address on this link; what a process of one host sends
    to the other's address crosses the forwarder. :meth:`close` (also done by the network's teardown, which
    kills the hosts' namespaces) stops the forwarder, and the TAP devices go with it; ``counts`` is then the
    forwarder's {"forwarded", "dropped"} frames.
    """

    _count = 0

    def __init__(self, a: Host, b: Host, *, loss: float = 0.0, delay: float = 0.0, seed: int = 0) -> None:
        if not os.path.exists("/dev/net/tun"):
            raise HostsUnavailable("/dev/net/tun is missing: lossy links need TAP devices")
        if not 0 <= loss < 1 or not 0 <= delay <= 10:
            raise ValueError(f"loss must be in [0, 1) and delay in [0, 10] s, got {loss!r}, {delay!r}")
        LossyLink._count += 1
        subnet = f"10.213.{SUBNET_BASE + LossyLink._count % 100}"
        self.hosts = (a, b)
        self.addresses = {a.name: f"{subnet}.1", b.name: f"{subnet}.2"}
        self.loss, self.delay, self.seed = loss, delay, seed
        self.counts: dict[str, int] = {}
        self.device = f"nltap{LossyLink._count}"  # the TAP device's name in both hosts (one per link)
        spec = {"namespaces": [a.ns, b.ns], "device": self.device, "loss": loss, "delay": delay, "seed": seed}
        self.proc = subprocess.Popen([sys.executable, "-m", "netloader.testing.lossy", json.dumps(spec)],
                                     stdout=subprocess.PIPE, text=True)
        a.procs.append(self.proc)  # the network's teardown kills it too
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line or json.loads(line).get("ready") is not True:
            self.close()
            raise HostsUnavailable(f"the lossy-link forwarder did not start (exit {self.proc.poll()}): {line!r}")
        for host in (a, b):
            _run("ip", "-n", host.ns, "link", "set", self.device, "mtu", str(MTU))
            _run("ip", "-n", host.ns, "addr", "add", f"{self.addresses[host.name]}/24", "dev", self.device)
            _run("ip", "-n", host.ns, "link", "set", self.device, "up")

    def address(self, host: Host) -> str:
        return self.addresses[host.name]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                out, _ = self.proc.communicate(timeout=10)
                last = out.strip().splitlines()[-1:] if out else []
                self.counts = json.loads(last[0]) if last else {}
            except (subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
        self.proc.wait(10)

    def __enter__(self) -> LossyLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="forward frames between two TAP devices, losing and delaying")
    parser.add_argument("spec", help='JSON: {"namespaces": [ns_a, ns_b], "device": name, "loss": p, "delay": s, '
                                     '"seed": n}')
    spec: dict[str, Any] = json.loads(parser.parse_args(argv).spec)
    fds = (_open_tap(spec["namespaces"][0], spec["device"]), _open_tap(spec["namespaces"][1], spec["device"]))
    print(json.dumps({"ready": True}), flush=True)
    counts = {"forwarded": 0, "dropped": 0}
    forward(fds, float(spec["loss"]), float(spec["delay"]), int(spec["seed"]), counts)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
