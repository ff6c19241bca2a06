"""Models the tests move, built identically in the pytest process and in spawned source/client processes."""

from __future__ import annotations

import torch
from torch import nn

from netloader.synthetic import LlamaShape, build_model, fill_, fill_tensor_, llama_of_size

#: a Llama-shaped model small enough for "mib<N>" to be about N MiB from 40 MiB up (32k vocab, as "llama<N>"
#: uses, makes any model below 348 MiB one layer of 348 MiB)
SMALL_SHAPE = LlamaShape(vocab=8192, hidden=1024, intermediate=2816, layers=1, heads=8, kv_heads=8)

#: every dtype the core must move bit-exact
DTYPES = [
    torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


class Mixed(nn.Module):
    """Parameters of every dtype, non-contiguous ones (small: packed; large: direct), a 0-d and a 0-size
    tensor, tied weights and buffers."""

    def __init__(self, variant: str = "base") -> None:
        super().__init__()
        for i, dtype in enumerate(DTYPES):
            name = str(dtype).replace("torch.", "")
            self.register_parameter(f"small_{name}", nn.Parameter(torch.empty(3, 5 + i, dtype=dtype), False))
            self.register_parameter(f"large_{name}", nn.Parameter(torch.empty(300, 1000 + i, dtype=dtype), False))
        self.noncontig_small = nn.Parameter(torch.empty(8, 6).t(), requires_grad=False)
        self.noncontig_large = nn.Parameter(torch.empty(1024, 700, dtype=torch.bfloat16).t(), requires_grad=False)
        self.scalar = nn.Parameter(torch.empty(()), requires_grad=False)
        self.empty = nn.Parameter(torch.empty(0, 7), requires_grad=False)
        self.embed = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("steps", torch.empty(5, dtype=torch.int64))
        self.register_buffer("cache", torch.empty(4, 16, dtype=torch.float16), persistent=False)
        if variant == "shape":
            self.scalar = nn.Parameter(torch.empty(1), requires_grad=False)
        elif variant == "dtype":
            self.register_buffer("steps", torch.empty(5, dtype=torch.int32))
        elif variant == "extra":
            self.extra = nn.Parameter(torch.empty(2, 2), requires_grad=False)
        elif variant == "untied":
            self.head.weight = nn.Parameter(torch.empty(64, 32), requires_grad=False)


def many_small(count: int = 12_000) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i in range(count):
        out[f"experts.{i // 100}.w{i % 100}"] = torch.empty(3 + i % 13, dtype=torch.float16 if i % 3 else torch.float32)
    return out


def build(kind: str, seed: int | None, variant: str = "base") -> nn.Module | dict[str, torch.Tensor]:
    """The model ``kind``, filled from ``seed`` (None: zero-filled, as an empty client would be)."""
    if kind == "mixed":
        model: nn.Module | dict[str, torch.Tensor] = Mixed(variant)
    elif kind == "many":
        model = many_small()
    elif kind.startswith("llama"):  # llama<MiB>, e.g. llama1024 (at least 348 MiB: one layer of the demo shape)
        model = build_model(llama_of_size(int(kind[5:]) << 20), touch=seed is None)
    elif kind.startswith("mib"):  # mib<MiB>, e.g. mib64: a small Llama of about that size
        model = build_model(llama_of_size(int(kind[3:]) << 20, SMALL_SHAPE), touch=seed is None)
    else:
        raise ValueError(kind)
    if seed is None:
        tensors = model.values() if isinstance(model, dict) else [*model.parameters(), *model.buffers()]
        with torch.no_grad():
            for t in tensors:
                t.zero_()
    elif isinstance(model, dict):
        with torch.no_grad():
            for name, t in model.items():
                fill_tensor_(t, seed, name)
    else:
        fill_(model, seed)
    return model


def named(model: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model, dict):
        return dict(model)
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
