"""Shared pieces of tests/test_vocab.py: a tiny HF Mistral whose vocabulary 2 does not divide
(32,000 SentencePiece pieces + 3 added tokens = 32,003) and the 2-rank cases run on it."""

from __future__ import annotations

from pathlib import Path

import torch

import conversion_cases as cc

ADDED = ["hypertension", "tachycardia", "<|im_start|>"]  # 32000 + 3: TP2 does not divide it
VOCAB = 32003
REQUESTS = [("The patient has", " hypertension"), ("The patient has", " tachycardia"),
            ("<|im_start|>user\nChest pain and", " tachycardia"), ("Blood pressure", " is high")]
PROMPTS = ["The patient has hypertension and", "<|im_start|>user\nA cough"]
NEW_TOKENS = 6


def make_padded_hf_model(folder: str | Path) -> Path:
    """The tiny v0.1 model with 32,003 rows and the mistral v1 tokenizer + ``ADDED``."""
    from transformers import AutoTokenizer

    folder = cc.make_hf_model("mistral-v0.1", folder, vocab_size=VOCAB)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens(ADDED[:2])
    tokenizer.add_tokens(ADDED[2:], special_tokens=True)
    assert len(tokenizer) == VOCAB
    tokenizer.save_pretrained(str(folder))
    return folder


def sample_tokens(seq: int = cc.TOKENS_SEQ) -> torch.Tensor:
    """Random ids including the three added ones."""
    toks = cc.tokens(VOCAB, seq=seq)
    toks[:, 5] = torch.arange(VOCAB - 3, VOCAB)[: toks.shape[0]]
    return toks


LOSS_SEQ = cc.TOKENS_SEQ + 1  # inputs of TOKENS_SEQ tokens (a length sequence parallelism splits)


def lm_batch(toks: torch.Tensor) -> dict:
    """One microbatch predicting ``toks[:, 1:]`` from ``toks[:, :-1]`` (what HF's ``labels=toks``
    loss averages over)."""
    inputs = toks[:, :-1].contiguous()
    return dict(tokens=inputs, labels=toks[:, 1:].contiguous(), loss_mask=torch.ones(inputs.shape),
                position_ids=torch.arange(inputs.shape[1]).repeat(inputs.shape[0], 1))


def training_loss(cfg, parallel, ckpt: Path, toks: torch.Tensor) -> float:
    """The mean LM loss as training computes it (megatron-core's schedule and vocab-parallel cross
    entropy through ``clinmega.training.step``), parallel state already initialised."""
    from clinmega.config import PrecisionConfig, RuntimeConfig
    from clinmega.models import build_model
    from clinmega.models.dist_ckpt import load_model_weights
    from clinmega.training.step import forward_backward

    chunks = build_model(cfg, parallel, PrecisionConfig(dtype="fp32"), RuntimeConfig())
    load_model_weights(chunks, ckpt)
    with torch.no_grad():
        return forward_backward(chunks, [lm_batch(toks)], forward_only=True)


def padded_cases(root: str) -> dict:
    """On each of 2 gloo ranks: logits and training loss of the TP1 import loaded at TP2 and PP2,
    logits of a 2-rank TP2 import loaded at TP1, and the Megatron eval backend at TP2 (scores,
    greedy and sampled generations)."""
    from transformers import AutoTokenizer

    from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
    from clinmega.conversion import import_hf
    from clinmega.conversion.checkpoint_info import hf_model_config
    from clinmega.evaluation.backends.megatron import MegatronBackend
    from clinmega.models import build_model
    from clinmega.models.dist_ckpt import load_model_weights
    from clinmega.runtime import init_model_parallel, init_process_group

    init_process_group(RuntimeConfig())
    root = Path(root)
    hf = root / "hf"
    cfg = hf_model_config(hf)
    toks, loss_toks = sample_tokens(), sample_tokens(LOSS_SEQ)
    out = {}
    for name, fields in {"tp2": dict(tensor_parallel=2), "pp2": dict(pipeline_parallel=2)}.items():
        parallel = ParallelConfig(**fields)
        init_model_parallel(parallel, RuntimeConfig())
        out[f"logits/{name}"] = cc.megatron_logits(cfg, parallel, root / "tp1", toks)
        out[f"loss/{name}"] = training_loss(cfg, parallel, root / "tp1", loss_toks)
    import_hf(hf, root / "import2_tp2", ParallelConfig(tensor_parallel=2), progress=False)
    init_model_parallel(ParallelConfig(), RuntimeConfig())
    out["logits/import2_tp2_at_tp1"] = cc.megatron_logits(cfg, ParallelConfig(),
                                                          root / "import2_tp2", toks)
    tp2 = ParallelConfig(tensor_parallel=2)
    init_model_parallel(tp2, RuntimeConfig())
    [model] = build_model(cfg, tp2, PrecisionConfig(dtype="fp32"), RuntimeConfig())
    load_model_weights([model], root / "tp1")
    backend = MegatronBackend(model, AutoTokenizer.from_pretrained(str(hf)), max_length=64,
                              batch_size=4)
    out["loglikelihood"] = backend.loglikelihood(REQUESTS)
    out["greedy"] = backend.generate(PROMPTS, NEW_TOKENS)
    out["sampled"] = backend.generate(PROMPTS, NEW_TOKENS, temperature=1.0, seed=3)
    return out
