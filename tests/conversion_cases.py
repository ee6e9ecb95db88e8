"""Shared helpers for the conversion tests: tiny random HF models and logits on both sides."""

from __future__ import annotations

import os
from pathlib import Path

import torch

TOKENS_SEQ = 24  # longer than the tiny v0.1 sliding window (8)

HF_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 initializer_range=0.1)
KINDS = {
    "mistral-v0.1": dict(vocab_size=32000, rope_theta=10_000.0, sliding_window=8),
    "mistral-v0.3": dict(vocab_size=32768, rope_theta=1_000_000.0, sliding_window=None),
    "mixtral": dict(vocab_size=32000, rope_theta=1_000_000.0, num_local_experts=8,
                    num_experts_per_tok=2, router_aux_loss_coef=0.02),
}
TOKENIZER = Path(__import__("mistral_common").__file__).parent / "data" / "tokenizer.model.v1"


def make_hf_model(kind: str, folder: str | Path, seed: int = 0, dtype=torch.float32,
                  max_shard_size: str | None = None) -> Path:
    """Save a tiny random HF model of ``kind`` (norm weights randomised too) to ``folder``."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    fields = {**HF_SHAPES, **KINDS[kind]}
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**fields))
    else:
        model = MistralForCausalLM(MistralConfig(**fields))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model = model.to(dtype)
    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    return folder


def tokens(vocab: int, batch: int = 2, seq: int = TOKENS_SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def hf_logits(folder: str | Path, toks: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(toks).logits.float()


def megatron_logits(model_cfg, parallel, ckpt: str | Path, toks: torch.Tensor):
    """Logits of the checkpoint at ``parallel`` (parallel state must be initialised for it):
    the full [b, s, v] tensor on every rank (pipeline last stage broadcasts, TP gathered)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from clinmega.config import PrecisionConfig, RuntimeConfig
    from clinmega.models import build_model
    from clinmega.models.dist_ckpt import load_model_weights
    from clinmega.training.step import forward_backward  # noqa: F401  (schedule is imported)

    chunks = build_model(model_cfg, parallel, PrecisionConfig(dtype="fp32"), RuntimeConfig())
    load_model_weights(chunks, ckpt)
    for c in chunks:
        c.eval()
    positions = torch.arange(toks.shape[1]).repeat(toks.shape[0], 1)
    logits = _pipeline_forward(chunks, toks, positions)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        logits = gather_from_tensor_model_parallel_region(logits)
    else:
        logits = torch.empty(*toks.shape, model_cfg.vocab_size)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(logits, last, group=ps.get_pipeline_model_parallel_group())
    return logits.float()


def _pipeline_forward(chunks, toks, positions):
    """Forward through the pipeline stages by hand (send/recv the hidden states)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    (model,) = chunks
    group = ps.get_pipeline_model_parallel_group()
    with torch.no_grad():
        if not ps.is_pipeline_first_stage(ignore_virtual=True):
            cfg = model.config
            hidden = torch.empty(toks.shape[1] // ps.get_tensor_model_parallel_world_size()
                                 if cfg.sequence_parallel else toks.shape[1],
                                 toks.shape[0], cfg.hidden_size)
            dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank(), group=None)
            model.set_input_tensor(hidden)
        out = model(toks, positions, None)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            dist.send(out.contiguous(), ps.get_pipeline_model_parallel_next_rank())
    del group
    return out


def env_offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
