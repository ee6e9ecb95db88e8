"""Writing megatron-core indexed datasets (``.bin``/``.idx``) from parallel shards.

Workers each write a shard with ``IndexedDatasetBuilder``; ``merge_shards`` concatenates them in task
order with ``IndexedDatasetBuilder.add_index`` so the result does not depend on the worker count. One
sequence is one document (as megatron's ``preprocess_data`` writes without sentence splitting), which is
what ``GPTDataset`` samples from.

megatron-core is imported at module level on purpose: workers are forked after this import, so they
do not pay for importing torch + megatron again.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader


def new_builder(prefix: str | Path, dtype: type[np.number]) -> Any:
    """An ``IndexedDatasetBuilder`` writing ``<prefix>.bin`` (finish with ``finish(builder, prefix)``)."""
    return IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)


def append_sequences(builder: Any, tokens: np.ndarray, lengths: np.ndarray) -> None:
    """Bulk form of ``add_item`` + ``end_document`` for each of ``len(lengths)`` sequences laid out
    back to back in ``tokens`` (already in the builder's dtype)."""
    if tokens.dtype != np.dtype(builder.dtype):
        raise TypeError(f"tokens are {tokens.dtype}, builder writes {np.dtype(builder.dtype)}")
    n0 = len(builder.sequence_lengths)
    builder.data_file.write(tokens.tobytes(order="C"))
    builder.sequence_lengths.extend(lengths.tolist())
    builder.document_indices.extend(range(n0 + 1, n0 + 1 + len(lengths)))


def finish(builder: Any, prefix: str | Path) -> None:
    """Close the ``.bin`` and write ``<prefix>.idx``."""
    builder.finalize(f"{prefix}.idx")


def merge_shards(shards: Sequence[str | Path], prefix: str | Path, dtype: type[np.number]) -> int:
    """Concatenate shard datasets (in the given order) into ``<prefix>.bin/.idx``, deleting each shard
    once copied. Returns the number of sequences written.

    Same result as ``IndexedDatasetBuilder.add_index`` per shard, without its ``gc.collect()`` per call
    (seconds per shard once torch is loaded, which dominates with hundreds of shards)."""
    builder = new_builder(prefix, dtype)
    for shard in shards:
        index = _IndexReader(f"{shard}.idx", multimodal=False)
        if index.dtype != np.dtype(dtype).type:
            raise TypeError(f"{shard}.idx holds {index.dtype}, expected {np.dtype(dtype).name}")
        offset = len(builder.sequence_lengths)
        builder.sequence_lengths.extend(index.sequence_lengths.tolist())
        builder.document_indices.extend((offset + index.document_indices[1:]).tolist())
        del index  # its arrays are views of an mmap
        with open(f"{shard}.bin", "rb") as f:
            shutil.copyfileobj(f, builder.data_file, 16 << 20)
        for ext in (".bin", ".idx"):
            Path(f"{shard}{ext}").unlink(missing_ok=True)
    finish(builder, prefix)
    return len(builder.sequence_lengths)


def sequence_lengths(prefix: str | Path) -> np.ndarray:
    """Length of every sequence of the dataset at ``prefix`` (a copy; works for empty datasets too)."""
    index = _IndexReader(f"{prefix}.idx", multimodal=False)
    lengths = np.array(index.sequence_lengths, dtype=np.int64)
    del index
    return lengths
