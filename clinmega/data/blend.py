"""Blends of prepared pretraining sources (e.g. clinical 0.8 / general replay 0.2) as megatron-core
datasets, with the effective number of epochs each source is seen.

A recipe names sources either all by ``weight`` (then ``train_samples`` is required) or all by
``tokens`` (a token budget each: weights are the budgets' shares and ``train_samples`` defaults to
their sum / ``seq_length``). ``build_blend`` hands the blend to megatron-core's
``BlendedMegatronDatasetBuilder`` + ``GPTDatasetConfig``, which splits every source into
train/valid/test by ``split`` and shuffles with ``seed`` — the same seed gives the same samples.
Works without ``torch.distributed`` (single process) and without CUDA.

All sources must have been written by ``prepare pretrain`` with one tokenizer (checked against their
manifests' sha256).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from clinmega.data.config import BlendConfig
from clinmega.data.pretrain import is_complete, output_paths

SPLITS = ("train", "valid", "test")


@dataclass
class _TokenizerInfo:
    """What ``GPTDatasetConfig.tokenizer`` is read for: vocabulary size and end-of-document id."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """Part of megatron-core's dataset cache key."""
        return {"class": "clinmega.data.blend._TokenizerInfo", "vocab_size": self.vocab_size, "eod": self.eod}


@dataclass
class Blend:
    """The built splits (None where a split is empty) and the per-source report."""

    train: Any
    valid: Any
    test: Any
    report: dict[str, Any]

    def split(self, name: str) -> Any:
        return getattr(self, name)


def _weights_and_samples(cfg: BlendConfig) -> tuple[list[float], int]:
    if not cfg.sources:
        raise ValueError("blend: no sources")
    by_weight = [s.weight is not None for s in cfg.sources]
    by_tokens = [s.tokens is not None for s in cfg.sources]
    for s, w, t in zip(cfg.sources, by_weight, by_tokens):
        if w == t:
            raise ValueError(f"blend source {s.name!r}: give exactly one of weight or tokens")
    if any(by_weight) and any(by_tokens):
        raise ValueError("blend: sources must all use weight or all use tokens, not a mix")
    if all(by_tokens):
        budgets = [float(s.tokens) for s in cfg.sources]  # type: ignore[arg-type]
        if min(budgets) <= 0:
            raise ValueError("blend: token budgets must be positive")
        weights = [b / sum(budgets) for b in budgets]
        samples = cfg.train_samples or math.ceil(sum(budgets) / cfg.seq_length)
        return weights, samples
    weights = [float(s.weight) for s in cfg.sources]  # type: ignore[arg-type]
    if min(weights) <= 0:
        raise ValueError("blend: weights must be positive")
    if not cfg.train_samples:
        raise ValueError("blend: weights need train_samples (or give token budgets instead)")
    return [w / sum(weights) for w in weights], cfg.train_samples


def _tokenizer_of_sources(cfg: BlendConfig) -> _TokenizerInfo:
    identities = {}
    for s in cfg.sources:
        if not is_complete(s.prefix):
            raise FileNotFoundError(f"blend source {s.name!r}: {s.prefix} is not a complete prepared dataset")
        identities[s.name] = json.loads(output_paths(s.prefix)["manifest"].read_text())["tokenizer"]
    shas = {i["sha256"] for i in identities.values()}
    if len(shas) != 1:
        raise ValueError(f"blend: sources were tokenized with different tokenizers: {identities}")
    first = next(iter(identities.values()))
    return _TokenizerInfo(vocab_size=first["vocab_size"], eod=first["eod_id"])


def _source_datasets(dataset: Any, n_sources: int) -> tuple[list[Any], np.ndarray]:
    """(per-source GPTDatasets, per-sample source index) of a built split."""
    if hasattr(dataset, "dataset_index"):
        return list(dataset.datasets), np.asarray(dataset.dataset_index)
    assert n_sources == 1
    return [dataset], np.zeros(len(dataset), dtype=np.int16)


def _report(cfg: BlendConfig, weights: list[float], splits: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = {"seq_length": cfg.seq_length, "seed": cfg.seed, "split": cfg.split, "splits": {}}
    for name, ds in splits.items():
        if ds is None:
            continue
        parts, index = _source_datasets(ds, len(cfg.sources))
        counts = Counter(index.tolist())
        rows = []
        for i, (src, part) in enumerate(zip(cfg.sources, parts)):
            available = int(part.dataset.sequence_lengths[part.indices].sum())
            drawn = counts.get(i, 0) * cfg.seq_length
            rows.append(
                {
                    "source": src.name,
                    "target_weight": round(weights[i], 6),
                    "samples": counts.get(i, 0),
                    "realized_weight": round(counts.get(i, 0) / max(len(index), 1), 6),
                    "tokens_drawn": drawn,
                    "tokens_available": available,
                    "effective_epochs": round(drawn / available, 4) if available else None,
                }
            )
        report["splits"][name] = {"samples": int(len(index)), "sources": rows}
    return report


def build_blend(cfg: BlendConfig) -> Blend:
    """Build train/valid/test blended GPT datasets and the per-source report (weights, epochs)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    weights, train_samples = _weights_and_samples(cfg)
    tokenizer = _tokenizer_of_sources(cfg)
    gpt_cfg = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=([s.prefix for s in cfg.sources], weights),
        split=cfg.split,
        path_to_cache=cfg.cache_dir,
        tokenizer=tokenizer,  # type: ignore[arg-type]  (duck-typed: vocab_size + eod)
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [train_samples, cfg.valid_samples, cfg.test_samples]
    built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, gpt_cfg).build()
    splits = {name: (ds if size else None) for name, ds, size in zip(SPLITS, built, sizes)}
    return Blend(**splits, report=_report(cfg, weights, splits))
