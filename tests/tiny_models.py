"""Tiny random checkpoints of real architectures, written by transformers' own model classes (no download).

Each model is a few hundred KB: hidden size 64, two layers, a 256-token vocabulary, head counts that split over
TP=2. ``python tiny_models.py OUT_DIR NAME [NAME ...]`` writes ``OUT_DIR/NAME`` (a full checkpoint: config,
safetensors) and ``OUT_DIR/NAME-no-weights`` (the same folder without any weight file) for each name.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

#: name -> (transformers config class, model class, config arguments); every model keeps 4 attention heads and
#: 2 KV heads (or MLA's single latent), so that TP=2 splits them
COMMON: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # vLLM runs Phi through its Transformers backend, whose lm_head.bias exists only when the checkpoint has one
    "phi": ("PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5}),
    # lm_head shares the embedding's storage: one tensor under two names
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    # multi-head latent attention (low-rank q and kv projections) with routed and shared experts
    "deepseek-v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {
            "num_key_value_heads": 4,
            "q_lora_rank": 32,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 16,
            "v_head_dim": 16,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "topk_method": "greedy",
        },
    ),
    # sparse mixture of experts: fused expert weights, router
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    # Gemma: (1 + weight) RMSNorm, embedding scaled by sqrt(hidden), tied lm_head
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 2, "head_dim": 16}),
    # sliding-window attention on every other layer, soft-capped logits and attention
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 32}),
    # experts plus a gated shared expert
    "qwen2-moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {"num_key_value_heads": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
         "num_experts": 4, "num_experts_per_tok": 2},
    ),
    # fused query/key/value and gate/up projections in the checkpoint itself
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 2}),
    # a state-space model: no attention at all
    "mamba": ("MambaConfig", "MambaForCausalLM", {"state_size": 8, "expand": 2, "conv_kernel": 4}),
    # hybrid: mamba and attention layers, experts on every other layer
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",
        {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "attn_layer_period": 2,
         "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 8,
         "mamba_expand": 2, "mamba_dt_rank": 8},
    ),
    # the same architecture as qwen2-tied with a wider MLP: another model that vLLM runs with the same class
    "qwen2-tied-wide": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"num_key_value_heads": 2, "tie_word_embeddings": True, "intermediate_size": 192},
    ),
}


def save(out_dir: Path, name: str) -> Path:
    import torch
    import transformers

    config_cls, model_cls, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # random values everywhere, norms and biases included, so no two tensors look alike
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    path = out_dir / name
    model.to(torch.bfloat16).save_pretrained(path)
    bare = out_dir / f"{name}-no-weights"
    bare.mkdir()
    for file in path.iterdir():
        if file.suffix == ".json" and ".safetensors" not in file.name:  # config, generation config; no index
            shutil.copy(file, bare / file.name)
    return path


if __name__ == "__main__":
    for arch in sys.argv[2:]:
        save(Path(sys.argv[1]), arch)
