"""Training FLOPs per token of a Mistral/Mixtral model (for MFU, TFLOPS/GPU and the planner).

Counts matrix multiplies only (2 FLOPs per multiply-add), forward + backward = 3x forward:

* per layer, per token: Q and O projections 2*2*h*(nh*d), K and V 2*2*h*(ng*d) (GQA),
  SwiGLU MLP 3 matrices 2*3*h*f per *active* expert (top-k for MoE) plus the router 2*h*E,
* attention scores and values: 2*2*s*(nh*d) per token for full causal attention over s keys,
  halved for causality, and at most the sliding window's keys when one is set,
* the output layer 2*h*V.
"""

from __future__ import annotations

from clinmega.config.schema import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    h, d = cfg.hidden_size, cfg.head_dim
    q_dim, kv_dim = cfg.num_attention_heads * d, cfg.num_query_groups * d
    projections = 2 * h * (2 * q_dim + 2 * kv_dim)
    experts = cfg.moe_router_topk if cfg.is_moe else 1
    mlp = experts * 2 * 3 * h * cfg.ffn_hidden_size + (2 * h * cfg.num_experts if cfg.is_moe else 0)
    keys = seq_length / 2  # causal: on average half the sequence
    if cfg.sliding_window:
        keys = min(keys, cfg.sliding_window)
    attention = 2 * 2 * keys * q_dim
    return cfg.num_layers * (projections + mlp + attention) + 2 * h * cfg.vocab_size


def training_flops_per_token(cfg: ModelConfig, seq_length: int, full_recompute: bool = False
                             ) -> float:
    """Forward + backward (2x forward); full activation recompute adds one more forward."""
    return (4 if full_recompute else 3) * forward_flops_per_token(cfg, seq_length)
