"""Shared helpers for the evaluation tests: a tiny random Mistral with the real Mistral tokenizer."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
            rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False)


def mistral_tokenizer_file() -> Path:
    from clinmega.demo.hf_checkpoint import mistral_tokenizer_model

    return mistral_tokenizer_model(32000)


def write_tokenizer(out: Path) -> None:
    from clinmega.demo.hf_checkpoint import write_tokenizer as write_mistral_tokenizer

    write_mistral_tokenizer(out, 32000)


@functools.cache
def tiny_hf_model_dir(seed: int = 0, sliding_window: int | None = None) -> Path:
    """A random-initialised tiny MistralForCausalLM + tokenizer, saved once per test process."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    out = Path(tempfile.mkdtemp(prefix="clinmega-eval-tiny-"))
    torch.manual_seed(seed)
    model = MistralForCausalLM(MistralConfig(**{**TINY, "sliding_window": sliding_window})).eval()
    with torch.no_grad():  # larger logits than the default init, so options really differ
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(out)
    write_tokenizer(out)
    return out
