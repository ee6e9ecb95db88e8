"""clinmega's torch-free indexed-dataset writer against megatron-core's own builder and reader."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

from clinmega.data.indexed import DTYPE_CODES, append_sequences, finish, merge_shards, new_builder, optimal_dtype


def test_dtype_table_and_optimal_dtype_match_megatron():
    for dtype, code in DTYPE_CODES.items():
        assert DType.code_from_dtype(dtype) == code
    assert len(DTYPE_CODES) == len(DType)
    for vocab in (100, 32000, 32768, 65499, 65500, 131072):
        assert optimal_dtype(vocab) is DType.optimal_dtype(vocab)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8])
def test_shards_merge_byte_identical_to_indexed_dataset_builder(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 200, size=int(rng.integers(1, 50))).astype(dtype) for _ in range(37)]
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for d in docs:
        ref.add_item(torch.from_numpy(d.astype(np.int64)))
        ref.end_document()
    ref.finalize(str(tmp_path / "ref.idx"))

    bounds = [0, 5, 5, 20, 37]  # an empty shard in the middle too
    shards = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        prefix = tmp_path / f"shard{i}"
        w = new_builder(prefix, dtype)
        part = docs[a:b]
        for j in range(0, len(part), 4):  # several appends per shard
            batch = part[j : j + 4]
            append_sequences(w, np.concatenate(batch), np.array([len(x) for x in batch]))
        finish(w, prefix)
        shards.append(prefix)
    assert merge_shards(shards, tmp_path / "ours", dtype) == len(docs)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext
    assert not any((tmp_path / f"shard0{e}").exists() for e in (".bin", ".idx"))
    ds = IndexedDataset(str(tmp_path / "ours"))
    assert len(ds) == len(docs) and all(np.array_equal(ds[i], d) for i, d in enumerate(docs))


def test_writer_refuses_wrong_dtype_and_bad_lengths(tmp_path):
    w = new_builder(tmp_path / "x", np.uint16)
    with pytest.raises(TypeError, match="int32"):
        append_sequences(w, np.zeros(3, np.int32), np.array([3]))
    with pytest.raises(ValueError, match="lengths sum"):
        append_sequences(w, np.zeros(3, np.uint16), np.array([2]))
