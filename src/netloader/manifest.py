"""Identity and manifest: what a process holds, described so two processes can prove they hold the same thing.

An :class:`Identity` names the model and the partition (``model_id``, ``rank``, ``layout`` such as TP/PP).
A :class:`Manifest` is the ordered list of tensors (name, shape, dtype) that will be transferred; names that
share storage with an earlier name (tied weights) are listed as aliases and move once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Union

import torch
from torch import nn

from .errors import ConfigError, IdentityMismatchError, ManifestMismatchError

LayoutValue = Union[int, str]  # noqa: UP007 - kept readable on Python 3.10

#: dtypes netloader moves; any dtype is moved as raw bytes, so this is the list of names both sides may use.
_DTYPE_NAMES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
)
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _DTYPE_NAMES if isinstance(getattr(torch, name, None), torch.dtype)
}
_DTYPE_TO_NAME = {dtype: name for name, dtype in DTYPES.items()}

MAX_NAME_LEN = 1024
MAX_DIMS = 32
MAX_LAYOUT_ENTRIES = 64
_LAYOUT_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_TO_NAME[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype} is not supported by netloader") from None


_ELEMENT_SIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}


def element_size(dtype: str) -> int:
    return _ELEMENT_SIZE[dtype]


class TensorSpec(NamedTuple):
    """One named tensor: its shape and dtype, or the earlier name it is tied to.

    A named tuple rather than a dataclass: a manifest holds one per tensor (20 000 for a MoE model), and tuples
    are built and compared in C.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    tied_to: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (0 for an alias: it moves with the tensor it is tied to)."""
        return 0 if self.tied_to is not None else self.numel * element_size(self.dtype)

    def describe(self) -> str:
        base = f"{self.dtype}{list(self.shape)}"
        return f"{base} tied to {self.tied_to!r}" if self.tied_to else base

    def to_wire(self) -> list[object]:
        return [self.name, list(self.shape), self.dtype, self.tied_to]


@dataclass(frozen=True)
class Manifest:
    """The ordered tensors of one side. Equality is exact: same names, order, shapes, dtypes and ties."""

    specs: tuple[TensorSpec, ...]

    @property
    def moving(self) -> list[TensorSpec]:
        """The specs that carry bytes (aliases excluded), in order."""
        return [s for s in self.specs if s.tied_to is None]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def to_wire(self) -> list[list[object]]:
        return [s.to_wire() for s in self.specs]

    @classmethod
    def from_wire(cls, rows: Iterable[tuple[str, list[int], str, str | None]]) -> Manifest:
        specs = tuple(TensorSpec(name, tuple(shape), dtype, tied) for name, shape, dtype, tied in rows)
        manifest = cls(specs)
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Structural checks: unique names, known dtypes, sane shapes, aliases point backwards to real tensors."""
        seen: dict[str, TensorSpec] = {}
        for spec in self.specs:
            name, shape, dtype, tied_to = spec
            if not name or len(name) > MAX_NAME_LEN:
                raise ConfigError(f"tensor name of length {len(name)} is not allowed")
            if name in seen:
                raise ConfigError(f"tensor name {name!r} appears twice")
            if dtype not in DTYPES:
                raise ConfigError(f"tensor {name!r}: unknown dtype {dtype!r}")
            if len(shape) > MAX_DIMS or (shape and min(shape) < 0):
                raise ConfigError(f"tensor {name!r}: invalid shape {list(shape)}")
            if tied_to is not None:
                target = seen.get(tied_to)
                if target is None or target.tied_to is not None:
                    raise ConfigError(f"tensor {name!r} is tied to {tied_to!r}, which is not before it")
            seen[name] = spec

    def differences(self, other: Manifest, limit: int = 8) -> list[str]:
        """Human-readable differences, ``self`` being the local side and ``other`` the source."""
        if self.specs == other.specs:
            return []
        mine = {s.name: s for s in self.specs}
        theirs = {s.name: s for s in other.specs}
        out: list[str] = []
        for spec in other.specs:
            local = mine.get(spec.name)
            if local is None:
                out.append(f"{spec.name!r}: missing here (source has {spec.describe()})")
            elif local != spec:
                what = []
                if local.shape != spec.shape:
                    what.append(f"shape {list(local.shape)} here vs {list(spec.shape)} at source")
                if local.dtype != spec.dtype:
                    what.append(f"dtype {local.dtype} here vs {spec.dtype} at source")
                if local.tied_to != spec.tied_to:
                    what.append(f"tied to {local.tied_to!r} here vs {spec.tied_to!r} at source")
                out.append(f"{spec.name!r}: " + ", ".join(what))
        out.extend(
            f"{spec.name!r}: extra here ({spec.describe()}; the source has no such tensor)"
            for spec in self.specs
            if spec.name not in theirs
        )
        if not out:  # same entries, other order
            for i, (a, b) in enumerate(zip(self.specs, other.specs, strict=False)):
                if a.name != b.name:
                    out.append(f"order differs at position {i}: {a.name!r} here vs {b.name!r} at source")
                    break
        return out[:limit] if limit else out

    def check_matches(self, source: Manifest) -> None:
        diffs = self.differences(source, limit=0)
        if diffs:
            shown = "; ".join(diffs[:5])
            more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
            raise ManifestMismatchError(
                f"manifest differs from the source's in {len(diffs)} place(s): {shown}{more}", diffs, source
            )


@dataclass(frozen=True)
class Identity:
    """What both sides must agree on before the manifest is even compared."""

    model_id: str
    rank: int = 0
    layout: Mapping[str, LayoutValue] = field(default_factory=dict)

    @classmethod
    def build(cls, model_id: str, rank: int = 0, layout: Mapping[str, LayoutValue] | None = None) -> Identity:
        if not isinstance(model_id, str) or not model_id or len(model_id) > MAX_NAME_LEN:
            raise ConfigError("model_id must be a non-empty string of at most 1024 characters")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"rank must be a non-negative int, got {rank!r}")
        items = dict(layout or {})
        if len(items) > MAX_LAYOUT_ENTRIES:
            raise ConfigError(f"layout has {len(items)} entries; at most {MAX_LAYOUT_ENTRIES} are allowed")
        for key, value in items.items():
            if not isinstance(key, str) or not _LAYOUT_KEY.match(key):
                raise ConfigError(f"layout key {key!r} must match {_LAYOUT_KEY.pattern}")
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ConfigError(f"layout[{key!r}] must be an int or a str, got {type(value).__name__}")
            if isinstance(value, str) and len(value) > 256:
                raise ConfigError(f"layout[{key!r}] is longer than 256 characters")
        return cls(model_id, rank, dict(sorted(items.items())))

    def to_wire(self) -> dict[str, object]:
        return {"model_id": self.model_id, "rank": self.rank, "layout": dict(self.layout)}

    def check_matches(self, source: Identity) -> None:
        """Raise :class:`IdentityMismatchError` naming every field that differs (``self`` is the requester)."""
        diffs = []
        if self.model_id != source.model_id:
            diffs.append(f"model_id {self.model_id!r} requested, source serves {source.model_id!r}")
        if self.rank != source.rank:
            diffs.append(f"rank {self.rank} requested, source serves rank {source.rank}")
        if dict(self.layout) != dict(source.layout):
            diffs.append(f"layout {dict(self.layout)} requested, source serves {dict(source.layout)}")
        if diffs:
            raise IdentityMismatchError("identity mismatch: " + "; ".join(diffs))


class TensorSet:
    """The tensors of one side, in order, with ties resolved: what gets transferred, and its manifest.

    ``model`` is an ``nn.Module`` (all parameters, then all buffers) or a mapping name -> tensor. A name whose
    tensor is the same tensor (same storage, offset, shape, strides and dtype) as an earlier name is an alias.
    """

    def __init__(self, model: nn.Module | Mapping[str, torch.Tensor]) -> None:
        if isinstance(model, nn.Module):
            named = _parameters_then_buffers(model)
        elif isinstance(model, Mapping):
            named = list(model.items())
        else:
            raise ConfigError(f"model must be an nn.Module or a mapping of name -> tensor, got {type(model)!r}")
        specs: list[TensorSpec] = []
        tensors: list[torch.Tensor] = []
        by_key: dict[tuple[object, ...], str] = {}
        names: set[str] = set()
        devices: set[torch.device] = set()
        strided = torch.strided
        for name, tensor in named:  # one pass, no per-tensor work beyond what the manifest needs
            if tensor is None:
                continue
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise ConfigError(f"entry {name!r} is not a (str, Tensor) pair")
            if name in names:
                raise ConfigError(f"tensor name {name!r} appears twice")
            names.add(name)
            # a view of its own: the set keeps the storage it described even if the owner later rebinds
            # ``param.data`` (the plan's lengths, and on CPU the executors' raw addresses, come from it)
            tensor = tensor.detach()
            if tensor.layout is not strided:
                raise ConfigError(f"tensor {name!r} has layout {tensor.layout}; only dense tensors are supported")
            device = tensor.device
            devices.add(device)
            shape = tuple(tensor.shape)
            dtype = dtype_name(tensor.dtype)
            if tensor.numel():  # an alias is the same bytes seen the same way; empty tensors alias nothing
                key = (device, tensor.data_ptr(), dtype, shape, tensor.stride())
                canonical = by_key.get(key)
                if canonical is not None:
                    specs.append(TensorSpec(name, shape, dtype, canonical))
                    continue
                by_key[key] = name
            specs.append(TensorSpec(name, shape, dtype))
            tensors.append(tensor)
        kinds = {device.type for device in devices}
        if len(kinds) > 1:
            raise ConfigError(f"all tensors must be on one kind of device, got {sorted(kinds)}")
        self.manifest = Manifest(tuple(specs))
        self.manifest.validate()
        #: the tensors that carry bytes, aligned with ``manifest.moving``
        self.tensors: list[torch.Tensor] = tensors
        self.device: torch.device = tensors[0].device if tensors else torch.device("cpu")

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes


def _parameters_then_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor | None]]:
    """What ``named_parameters`` then ``named_buffers`` (``remove_duplicate=False``) list, in one iterative walk
    of the module tree (``named_modules`` recurses through generators: 34 ms for a 26 000-module MoE model)."""
    params: list[tuple[str, torch.Tensor | None]] = []
    buffers: list[tuple[str, torch.Tensor | None]] = []
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:  # pre-order, children in registration order, as named_modules visits them
        prefix, module = stack.pop()
        dot = prefix + "." if prefix else ""
        params += [(dot + name, tensor) for name, tensor in module._parameters.items()]
        buffers += [(dot + name, tensor) for name, tensor in module._buffers.items()]
        children = module._modules
        if children:
            stack += [(dot + name, child) for name, child in reversed(children.items()) if child is not None]
    return params + buffers
