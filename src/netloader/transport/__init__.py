"""Transports under the executors: netloader streams (:mod:`.streams`, the CPU default) and torch.distributed
(:mod:`.dist`: NCCL, HCCL, and gloo when asked for), behind one small interface (:mod:`.base`)."""

from .base import DEFAULT_TRANSPORT, TRANSPORTS, Transport, default_transport, resolve_transport

__all__ = ["DEFAULT_TRANSPORT", "TRANSPORTS", "Transport", "default_transport", "resolve_transport"]
