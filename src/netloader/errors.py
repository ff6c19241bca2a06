"""One exception tree: every error a caller should catch is a :class:`NetloaderError`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manifest import Manifest


class NetloaderError(Exception):
    """Base of every error netloader raises on purpose."""


class ConfigError(NetloaderError, ValueError):
    """An argument or configuration value is invalid (raised before anything touches the network)."""


class ProtocolError(NetloaderError):
    """A peer sent something that is not a valid netloader message (bad frame, bad field, wrong version)."""


class ConnectError(NetloaderError):
    """The source could not be reached (refused, unreachable, or it did not answer in time)."""


class BusyError(NetloaderError):
    """The source is already running as many transfers as it allows; try the next source."""


class AuthenticationError(NetloaderError):
    """Token authentication failed, in either direction."""


class MismatchError(NetloaderError):
    """The client and the source do not hold the same thing; nothing was transferred."""


class IdentityMismatchError(MismatchError):
    """``model_id``, ``rank``, ``layout`` or data-plane backend differ."""


class ManifestMismatchError(MismatchError):
    """The ordered per-tensor manifests (name, shape, dtype) differ.

    ``source`` is the source's manifest when the source sent one: what a caller may compare its model against.
    """

    def __init__(self, message: str, differences: list[str] | None = None, source: Manifest | None = None) -> None:
        super().__init__(message)
        self.differences: list[str] = differences or []
        self.source: Manifest | None = source


class TransferError(NetloaderError):
    """The weight transfer started but did not complete; the target may be partly written.

    ``completed_ops`` counts the leading messages of the plan that are fully in place (for a resumed load).
    """

    completed_ops: int = 0


class TransferTimeoutError(TransferError, TimeoutError):
    """A step of the transfer made no progress within the timeout."""


class IntegrityError(TransferError):
    """Tensors arrived whose bytes do not match the origin's digests (see :mod:`netloader.integrity`).

    ``corrupt`` maps each source that sent bad bytes to the tensor names; ``failures`` (when the whole load failed)
    maps every source tried to its error, as :class:`NoSourceError` does. The target must not be used.
    """

    def __init__(
        self,
        message: str,
        corrupt: Mapping[str, list[str]] | None = None,
        failures: Mapping[str, BaseException] | None = None,
    ) -> None:
        super().__init__(message)
        self.corrupt: dict[str, list[str]] = dict(corrupt or {})
        self.failures: dict[str, BaseException] = dict(failures or {})


class RegistryError(NetloaderError):
    """A registry could not be reached or answered in time (see :mod:`netloader.registry`)."""


class NoSourceError(NetloaderError):
    """Every source failed. ``failures`` maps each source address to the error it gave; ``message`` replaces
    the first line (e.g. why a registry offered no source)."""

    def __init__(self, failures: Mapping[str, BaseException], message: str | None = None) -> None:
        self.failures: dict[str, BaseException] = dict(failures)
        if self.failures:
            lines = [f"  {src}: {type(err).__name__}: {err}" for src, err in self.failures.items()]
            message = (message or "no source could serve the weights") + ":\n" + "\n".join(lines)
        elif message is None:
            message = "no source given"
        super().__init__(message)
