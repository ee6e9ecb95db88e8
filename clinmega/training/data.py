"""Batches for training: the ``BatchSource`` protocol, the sources, and the global-batch sampler.

A :class:`BatchSource` is any map-style dataset (``__len__`` + ``__getitem__``) whose items are
dicts of 1-D tensors of one sequence length ``S``:

* ``tokens`` int64, ``labels`` int64, ``loss_mask`` float32, ``position_ids`` int64, and
* optionally ``cu_seqlens`` int32 ``[n+1]`` when the item packs several samples back to back
  (boundaries ending at ``S``; a padding tail is its own sub-sequence without loss).

megatron-core's ``GPTDataset`` / ``BlendedDataset`` and ``clinmega.data``'s ``SFTDataset`` satisfy it
as they are. The sampler is a pure function of (step, data-parallel rank): global batch ``t`` is
items ``t*G .. t*G+G-1`` of an endless, per-epoch shuffled order, and DP rank ``r`` takes its
contiguous ``G/dp`` share, split into microbatches. The data position saved in a checkpoint is
therefore just the step, and a run resumes at any data-parallel size on the same samples.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from clinmega.config import ConfigError
from clinmega.data.sft_dataset import IGNORE_INDEX  # one home: the SFT labels
from clinmega.training.config import DataConfig, ExperimentConfig


@runtime_checkable
class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class SyntheticSource:
    """Deterministic learnable sequences: item ``i`` is an arithmetic progression modulo
    ``vocab`` with a start and stride drawn from ``seed + i``; a model learns them in a few
    dozen steps, so a falling loss is a real signal.

    ``packed=True`` makes SFT-like bins: 1-4 samples of random length back to back, the first
    half of each sample is a "prompt" (no loss), then a padding tail (pad id 0, no loss).
    """

    def __init__(self, num_samples: int, seq_length: int, vocab: int, seed: int, packed: bool):
        self.num_samples, self.seq_length, self.vocab = num_samples, seq_length, vocab
        self.seed, self.packed = seed, packed

    def __len__(self) -> int:
        return self.num_samples

    def _sequence(self, rng: np.random.Generator, n: int) -> np.ndarray:
        start, stride = rng.integers(0, self.vocab), rng.integers(1, 8)
        return (start + stride * np.arange(n + 1)) % self.vocab

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"synthetic sample {index} out of range [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, index])
        S = self.seq_length
        if not self.packed:
            seq = self._sequence(rng, S)
            return _item(seq[:-1], seq[1:], np.ones(S, np.float32))
        tokens, labels = np.zeros(S, np.int64), np.full(S, IGNORE_INDEX, np.int64)
        loss_mask, cu = np.zeros(S, np.float32), [0]
        for _ in range(int(rng.integers(1, 5))):
            n = int(rng.integers(4, max(5, S // 2)))
            if cu[-1] + n > S:
                break
            seq, a = self._sequence(rng, n), cu[-1]
            tokens[a:a + n], labels[a:a + n] = seq[:-1], seq[1:]
            loss_mask[a + n // 2:a + n] = 1.0
            cu.append(a + n)
        labels[loss_mask == 0] = IGNORE_INDEX
        if cu[-1] < S:
            cu.append(S)
        return _item(tokens, labels, loss_mask, cu)


def _item(tokens, labels, loss_mask, cu_seqlens=None) -> dict[str, torch.Tensor]:
    item = dict(tokens=torch.as_tensor(tokens, dtype=torch.int64),
                labels=torch.as_tensor(labels, dtype=torch.int64),
                loss_mask=torch.as_tensor(loss_mask, dtype=torch.float32))
    if cu_seqlens is None:
        item["position_ids"] = torch.arange(len(tokens))
        return item
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    item["position_ids"] = torch.cat([torch.arange(int(b - a)) for a, b in zip(cu[:-1], cu[1:])])
    item["cu_seqlens"] = cu
    return item


def indexed_sources(data: DataConfig, seq_length: int, samples: Sequence[int]
                    ) -> tuple[list[Any], dict]:
    """megatron-core GPT datasets (train, valid) over ``data.prefixes`` (``prepare pretrain``
    outputs), blended with ``data.weights`` by :func:`clinmega.data.blend.build_blend`, with
    ``samples`` items each, and the blend report (realised weights, effective epochs per source)."""
    from pathlib import Path

    from clinmega.data.blend import build_blend
    from clinmega.data.config import BlendConfig, BlendSource

    weights = data.weights or [1.0] * len(data.prefixes)
    blend_cfg = BlendConfig(
        sources=[BlendSource(name=Path(p).name, prefix=p, weight=w)
                 for p, w in zip(data.prefixes, weights)],
        seq_length=seq_length, seed=data.seed, split=data.split, train_samples=samples[0],
        valid_samples=samples[1], cache_dir=data.cache_dir)
    try:
        blend = build_blend(blend_cfg)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"data.prefixes: {err}") from err
    return [blend.train, blend.valid], blend.report


def _sft_dataset(path: str):
    try:
        from clinmega.data.sft_dataset import SFTDataset
    except ImportError as err:
        raise ConfigError("data.kind: 'sft' needs clinmega.data.sft_dataset (the data pipeline)"
                          ) from err
    return SFTDataset(path)


def _write_blend_report(cfg: ExperimentConfig, report: dict) -> None:
    """Rank 0 prints the effective epochs per source and keeps the report in the run folder."""
    import json

    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    from pathlib import Path

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "blend_report.json").write_text(json.dumps(report, indent=1))
    for row in report["splits"]["train"]["sources"]:
        print(f"blend: {row['source']}: weight {row['target_weight']:.3f} "
              f"(realised {row['realized_weight']:.3f}), {row['tokens_drawn']:,} of "
              f"{row['tokens_available']:,} tokens = {row['effective_epochs']} epochs", flush=True)


def build_sources(cfg: ExperimentConfig) -> tuple[BatchSource, BatchSource | None]:
    """(train source, validation source or None) for this experiment."""
    data, train = cfg.data, cfg.train
    if data.kind == "synthetic":
        make = lambda seed: SyntheticSource(data.synthetic_samples, train.seq_length,  # noqa: E731
                                            min(data.synthetic_vocab, cfg.model.vocab_size),
                                            seed, data.synthetic_packed)
        return make(data.seed), make(data.seed + 1)
    if data.kind == "indexed":
        evals = train.steps // train.eval_interval + 1 if train.eval_interval else 0
        sources, report = indexed_sources(data, train.seq_length,
                                          [train.steps * train.global_batch_size,
                                           evals * train.eval_iters * train.global_batch_size])
        _write_blend_report(cfg, report)
        return sources[0], sources[1]
    valid = _sft_dataset(data.sft_valid_path) if data.sft_valid_path else None
    return _sft_dataset(data.sft_path), valid


class GlobalBatchSampler:
    """Which items make global batch ``step`` and this DP rank's microbatches of it."""

    def __init__(self, source: BatchSource, global_batch: int, micro_batch: int, seed: int,
                 shuffle: bool):
        if len(source) < 1:
            raise ConfigError("data: the training source is empty")
        self.source, self.global_batch, self.micro_batch = source, global_batch, micro_batch
        self.seed, self.shuffle = seed, shuffle
        self._epoch, self._order = -1, np.arange(len(source))

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.source))
        if self.shuffle and epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
            self._epoch = epoch
        return int(self._order[offset])

    def microbatches(self, step: int, dp_rank: int, dp_size: int) -> list[dict[str, Any]]:
        per_rank = self.global_batch // dp_size
        first = step * self.global_batch + dp_rank * per_rank
        items = [self.source[self._index(first + i)] for i in range(per_rank)]
        return [collate(items[i:i + self.micro_batch]) for i in range(0, per_rank, self.micro_batch)]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into ``[b, S]`` tensors; ``cu_seqlens`` stays a per-row list."""
    batch: dict[str, Any] = {k: torch.stack([torch.as_tensor(it[k]) for it in items])
                             for k in ("tokens", "labels", "loss_mask", "position_ids")}
    batch["loss_mask"] = batch["loss_mask"].float()
    if "cu_seqlens" in items[0]:
        batch["cu_seqlens"] = [torch.as_tensor(it["cu_seqlens"]) for it in items]
    return batch


def packed_attention_mask(cu_seqlens: list[torch.Tensor], seq_length: int,
                          window: int | None = None) -> torch.Tensor:
    """``[b, 1, S, S]`` bool, True = masked: one :func:`clinmega.data.packing.block_causal_mask`
    per sample of the batch (causal within each packed sub-sequence, within ``window`` keys)."""
    from clinmega.data.packing import block_causal_mask

    return torch.cat([block_causal_mask(cu, seq_length, window) for cu in cu_seqlens])
