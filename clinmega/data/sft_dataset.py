"""Reading ``prepare sft`` output for training: a torch ``Dataset`` of packed bins.

Each item is one bin of ``seq_length`` positions holding whole samples back to back (inputs
``t[:-1]``, targets ``t[1:]`` of each sample), then padding:

* ``tokens`` int64 ``[S]``: input ids (padding: ``pad_id``);
* ``labels`` int64 ``[S]``: target ids, ``-100`` where ``loss_mask`` is 0 (non-assistant and padding;
  megatron-core's GPTModel wants in-range ids: pass ``labels.clamp(min=0)`` and weight by ``loss_mask``);
* ``loss_mask`` float32 ``[S]``: 1.0 on assistant targets;
* ``position_ids`` int64 ``[S]``: restart at 0 for every sample (and for the padding tail);
* ``cu_seqlens`` int32 ``[n+1]``: sub-sequence boundaries, ending at ``S`` (the padding tail, if any,
  is its own sub-sequence, with no loss).

Training batches them with :func:`clinmega.training.data.collate` (the one packed collate), which
either flattens them into Transformer Engine's THD layout (``thd_batch``) or builds the
block-diagonal causal mask for the local spec (``packed_attention_mask``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import numpy as np
import torch
from torch.utils.data import Dataset

from clinmega.data.packing import position_ids_from_cu_seqlens

IGNORE_INDEX = -100


class SFTDataset(Dataset):
    """Packed SFT bins from a ``prepare sft`` output directory (see module doc)."""

    def __init__(self, path: str | os.PathLike[str], pad_id: int | None = None) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path}: not a complete prepare-sft output (no manifest.json)")
        self.manifest = json.loads(manifest_path.read_text())
        if not self.manifest["totals"]["documents_written"]:
            raise ValueError(f"{self.path}: prepare-sft wrote no samples (see manifest.json skip counts)")
        packing = np.load(self.path / "packing.npz")
        self.seq_length = int(packing["seq_length"])
        self.bin_offsets = packing["bin_offsets"].astype(np.int64)
        self.sample_ids = packing["sample_ids"].astype(np.int64)
        self.tokens = IndexedDataset(str(self.path / "tokens"))
        self.loss_mask = IndexedDataset(str(self.path / "loss_mask"))
        if len(self.tokens) != len(self.loss_mask):
            raise ValueError(f"{self.path}: tokens has {len(self.tokens)} samples, loss_mask {len(self.loss_mask)}")
        self.pad_id = self.manifest["tokenizer"]["eod_id"] if pad_id is None else pad_id

    def __len__(self) -> int:
        return len(self.bin_offsets) - 1

    @property
    def num_samples(self) -> int:
        return len(self.tokens)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, loss mask) of sample ``i`` as stored (unshifted, BOS ... EOS)."""
        return self.tokens[i].astype(np.int64), self.loss_mask[i].astype(np.int64)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        if not 0 <= b < len(self):
            raise IndexError(f"bin {b} out of range [0, {len(self)})")
        S = self.seq_length
        tokens = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, IGNORE_INDEX, dtype=np.int64)
        loss_mask = np.zeros(S, dtype=np.float32)
        cu = [0]
        for i in self.sample_ids[self.bin_offsets[b] : self.bin_offsets[b + 1]]:
            ids, mask = self.sample(int(i))
            n = len(ids) - 1
            start = cu[-1]
            tokens[start : start + n] = ids[:-1]
            target_mask = mask[1:] > 0
            labels[start : start + n] = np.where(target_mask, ids[1:], IGNORE_INDEX)
            loss_mask[start : start + n] = target_mask
            cu.append(start + n)
        if cu[-1] < S:
            cu.append(S)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": position_ids_from_cu_seqlens(cu_seqlens, S),
            "cu_seqlens": cu_seqlens,
        }

