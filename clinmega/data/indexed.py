"""Writing megatron-core indexed datasets (``.bin``/``.idx``) from parallel shards, without importing torch.

The ``.idx`` layout is megatron-core's ``_IndexWriter`` format (header ``MMIDIDX\\0\\0``, version 1, dtype
code, sequence count, document count, int32 lengths, int64 byte pointers, int64 document indices);
tests check our files byte-for-byte against ``IndexedDatasetBuilder``'s and read them back with
``IndexedDataset``. Writing it here keeps torch + megatron (seconds of start-up, hundreds of MB in every
forked worker) off the data stages' work path.

Workers each write a shard; ``merge_shards`` concatenates them in task order (the ``.bin`` parts with
``os.copy_file_range``, i.e. inside the kernel) so the result does not depend on the worker count. One
sequence is one document (as megatron's ``preprocess_data`` writes without sentence splitting), which is
what ``GPTDataset`` samples from.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes (a file-format constant; checked by a test).
DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
_DTYPE_OF_CODE = {c: t for t, c in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """megatron-core's ``DType.optimal_dtype``: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class ShardWriter:
    """Appends sequences to ``<prefix>.bin``; ``finish`` writes ``<prefix>.idx`` (one document per sequence
    unless ``document_indices`` says otherwise)."""

    def __init__(self, prefix: str | Path, dtype: type[np.number]) -> None:
        self.dtype = np.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise TypeError(f"{np.dtype(dtype).name} is not an indexed-dataset dtype")
        self.data_file = open(f"{prefix}.bin", "wb")
        self._lengths: list[np.ndarray] = []
        self._doc_ends: list[np.ndarray] = []  # document_indices[1:], absolute
        self.n_sequences = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray, doc_ends: np.ndarray | None = None) -> None:
        """Append ``len(lengths)`` sequences laid out back to back in ``tokens`` (already in ``dtype``)."""
        if tokens.dtype != np.dtype(self.dtype):
            raise TypeError(f"tokens are {tokens.dtype}, builder writes {np.dtype(self.dtype)}")
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())}, got {tokens.size} tokens")
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError("a sequence is longer than int32 allows")
        self.data_file.write(np.ascontiguousarray(tokens).data)
        n0 = self.n_sequences
        self._lengths.append(lengths)
        ends = np.arange(n0 + 1, n0 + 1 + len(lengths), dtype=np.int64) if doc_ends is None else doc_ends + n0
        self._doc_ends.append(ends)
        self.n_sequences += len(lengths)

    def finish(self, idx_path: str | Path) -> None:
        self.data_file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1] * np.dtype(self.dtype).itemsize, out=pointers[1:])
        docs = np.concatenate([np.zeros(1, np.int64), *self._doc_ends])
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(docs)))
            f.write(lengths.astype(np.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(docs.tobytes())


def read_index(idx_path: str | Path) -> tuple[type[np.number], np.ndarray, np.ndarray]:
    """(dtype, sequence lengths int32, document indices int64) of a non-multimodal ``.idx`` file."""
    with open(idx_path, "rb") as f:
        head = f.read(len(INDEX_HEADER) + 8 + 1 + 16)
        if head[: len(INDEX_HEADER)] != INDEX_HEADER:
            raise ValueError(f"{idx_path}: not a megatron indexed-dataset index (bad header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(INDEX_HEADER) :])
        if version != 1 or code not in _DTYPE_OF_CODE:
            raise ValueError(f"{idx_path}: unsupported index version {version} / dtype code {code}")
        lengths = np.fromfile(f, dtype=np.int32, count=n_seq)
        f.seek(8 * n_seq, os.SEEK_CUR)
        docs = np.fromfile(f, dtype=np.int64, count=n_doc)
    if len(lengths) != n_seq or len(docs) != n_doc:
        raise ValueError(f"{idx_path}: truncated index")
    return _DTYPE_OF_CODE[code], lengths, docs


def new_builder(prefix: str | Path, dtype: type[np.number]) -> ShardWriter:
    """A writer of ``<prefix>.bin`` (finish with ``finish(builder, prefix)``)."""
    return ShardWriter(prefix, dtype)


def append_sequences(builder: ShardWriter, tokens: np.ndarray, lengths: np.ndarray) -> None:
    """Append ``len(lengths)`` sequences (one document each) laid out back to back in ``tokens``."""
    builder.add(tokens, lengths)


def finish(builder: ShardWriter, prefix: str | Path) -> None:
    """Close the ``.bin`` and write ``<prefix>.idx``."""
    builder.finish(f"{prefix}.idx")


def _append_file(src_path: str, dst) -> None:
    """Append ``src_path`` to the open binary file ``dst`` (in-kernel copy where the OS offers it)."""
    dst.flush()
    with open(src_path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        copy_range = getattr(os, "copy_file_range", None)
        done = 0
        if copy_range is not None:
            try:
                while done < size:
                    n = copy_range(src.fileno(), dst.fileno(), size - done)
                    if n == 0:
                        break
                    done += n
            except OSError:
                pass  # e.g. across file systems on old kernels: fall back to a user-space copy
        if done < size:
            src.seek(done)
            dst.seek(0, os.SEEK_END)
            shutil.copyfileobj(src, dst, 16 << 20)
    dst.seek(0, os.SEEK_END)


def merge_shards(shards: Sequence[str | Path], prefix: str | Path, dtype: type[np.number]) -> int:
    """Concatenate shard datasets (in the given order) into ``<prefix>.bin/.idx``, deleting each shard
    once copied. Returns the number of sequences written (same files as ``IndexedDatasetBuilder.add_index``
    per shard)."""
    builder = new_builder(prefix, dtype)
    for shard in shards:
        shard_dtype, lengths, docs = read_index(f"{shard}.idx")
        if shard_dtype != np.dtype(dtype).type:
            raise TypeError(f"{shard}.idx holds {np.dtype(shard_dtype).name}, expected {np.dtype(dtype).name}")
        builder._lengths.append(lengths.astype(np.int64))
        builder._doc_ends.append(docs[1:] + builder.n_sequences)
        builder.n_sequences += len(lengths)
        _append_file(f"{shard}.bin", builder.data_file)
        for ext in (".bin", ".idx"):
            Path(f"{shard}{ext}").unlink(missing_ok=True)
    finish(builder, prefix)
    return builder.n_sequences


def sequence_lengths(prefix: str | Path) -> np.ndarray:
    """Length of every sequence of the dataset at ``prefix`` (a copy; works for empty datasets too)."""
    return read_index(f"{prefix}.idx")[1].astype(np.int64)
