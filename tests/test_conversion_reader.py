"""DistCheckpointReader reads any region of a torch_dist checkpoint exactly as torch's own DCP
loader does: contiguous and strided records, regions spanning several chunks, several items per
file; damaged files give an error naming the file and tensor."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

from clinmega.conversion import ConversionError
from clinmega.conversion.dist_io import DistCheckpointReader
from clinmega.conversion.prefetch import ReusedBuffers
from clinmega.config import RuntimeConfig
from clinmega.runtime import init_process_group

GEN = torch.Generator().manual_seed(0)
FULL = torch.randn(6, 10, 8, generator=GEN)


def save_chunked(folder, transposed: bool):
    """FULL saved by megatron-core as 2x2 chunks (dims 1 and 2), in one file, each chunk stored
    strided (a transposed view) when ``transposed``."""
    state = {}
    for i in range(2):
        for j in range(2):
            chunk = FULL[:, 5 * i:5 * (i + 1), 4 * j:4 * (j + 1)].clone()
            if transposed:
                chunk = chunk.transpose(1, 2).contiguous().transpose(1, 2)
                assert not chunk.is_contiguous()
            state[f"c{i}{j}"] = ShardedTensor.from_rank_offsets(
                "w", chunk, (1, i, 2), (2, j, 2), replica_id=0)
    folder.mkdir()
    init_process_group(RuntimeConfig())  # one gloo rank: megatron-core's save is collective
    dist_checkpointing.save(state, str(folder))
    return folder


def dcp_reference(folder, offsets, sizes):
    """The same region through torch's own loader: read everything, then slice."""
    whole = {"w": torch.empty(FULL.shape)}
    dcp.load(whole, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    region = whole["w"]
    for dim, (start, size) in enumerate(zip(offsets, sizes)):
        region = region.narrow(dim, start, size)
    return region


REGIONS = [((0, 0, 0), (6, 10, 8)), ((2, 0, 0), (1, 10, 8)), ((1, 3, 2), (3, 4, 5)),
           ((5, 9, 7), (1, 1, 1)), ((0, 5, 0), (6, 5, 4))]


@pytest.mark.parametrize("transposed", [False, True])
def test_regions_equal_torch_dcp(tmp_path, transposed):
    folder = save_chunked(tmp_path / "ckpt", transposed)
    reader = DistCheckpointReader(folder)
    assert reader.shape("w") == tuple(FULL.shape) and reader.dtype("w") == torch.float32
    buffers = ReusedBuffers(2, [(FULL.shape, torch.float32)])
    for turn, (offsets, sizes) in enumerate(REGIONS):
        expected = dcp_reference(folder, offsets, sizes)
        assert torch.equal(expected, FULL[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))])
        assert torch.equal(reader.read("w", offsets, sizes), expected)
        out = buffers.tensor(turn, sizes, torch.float32).fill_(float("nan"))
        assert reader.read("w", offsets, sizes, out=out) is out and torch.equal(out, expected)


def test_reused_buffers_alternate_and_bound(tmp_path):
    buffers = ReusedBuffers(2, [((2, 2), torch.float32), ((4, 4), torch.float32)])
    a, b, c = (buffers.tensor(t, (4, 4), torch.float32) for t in range(3))
    assert a.data_ptr() == c.data_ptr() != b.data_ptr()
    with pytest.raises(ValueError, match=r"\(5, 4\) torch.float32 needs 80 bytes"):
        buffers.tensor(0, (5, 4), torch.float32)


def test_damaged_checkpoints_name_file_and_tensor(tmp_path, monkeypatch):
    folder = save_chunked(tmp_path / "ckpt", transposed=False)
    (data,) = [p for p in folder.iterdir() if p.suffix == ".distcp"]
    reader = DistCheckpointReader(folder)
    with pytest.raises(ConversionError, match=r"ckpt: tensor 'w' of shape \[6, 10, 8\] has no "
                                              r"region of size \[7, 10, 8\] at \[0, 0, 0\]"):
        reader.read("w", (0, 0, 0), (7, 10, 8))
    with pytest.raises(ValueError, match=r"w: out is \(2, 2\)"):
        reader.read("w", (0, 0, 0), (1, 1, 1), out=torch.empty(2, 2))

    info = next(v for k, v in reader._storage.items() if k.fqn == "w")
    monkeypatch.setattr(info, "transform_descriptors", ["zstd"])
    with pytest.raises(ConversionError, match=rf"{data}: tensor 'w' chunk at .*DCP transforms "
                                              r"\['zstd'\]"):
        reader.read("w", (0, 0, 0), (6, 10, 8))
    monkeypatch.undo()

    os.truncate(data, data.stat().st_size // 2)  # a copy cut short
    with pytest.raises(ConversionError, match=rf"{data}: tensor 'w' chunk at"):
        DistCheckpointReader(folder).read("w", (0, 0, 0), (6, 10, 8))
    data.unlink()
    with pytest.raises(ConversionError, match=rf"{data}: tensor 'w' chunk at .*No such file"):
        DistCheckpointReader(folder).read("w", (0, 0, 0), (6, 10, 8))
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(ConversionError, match=r"sharded_backend 'zarr' is not supported"):
        DistCheckpointReader(folder)
