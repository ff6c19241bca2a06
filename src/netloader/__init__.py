"""netloader: a new inference instance takes its weights from a running one, device to device.

Public API::

    server = netloader.WeightServer(model, model_id="llama-3-8b", rank=0).start()   # on the source
    report = netloader.load_weights(model, [server.address], model_id="llama-3-8b")  # on the client
    info = netloader.probe("10.0.0.5:47000")

Discovery instead of addresses: ``WeightServer(..., registry=URL)`` and ``load_weights(model, registry=URL, ...)``
(see :mod:`netloader.registry`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .client import LoadReport, load_weights, probe, verify_source
from .errors import (
    AuthenticationError,
    BusyError,
    ConfigError,
    ConnectError,
    IdentityMismatchError,
    IntegrityError,
    ManifestMismatchError,
    MismatchError,
    NetloaderError,
    NoSourceError,
    ProtocolError,
    RegistryError,
    TransferError,
    TransferTimeoutError,
)
from .manifest import Identity, Manifest, TensorSpec
from .plan import PlanParams
from .protocol import Info as ProbeInfo
from .server import WeightServer

__all__ = [
    "AuthenticationError",
    "BusyError",
    "ConfigError",
    "ConnectError",
    "Identity",
    "IdentityMismatchError",
    "IntegrityError",
    "LoadReport",
    "Manifest",
    "ManifestMismatchError",
    "MismatchError",
    "NetloaderError",
    "NoSourceError",
    "PlanParams",
    "ProbeInfo",
    "ProtocolError",
    "RegistryError",
    "TensorSpec",
    "TransferError",
    "TransferTimeoutError",
    "WeightServer",
    "__version__",
    "load_weights",
    "probe",
    "verify_source",
]
