"""The small interface every transport offers the executors: post a send or a receive of a buffer with a tag,
then wait for (or poll) its completion.

Messages are posted in the same order on both sides (the order of the plan's messages the transfer moves), and
each transport guarantees that a posted receive only ever takes bytes the matching send carried: same tag, same
length. The executors (:mod:`netloader.executor`) own the plan, the staging buffers and the in-flight window.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from ..errors import ConfigError

#: a transport's name -> the device type it moves tensors on
TRANSPORT_DEVICE: dict[str, str] = {"streams": "cpu", "gloo": "cpu", "nccl": "cuda", "hccl": "npu"}
#: the transport used when none is asked for (gloo is opt-in: its listener is unauthenticated)
DEFAULT_TRANSPORT: dict[str, str] = {"cpu": "streams", "cuda": "nccl", "npu": "hccl"}
TRANSPORTS = tuple(TRANSPORT_DEVICE)

Check = Callable[[], None]


def default_transport(device: torch.device) -> str:
    try:
        return DEFAULT_TRANSPORT[device.type]
    except KeyError:
        raise ConfigError(f"no netloader data plane for device type {device.type!r}") from None


def resolve_transport(name: str, device: torch.device) -> str:
    """``"auto"`` -> the device's default; any other name is checked against the device."""
    if name == "auto":
        return default_transport(device)
    if name not in TRANSPORT_DEVICE:
        raise ConfigError(f"transport must be 'auto' or one of {', '.join(TRANSPORTS)}; got {name!r}")
    if TRANSPORT_DEVICE[name] != device.type:
        raise ConfigError(f"transport {name!r} moves {TRANSPORT_DEVICE[name]} tensors; these are on {device.type}")
    return name


class Transport(abc.ABC):
    """One transfer's data path between the source and the client."""

    #: bytes written into receive buffers so far, whole messages or not (for what a failover refetches)
    received_bytes: int = 0

    @abc.abstractmethod
    def post_send(self, buf: torch.Tensor, tag: int) -> object:
        """Start sending ``buf`` (1-D uint8, kept alive by the caller until completion) as message ``tag``."""

    @abc.abstractmethod
    def post_recv(self, buf: torch.Tensor, tag: int) -> object:
        """Start receiving message ``tag`` into ``buf`` (exactly ``buf``'s length)."""

    @abc.abstractmethod
    def wait(self, handle: object, check: Check) -> None:
        """Return once ``handle`` completed; run ``check`` every 50 ms until then; raise TransferError on failure."""

    @abc.abstractmethod
    def completed(self, handle: object) -> bool:
        """True if ``handle`` completed successfully (without waiting; its buffer is no longer written)."""

    @abc.abstractmethod
    def close(self, ok: bool) -> None:
        """Let go of sockets and threads. After a failure, nothing is written into posted buffers once this returns
        (where the backend allows: see :mod:`netloader.transport.dist`)."""
