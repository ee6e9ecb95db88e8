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

import math
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from clinmega.config import ConfigError
from clinmega.data.packing import block_causal_mask, position_ids_from_cu_seqlens
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
    item["position_ids"] = position_ids_from_cu_seqlens(cu, len(tokens))
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


def is_packed(data: DataConfig) -> bool:
    """Whether this data config yields packed items (with ``cu_seqlens``)."""
    return data.kind == "sft" or (data.kind == "synthetic" and data.synthetic_packed)


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
    """Stack items into ``[b, S]`` tensors; ``cu_seqlens`` stays a per-row list (the one packed
    collate: :func:`thd_batch` flattens it for Transformer Engine, :func:`packed_attention_mask`
    makes the dense mask for the local spec)."""
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
    return torch.cat([block_causal_mask(cu, seq_length, window) for cu in cu_seqlens])


def thd_alignment(tensor_parallel: int, sequence_parallel: bool, context_parallel: int = 1,
                  fp8: bool = False) -> int:
    """The multiple every packed sub-sequence is padded to in the THD layout: TP under sequence
    parallelism (the flattened tokens are split over TP ranks), ``2*CP`` with context parallelism
    (each sequence is cut into 2*CP chunks, megatron-core's load-balanced split), and 16 with FP8
    (Transformer Engine's FP8 GEMMs want token counts divisible by 16; NeMo pads the same way)."""
    multiple = tensor_parallel if sequence_parallel else 1
    if context_parallel > 1:
        multiple *= 2 * context_parallel
    if fp8:
        multiple = math.lcm(multiple, 16)
    return multiple


def thd_batch(batch: dict[str, Any], multiple: int = 1, pad_id: int = 0) -> dict[str, Any]:
    """The packed ``[b, S]`` microbatch (with per-row ``cu_seqlens``) in Transformer Engine's THD
    layout, as megatron-core's ``PackedSeqParams(qkv_format="thd")`` route wants it.

    All rows go back to back into one ``[1, T]`` row; every sub-sequence (the padding tail of a
    bin is one too, without loss) is followed by pad slots up to a multiple of ``multiple``. The
    result has ``tokens, labels, loss_mask, position_ids`` of ``[1, T]`` (pad slots: ``pad_id``,
    ``IGNORE_INDEX``, 0, positions continuing the sub-sequence, so they restart at 0 per sample),
    ``packed_seq_params`` (``cu_seqlens_q/kv`` the real boundaries, ``*_padded`` the padded ones,
    ``max_seqlen_q/kv`` the longest padded sub-sequence: RoPE's table must cover it), and
    ``thd_index`` (``[T]`` int64: the flat ``b*S`` position of each slot, -1 for pad slots;
    :func:`to_thd` maps any other per-token ``[b, S]`` tensor with it). A NEFTune context's
    ``scale`` is mapped too. Real tokens keep their labels and loss mask; no ``S x S`` mask exists.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if multiple < 1:
        raise ValueError(f"thd_batch: multiple must be >= 1, got {multiple}")
    tokens = batch["tokens"]
    b, S = tokens.shape
    real, padded, index = [0], [0], []
    for row, cu in enumerate(batch["cu_seqlens"]):
        cu = torch.as_tensor(cu, dtype=torch.int64)
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != S or bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(f"thd_batch: row {row}: cu_seqlens {cu.tolist()} must rise strictly "
                             f"from 0 to the sequence length {S}")
        for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            n = e - a
            p = -(-n // multiple) * multiple
            index.append(torch.arange(row * S + a, row * S + e))
            index.append(torch.full((p - n,), -1, dtype=torch.int64))
            real.append(real[-1] + n)
            padded.append(padded[-1] + p)
    thd_index = torch.cat(index)
    positions = position_ids_from_cu_seqlens(padded, len(thd_index))
    out = {k: v for k, v in batch.items() if k not in ("cu_seqlens", "attention_mask")}
    out.update(tokens=to_thd(tokens, thd_index, pad_id),
               labels=to_thd(batch["labels"], thd_index, IGNORE_INDEX),
               loss_mask=to_thd(batch["loss_mask"], thd_index, 0),
               position_ids=positions[None], thd_index=thd_index)
    if batch.get("neftune") is not None:
        out["neftune"] = dict(batch["neftune"], scale=to_thd(batch["neftune"]["scale"], thd_index, 0))
    cu_real, cu_padded = torch.tensor(real, dtype=torch.int32), torch.tensor(padded, dtype=torch.int32)
    max_len = int((cu_padded[1:] - cu_padded[:-1]).max())
    out["packed_seq_params"] = PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_real, cu_seqlens_kv=cu_real, cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded, max_seqlen_q=max_len, max_seqlen_kv=max_len)
    return out


def to_thd(values: torch.Tensor, thd_index: torch.Tensor, fill) -> torch.Tensor:
    """A per-token ``[b, S]`` tensor in the THD layout of :func:`thd_batch`: ``[1, T]``, ``fill``
    on pad slots."""
    flat = values.reshape(-1)
    out = flat[thd_index.clamp(min=0)].clone()
    out[thd_index < 0] = fill
    return out[None]
