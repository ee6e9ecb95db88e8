"""Model presets: the published Mistral/Mixtral architectures and tiny variants for tests.

Values are the Hugging Face ``config.json`` ones (REFERENCE.md §1). Tiny variants keep each
family's distinguishing features (sliding window, vocabulary, experts/top-k) at toy width so that
the whole stack runs on a CPU; their vocabularies match the real Mistral tokenizers.
"""

from __future__ import annotations

import dataclasses

from clinmega.config.errors import ConfigError
from clinmega.config.schema import ModelConfig

_MISTRAL_7B = dict(arch="mistral", vocab_size=32000, hidden_size=4096, ffn_hidden_size=14336,
                   num_layers=32, num_attention_heads=32, num_query_groups=8, head_dim=128,
                   max_position_embeddings=32768, norm_eps=1e-5)
_TINY = dict(hidden_size=64, ffn_hidden_size=128, num_layers=4, num_attention_heads=4,
             num_query_groups=2, head_dim=16, max_position_embeddings=4096)

PRESETS: dict[str, ModelConfig] = {}


def _register(name: str, **fields) -> None:
    PRESETS[name] = ModelConfig(name=name, **fields)


_register("mistral-7b-v0.1", **_MISTRAL_7B, rope_theta=10_000.0, sliding_window=4096)
_register("mistral-7b-v0.2", **_MISTRAL_7B, rope_theta=1_000_000.0)
_register("mistral-7b-v0.3", **{**_MISTRAL_7B, "vocab_size": 32768}, rope_theta=1_000_000.0)
_register("mixtral-8x7b", **{**_MISTRAL_7B, "arch": "mixtral"}, rope_theta=1_000_000.0,
          num_experts=8, moe_router_topk=2, moe_aux_loss_coeff=0.02)

# Tiny variants: sliding window 8 so that test sequences longer than 8 exercise it.
_register("tiny-mistral-v0.1", **{**_MISTRAL_7B, **_TINY}, rope_theta=10_000.0, sliding_window=8)
_register("tiny-mistral-v0.2", **{**_MISTRAL_7B, **_TINY}, rope_theta=1_000_000.0)
_register("tiny-mistral-v0.3", **{**_MISTRAL_7B, **_TINY, "vocab_size": 32768},
          rope_theta=1_000_000.0)
_register("tiny-mixtral", **{**_MISTRAL_7B, **_TINY, "arch": "mixtral"}, rope_theta=1_000_000.0,
          num_experts=8, moe_router_topk=2, moe_aux_loss_coeff=0.02)

# Parameter counts published for the full-size models (safetensors totals on the model cards).
PUBLISHED_PARAMS = {
    "mistral-7b-v0.1": 7_241_732_096,
    "mistral-7b-v0.2": 7_241_732_096,
    "mistral-7b-v0.3": 7_248_023_552,
    "mixtral-8x7b": 46_702_792_704,
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """A copy of preset ``name`` with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count from the config alone (nothing is allocated).

    Untied input/output embeddings, RMSNorm weights without bias, no linear biases; per layer:
    Q (h x nh*d), K and V (h x ng*d each), O (nh*d x h), SwiGLU MLP 3*h*f per expert, a router
    h x E for MoE, and two norms.
    """
    h, d = cfg.hidden_size, cfg.head_dim
    attention = h * cfg.num_attention_heads * d * 2 + h * cfg.num_query_groups * d * 2
    experts = cfg.num_experts or 1
    mlp = experts * 3 * h * cfg.ffn_hidden_size + (h * experts if cfg.is_moe else 0)
    per_layer = attention + mlp + 2 * h
    return 2 * cfg.vocab_size * h + cfg.num_layers * per_layer + h


def count_active_parameters(cfg: ModelConfig) -> int:
    """Parameters touched per token: top-k experts instead of all of them."""
    if not cfg.is_moe:
        return count_parameters(cfg)
    inactive = (cfg.num_experts - cfg.moe_router_topk) * 3 * cfg.hidden_size * cfg.ffn_hidden_size
    return count_parameters(cfg) - cfg.num_layers * inactive
