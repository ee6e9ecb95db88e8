"""Training FLOPs per token of a Mistral/Mixtral model (for MFU, TFLOPS/GPU and the planner).

Counts matrix multiplies only (2 FLOPs per multiply-add), forward + backward = 3x forward; the
training loop's TFLOPS/MFU and the planner's step-time estimates both use it.
"""

from __future__ import annotations

from clinmega.config.schema import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token, averaged over the positions of a ``seq_length`` sequence.

    Per layer: QKV ``2h(n_h + 2 n_g)d`` (GQA), output ``2 n_h d h``, scores and values ``4 n_h d k``
    where ``k`` is the mean number of keys a causal query attends to (``(S+1)/2``, or fewer under a
    sliding window ``W``), SwiGLU MLP ``6 h f`` per routed expert (top-k), router ``2 h E``; plus the
    LM head ``2 h V``.
    """
    h, d, S = cfg.hidden_size, cfg.head_dim, seq_length
    nh, ng = cfg.num_attention_heads, cfg.num_query_groups
    W = min(cfg.sliding_window or S, S)
    keys = (W * (W + 1) / 2 + (S - W) * W) / S  # mean keys per query
    attention = 2 * h * (nh + 2 * ng) * d + 2 * nh * d * h + 4 * nh * d * keys
    experts = cfg.moe_router_topk if cfg.is_moe else 1
    mlp = 6 * h * cfg.ffn_hidden_size * experts + (2 * h * cfg.num_experts if cfg.is_moe else 0)
    return cfg.num_layers * (attention + mlp) + 2 * h * cfg.vocab_size


def training_flops_per_token(cfg: ModelConfig, seq_length: int, full_recompute: bool = False
                             ) -> float:
    """Forward + backward (2x forward); full activation recompute adds one more forward."""
    return (4 if full_recompute else 3) * forward_flops_per_token(cfg, seq_length)
