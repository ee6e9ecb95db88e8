"""Random-initialised Hugging Face checkpoints of a preset, with the real Mistral tokenizer (here, in
the top layer, because it uses both `models` and `data`).

The demo and the tests start from these exactly as a user starts from a downloaded checkpoint: a
folder with ``config.json``, ``model.safetensors`` and the tokenizer files. The SentencePiece models
ship offline inside the ``mistral-common`` wheel (v1: 32,000 pieces for Mistral-7B-v0.1/v0.2 and
Mixtral; v3: 32,768 for v0.3); ``AutoTokenizer.from_pretrained`` loads the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from clinmega.config.schema import ModelConfig
from clinmega.models.hf import to_hf_config

TOKENIZER_OF_VOCAB = {32000: "mistral-v1", 32768: "mistral-v3"}


def mistral_tokenizer_model(vocab_size: int) -> Path:
    """Path of the mistral-common SentencePiece model for this vocabulary size."""
    from clinmega.data.tokenizers import mistral_common_model_path

    if vocab_size not in TOKENIZER_OF_VOCAB:
        raise ValueError(f"no Mistral tokenizer with vocab_size={vocab_size}; "
                         f"known: {sorted(TOKENIZER_OF_VOCAB)}")
    return mistral_common_model_path(TOKENIZER_OF_VOCAB[vocab_size])


def write_tokenizer(dest: str | Path, vocab_size: int = 32000) -> Path:
    """``tokenizer.model`` + ``tokenizer_config.json`` that ``AutoTokenizer`` loads offline."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(mistral_tokenizer_model(vocab_size), dest / "tokenizer.model")
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "model_max_length": 32768}, indent=2))
    return dest


def save_random_hf_checkpoint(cfg: ModelConfig, dest: str | Path, seed: int = 0,
                              dtype: torch.dtype = torch.float32) -> Path:
    """A random-initialised ``MistralForCausalLM``/``MixtralForCausalLM`` of ``cfg`` saved as
    safetensors with its tokenizer."""
    import transformers

    hf_cls = {"mistral": transformers.MistralConfig, "mixtral": transformers.MixtralConfig}[cfg.arch]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cls(**to_hf_config(cfg)),
                                                          dtype=dtype)
    model.save_pretrained(dest, safe_serialization=True)
    write_tokenizer(dest, cfg.vocab_size)
    return Path(dest)
