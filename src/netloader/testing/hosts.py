"""Emulated hosts on one machine: network namespaces on a bridge, with rate limits and link cuts (root only).

Each :class:`Host` is a network namespace with one interface (``eth0``, an address on a private /24) whose veth
peer is a port of a bridge living in a namespace of its own (the "switch"), so nothing touches the machine's own
network. What a test or a benchmark can do to a host:

- ``host.popen([...])`` runs a process inside the namespace (``ip netns exec``);
- ``host.set_rate(mbit)`` limits the host's link both ways (``tc`` tbf on its ``eth0`` and on its bridge port);
- ``net.cut(host)`` / ``net.heal(host)`` stop and restore forwarding on the host's bridge port (the port's STP
  state set to *disabled*: every frame in either direction is dropped at the switch, while both ends keep their
  carrier, so neither kernel notices anything and no FIN or RST is sent: a partition, as a pulled cable between
  two switches looks);
- ``netloader.testing.lossy.LossyLink(a, b, loss=..., delay=...)`` adds a second link between two hosts that
  drops and delays frames (this kernel has no netem).

Names are unique per network (``nl<6 hex>...``), and everything is torn down by :meth:`Network.close`, at
interpreter exit, and on SIGTERM/SIGINT/SIGHUP (processes started with ``popen`` are killed first).
``ip`` and ``tc`` (iproute2) must be installed; a missing tool or a missing privilege raises
:class:`HostsUnavailable` with the reason: tests built on this fail loudly rather than skip.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

SUBNET = "10.213.7"


class HostsUnavailable(RuntimeError):
    """Emulated hosts cannot be built here (not root, no iproute2, no namespaces)."""


def _run(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as exc:
        raise HostsUnavailable(f"{argv[0]} is not installed (iproute2 is needed): {exc}") from None
    if done.returncode != 0:
        raise HostsUnavailable(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass
class Host:
    net: Network
    name: str
    ns: str
    address: str
    port: str  # the bridge-side veth in the switch namespace
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host's namespace (``subprocess.Popen`` keyword arguments pass through)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, *argv: str) -> str:
        return _run("ip", "netns", "exec", self.ns, *argv)

    def set_rate(self, mbit: float | None) -> None:
        """Limit this host's link to ``mbit`` Mbit/s in both directions (None: no limit): a ``tc`` tbf on its
        ``eth0`` (what it sends) and one on its bridge port (what it receives), like a host's NIC on a switch."""
        for args in (("-n", self.ns, "qdisc", "{}", "dev", "eth0"), ("-n", self.net.switch, "qdisc", "{}", "dev",
                                                                    self.port)):
            with contextlib.suppress(HostsUnavailable):
                _run("tc", *(a.format("del") for a in args), "root")
            if mbit is not None:
                burst = max(32, int(mbit * 1e6 / 8 / 250 / 1024))  # ~4 ms of bytes, in KiB
                _run("tc", *(a.format("add") for a in args), "root", "tbf", "rate", f"{mbit}mbit", "burst",
                     f"{burst}kb", "latency", "100ms")

    def kill_processes(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    proc.wait(10)
        self.procs.clear()


class Network:
    """A switch and the hosts plugged into it. Use as a context manager, or call :meth:`close`."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise HostsUnavailable("emulated hosts need root (network namespaces)")
        for tool in ("ip", "tc", "bridge"):
            if shutil.which(tool) is None:
                raise HostsUnavailable(f"`{tool}` is not installed (iproute2 is needed)")
        self.tag = f"nl{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-sw"
        self.hosts: list[Host] = []
        self._closed = False
        _register(self)
        try:
            _run("ip", "netns", "add", self.switch)
            _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str, *, rate_mbit: float | None = None) -> Host:
        index = len(self.hosts) + 1
        if index > 250:
            raise ValueError("at most 250 hosts per network")
        ns = f"{self.tag}-{name}"
        port = f"{self.tag}p{index}"
        host = Host(self, name, ns, f"{SUBNET}.{index}", port)
        self.hosts.append(host)
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", port, "netns", self.switch)
        _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        if rate_mbit is not None:
            host.set_rate(rate_mbit)
        return host

    def cut(self, host: Host) -> None:
        """Drop every frame to and from ``host`` at its switch port; neither end sees its link go down."""
        _run("bridge", "-n", self.switch, "link", "set", "dev", host.port, "state", "0")

    def heal(self, host: Host) -> None:
        _run("bridge", "-n", self.switch, "link", "set", "dev", host.port, "state", "3")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for host in self.hosts:
            host.kill_processes()
        for ns in [h.ns for h in self.hosts] + [self.switch]:
            with contextlib.suppress(HostsUnavailable):
                _run("ip", "netns", "del", ns)
        _unregister(self)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- teardown at exit and on signals

_live: list[Network] = []
_lock = threading.Lock()
_installed = False


def _close_all() -> None:
    with _lock:
        nets = list(_live)
    for net in nets:
        with contextlib.suppress(Exception):
            net.close()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _close_all()
    previous = _previous.get(signum)
    if callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_previous: dict[int, Any] = {}


def _register(net: Network) -> None:
    global _installed
    with _lock:
        _live.append(net)
        if _installed:
            return
        _installed = True
    atexit.register(_close_all)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            _previous[signum] = signal.getsignal(signum)
            signal.signal(signum, _on_signal)


def _unregister(net: Network) -> None:
    with _lock:
        if net in _live:
            _live.remove(net)
