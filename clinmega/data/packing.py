"""Sequence packing and the per-sub-sequence tensors packed training needs.

``pack_ffd`` puts samples into fixed-capacity bins with first-fit-decreasing (a max segment tree over
the bins' free space finds the first bin that fits in O(log n)), deterministically. A packed bin is
described by ``cu_seqlens`` (cumulative sub-sequence boundaries, Transformer Engine's THD format);
``position_ids_from_cu_seqlens`` restarts positions per sub-sequence and ``block_causal_mask`` builds the
equivalent dense mask for attention backends without THD support (megatron-core convention:
``True`` = masked out). With RoPE, packed-with-this-mask equals running each sample alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def pack_ffd(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit-decreasing bin packing.

    Returns ``(bin_offsets, sample_ids)``: bin ``b`` holds samples
    ``sample_ids[bin_offsets[b]:bin_offsets[b+1]]`` (longest first, ties by index). Raises ValueError
    naming the first sample longer than ``capacity``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if capacity <= 0:
        raise ValueError("capacity must be positive")
    too_long = np.flatnonzero(lengths > capacity)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"sample {i} has length {int(lengths[i])} > bin capacity {capacity}")
    n = len(lengths)
    if n == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(n), -lengths))  # longest first, stable
    size = 1
    while size < n:
        size *= 2
    tree = [0] * (2 * size)  # max free capacity in each subtree; leaves are bins (all start full-free)
    for i in range(size, size + n):
        tree[i] = capacity
    for i in range(size - 1, 0, -1):
        tree[i] = max(tree[2 * i], tree[2 * i + 1])
    assignment = np.empty(n, dtype=np.int64)
    used_bins = 0
    for sample in order.tolist():
        need = int(lengths[sample])
        node = 1
        while node < size:  # descend to the leftmost leaf with enough room
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        assignment[sample] = b
        used_bins = max(used_bins, b + 1)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    # group samples by bin, keeping the FFD placement order inside each bin
    sample_ids = order[np.argsort(assignment[order], kind="stable")]
    counts = np.bincount(assignment, minlength=used_bins)
    bin_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return bin_offsets, sample_ids.astype(np.int64)


def packing_report(lengths: np.ndarray, bin_offsets: np.ndarray, capacity: int) -> dict[str, Any]:
    """Efficiency = real tokens / (bins × capacity); also the unpacked (one sample per bin) figure."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_bins = len(bin_offsets) - 1
    real = int(lengths.sum())
    return {
        "capacity": capacity,
        "samples": int(len(lengths)),
        "bins": n_bins,
        "tokens": real,
        "efficiency": round(real / (n_bins * capacity), 6) if n_bins else 0.0,
        "unpacked_efficiency": round(real / (len(lengths) * capacity), 6) if len(lengths) else 0.0,
        "mean_samples_per_bin": round(len(lengths) / n_bins, 3) if n_bins else 0.0,
    }


def position_ids_from_cu_seqlens(cu_seqlens: Any, seq_len: int) -> Any:
    """Position ids ``[seq_len]`` (int64) restarting at 0 at every boundary in ``cu_seqlens``."""
    import torch

    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    if int(cu[-1]) != seq_len:
        raise ValueError(f"cu_seqlens must end at seq_len={seq_len}, got {int(cu[-1])}")
    pos = torch.arange(seq_len, dtype=torch.int64)
    seg = torch.bucketize(pos, cu[1:], right=True)
    return pos - cu[seg]


def block_causal_mask(cu_seqlens: Any, seq_len: int, window: int | None = None) -> Any:
    """Block-diagonal causal mask ``[1, 1, seq_len, seq_len]`` (bool, True = masked out) allowing each
    token to attend only to earlier tokens of its own sub-sequence, and with ``window`` only to the last
    ``window`` of them (itself included: Mistral's sliding window). ``cu_seqlens`` must end at seq_len."""
    import torch

    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64)
    if int(cu[-1]) != seq_len:
        raise ValueError(f"cu_seqlens must end at seq_len={seq_len}, got {int(cu[-1])}")
    pos = torch.arange(seq_len)
    seg = torch.bucketize(pos, cu[1:], right=True)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    return (~allowed)[None, None]
