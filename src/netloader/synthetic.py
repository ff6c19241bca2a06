"""Models with generated weights (no download), for the demo, the benchmarks and the tests.

The shapes follow Llama (embedding, per-layer attention q/k/v/o and MLP gate/up/down, RMSNorm weights,
lm_head) and a Mixture-of-Experts variant with many small expert matrices. Weights are filled
deterministically from a seed and each tensor's name, so two processes can build the same model
independently.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from .manifest import DTYPES


@dataclass(frozen=True)
class LlamaShape:
    vocab: int = 32000
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 8
    heads: int = 16
    kv_heads: int = 16
    dtype: str = "bfloat16"
    tie_embeddings: bool = False
    #: experts per layer (0: a dense MLP)
    experts: int = 0
    expert_intermediate: int = 0

    def named_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (self.hidden,)),
                (p + "self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (p + "self_attn.k_proj.weight", (kv, self.hidden)),
                (p + "self_attn.v_proj.weight", (kv, self.hidden)),
                (p + "self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (p + "post_attention_layernorm.weight", (self.hidden,)),
            ]
            if self.experts:
                out.append((p + "mlp.gate.weight", (self.experts, self.hidden)))
                for e in range(self.experts):
                    q = f"{p}mlp.experts.{e}."
                    out += [
                        (q + "gate_proj.weight", (self.expert_intermediate, self.hidden)),
                        (q + "up_proj.weight", (self.expert_intermediate, self.hidden)),
                        (q + "down_proj.weight", (self.hidden, self.expert_intermediate)),
                    ]
            else:
                out += [
                    (p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                    (p + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                    (p + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
                ]
        out.append(("model.norm.weight", (self.hidden,)))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    @property
    def nbytes(self) -> int:
        size = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return sum(_numel(s) for _, s in self.named_shapes()) * size

    @property
    def tensor_count(self) -> int:
        return len(self.named_shapes())


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


#: the demo's model: about 1 GiB of bf16 in 75 tensors
DEMO_SHAPE = LlamaShape()


def llama_of_size(nbytes: int, base: LlamaShape = DEMO_SHAPE) -> LlamaShape:
    """The ``base`` shape with as many layers as bring it closest to ``nbytes`` (at least one)."""
    one = replace(base, layers=1).nbytes
    per_layer = replace(base, layers=2).nbytes - one
    layers = max(1, round((nbytes - (one - per_layer)) / per_layer))
    return replace(base, layers=layers)


def moe_shape(tensors: int = 20000, nbytes: int = 250 << 20) -> LlamaShape:
    """A MoE-shaped model with about ``tensors`` tensors totalling about ``nbytes`` (many small experts)."""
    hidden, layers = 256, 8
    experts = max(1, (tensors // layers - 7) // 3)
    base = LlamaShape(
        vocab=8192,
        hidden=hidden,
        intermediate=0,
        layers=layers,
        heads=4,
        kv_heads=4,
        experts=experts,
        expert_intermediate=16,
    )
    fixed = replace(base, expert_intermediate=0).nbytes
    per_unit = replace(base, expert_intermediate=1).nbytes - fixed
    return replace(base, expert_intermediate=max(1, (nbytes - fixed) // per_unit))


class _Params(nn.Module):
    """A module whose parameters carry exactly the given dotted names (nested submodules are created)."""


def build_model(shape: LlamaShape, device: str | torch.device = "cpu", *, touch: bool = True) -> nn.Module:
    """An ``nn.Module`` with ``shape``'s parameters on ``device``. With ``touch`` the memory is zero-filled
    (written once, as after a real initialisation); without it the memory is fresh from the allocator."""
    dtype = DTYPES[shape.dtype]
    root = _Params()
    for name, dims in shape.named_shapes():
        tensor = torch.empty(dims, dtype=dtype, device=device)
        if touch:
            tensor.zero_()
        _set(root, name, nn.Parameter(tensor, requires_grad=False))
    if shape.tie_embeddings:
        _set(root, "lm_head.weight", _get(root, "model.embed_tokens.weight"))
    return root


def module_from(tensors: Iterable[tuple[str, torch.Tensor]]) -> nn.Module:
    """An ``nn.Module`` whose parameters are exactly the given tensors (not copied), under their dotted names."""
    root = _Params()
    for name, tensor in tensors:
        _set(root, name, nn.Parameter(tensor, requires_grad=False))
    return root


def _set(root: nn.Module, dotted: str, param: nn.Parameter) -> None:
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        child = module._modules.get(part)
        if child is None:
            child = _Params()
            module.add_module(part, child)
        module = child
    module.register_parameter(leaf, param)


def _get(root: nn.Module, dotted: str) -> nn.Parameter:
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        module = module._modules[part]  # type: ignore[assignment]
    return module._parameters[leaf]  # type: ignore[return-value]


def fill_(tensors: nn.Module | Mapping[str, torch.Tensor], seed: int = 0) -> None:
    """Fill every tensor deterministically from ``seed`` and its name (any dtype, any layout)."""
    named = (
        list(tensors.named_parameters()) + list(tensors.named_buffers())
        if isinstance(tensors, nn.Module)
        else list(tensors.items())
    )
    with torch.no_grad():
        for name, tensor in named:
            fill_tensor_(tensor, seed, name)


def fill_tensor_(tensor: torch.Tensor, seed: int, name: str) -> None:
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    dtype = tensor.dtype
    if dtype.is_floating_point and tensor.element_size() >= 2:
        values = torch.empty(tensor.shape, dtype=dtype).uniform_(-0.05, 0.05, generator=gen)
    elif dtype.is_floating_point or dtype.is_complex:  # float8 and complex: random bytes, any bit pattern
        raw = torch.empty(tensor.numel() * tensor.element_size(), dtype=torch.uint8).random_(0, 256, generator=gen)
        values = raw.view(dtype).view(tensor.shape)
    elif dtype == torch.bool:
        values = torch.empty(tensor.shape, dtype=torch.uint8).random_(0, 2, generator=gen).bool()
    else:
        info = torch.iinfo(dtype)
        low, high = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
        values = torch.empty(tensor.shape, dtype=dtype).random_(low, high, generator=gen)
    tensor.detach().copy_(values.to(tensor.device))


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaNs with the same bits are equal; -0.0 and 0.0 are not)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.detach().contiguous().reshape(-1).view(torch.uint8).cpu(),
        b.detach().contiguous().reshape(-1).view(torch.uint8).cpu(),
    )
