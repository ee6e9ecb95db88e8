"""megatron-core distributed checkpoints (torch_dist), written and read one tensor at a time.

Writing: the model's own ``sharded_state_dict()`` (built on the meta device, so it costs no
memory) says which keys, global shapes, shards and objects the checkpoint must hold; it goes
through megatron-core's ``dist_checkpointing.save`` (factories, validation, common state,
``metadata.json``) unchanged, except that the strategy hands DCP a planner whose
``resolve_data`` *produces* each shard's data on demand. torch's FileSystemWriter asks for one
item at a time, and with one file per item it keeps no reference to earlier items, so peak memory
is about one tensor.

Reading: any region of a stored global tensor is read straight into a preallocated tensor (see
``DistCheckpointReader``), without megatron-core or a process group.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from clinmega.conversion import rawio
from clinmega.conversion.errors import ConversionError

class Producer(Protocol):
    """Makes the data of checkpoint chunks on demand."""

    def expect(self, chunks: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        """The (key, offsets, dtype) of the chunks to come, in the order they will be asked."""

    def __call__(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...],
                 dtype: torch.dtype) -> torch.Tensor:
        """The chunk at ``offsets`` of global tensor ``key``: shape ``sizes``, ``dtype``."""


class _ProducingPlanner(MCoreSavePlanner):
    def __init__(self, produce: Producer, **kwargs):
        super().__init__(**kwargs)
        self.produce = produce

    def finish_plan(self, new_plan):
        plan = super().finish_plan(new_plan)
        # FileSystemWriter(single_file_per_rank=False) writes the items in plan order.
        self.produce.expect([(item.index.fqn, tuple(item.tensor_data.chunk.offsets),
                              item.tensor_data.properties.dtype)
                             for item in plan.items if item.type != WriteItemType.BYTE_IO])
        return plan

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        chunk = write_item.tensor_data.chunk
        dtype = write_item.tensor_data.properties.dtype
        tensor = self.produce(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes),
                              dtype)
        if tuple(tensor.shape) != tuple(chunk.sizes) or tensor.dtype != dtype:
            raise AssertionError(f"{write_item.index.fqn}: produced {tuple(tensor.shape)} "
                                 f"{tensor.dtype}, expected {tuple(chunk.sizes)} {dtype}")
        return tensor


class ProducingSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's torch_dist format, tensor data produced lazily by ``produce``."""

    def __init__(self, produce: Producer):
        super().__init__("torch_dist", 1)
        self.produce = produce

    def save(self, sharded_state_dict, checkpoint_dir):
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
        # One file per item keeps no earlier tensor alive; no per-file fsync (staging.commit
        # syncs the whole folder once, so writeback overlaps conversion).
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False,
                                      thread_count=1, sync_files=False)
        planner = _ProducingPlanner(self.produce, flatten_state_dict=False,
                                    flatten_sharded_tensors=False)
        crc32 = torch.serialization.get_crc32_options()
        # torch.load never checks the zip CRC32 of a record; computing it costs ~10 % of the time.
        torch.serialization.set_crc32_options(False)
        try:
            dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)
        except CheckpointException as err:  # DCP wraps what the producer raised: re-raise it
            for failure in err.failures.values():
                cause = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(cause, (ConversionError, KeyboardInterrupt, SystemExit)):
                    raise cause from None
            raise
        finally:
            torch.serialization.set_crc32_options(crc32)


def save_produced(sharded_state_dict: dict, directory: str | Path, produce: Producer) -> None:
    """Collective: save ``sharded_state_dict`` (data may live on the meta device) with each
    tensor chunk's data made by ``produce`` when it is written."""
    dist_checkpointing.save(sharded_state_dict, str(directory),
                            sharded_strategy=ProducingSaveStrategy(produce))


class _Window(io.RawIOBase):
    """A read-only, seekable window ``[offset, offset + length)`` of an open file descriptor,
    read with positional reads (no shared file position, so threads may share the descriptor)."""

    def __init__(self, fd: int, offset: int, length: int):
        super().__init__()
        self._fd, self._offset, self._length, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        size = max(0, min(len(view), self._length - self._pos))
        if size == 0:
            return 0
        read = os.preadv(self._fd, [view[:size]], self._offset + self._pos)
        self._pos += read
        return read


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


class DistCheckpointReader:
    """Random access to the global tensors of a megatron-core torch_dist checkpoint.

    torch's reader (``dcp.load``) deserialises each stored item with ``torch.load`` into a fresh
    tensor and copies it into the destination. Here the item's ``torch.save`` record is opened
    on the meta device (``torch.load(map_location="meta")`` reads only the zip directory and
    the pickle, and records where the storage bytes start), and the bytes of the requested
    region are read straight into the destination: one copy, no allocation. Which items hold a
    region is DCP's own planning (``create_read_items_for_chunk_list``).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config = self.directory / "metadata.json"
        if not config.is_file():
            raise ConversionError(f"{self.directory}: not a megatron-core distributed checkpoint "
                                  "(metadata.json is missing)")
        backend = json.loads(config.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ConversionError(f"{config}: sharded_backend {backend!r} is not supported "
                                  "(expected 'torch_dist')")
        try:
            metadata = dcp.FileSystemReader(str(self.directory)).read_metadata()
        except Exception as err:
            raise ConversionError(f"{self.directory}: cannot read .metadata: {err}") from None
        self._storage = metadata.storage_data
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...],
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of global tensor ``key`` in its stored
        dtype, read into ``out`` (a tensor of that shape and dtype) when given."""
        if out is None:
            out = torch.empty(sizes, dtype=self.dtype(key))
        elif tuple(out.shape) != tuple(sizes) or out.dtype != self.dtype(key):
            raise ValueError(f"{key}: out is {tuple(out.shape)} {out.dtype}, the region is "
                             f"{tuple(sizes)} {self.dtype(key)}")
        shape = self.shape(key)
        if len(offsets) != len(shape) or any(
                o < 0 or o + s > d for o, s, d in zip(offsets, sizes, shape)):
            raise ConversionError(f"{self.directory}: tensor {key!r} of shape {list(shape)} has "
                                  f"no region of size {list(sizes)} at {list(offsets)}")
        region = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, self.tensors[key], [region])
        covered = sum(math.prod(item.lengths) for item in items)
        if covered != out.numel():
            raise ConversionError(f"{self.directory}: tensor {key!r}: the stored chunks cover "
                                  f"{covered} of the {out.numel()} elements at {offsets}")
        for item in items:
            self._read_item(key, item, _narrow(out, item.dest_offsets, item.lengths))
        return out

    def _read_item(self, key: str, item, dest: torch.Tensor) -> None:
        info = self._storage[item.storage_index]
        path = self.directory / info.relative_path
        where = f"{path}: tensor {key!r} chunk at {tuple(item.storage_index.offset)}"
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(f"{where}: stored with DCP transforms "
                                  f"{list(info.transform_descriptors)} (e.g. compression), "
                                  "which this reader does not decode")
        with rawio.opened(path, where) as fd:
            try:
                stored = torch.load(_Window(fd, info.offset, info.length), map_location="meta",
                                    weights_only=True)
                start = info.offset + stored.untyped_storage()._checkpoint_offset
            except Exception as err:
                raise ConversionError(f"{where}: not a readable torch.save record "
                                      f"({err})") from None
            if stored.dtype != dest.dtype:
                raise ConversionError(f"{where}: stored as {stored.dtype}, the metadata says "
                                      f"{dest.dtype}")
            part = _narrow(stored, item.storage_offsets, item.lengths)
            if part.is_contiguous():  # the usual case: read the region's bytes in place
                # (through a temporary when the destination is strided, e.g. a column chunk of a
                # TP-sharded checkpoint: one read, not one per row)
                target = dest if dest.is_contiguous() else torch.empty(part.shape,
                                                                       dtype=part.dtype)
                rawio.read_into(fd, target, start + part.storage_offset() * part.element_size(),
                                where)
                if target is not dest:
                    dest.copy_(target)
            else:  # a strided record: read its whole storage, then take the region
                storage = torch.empty(stored.untyped_storage().nbytes(), dtype=torch.uint8)
                rawio.read_into(fd, storage, start, where)
                dest.copy_(_narrow(storage.view(stored.dtype).as_strided(
                    stored.shape, stored.stride(), stored.storage_offset()),
                    item.storage_offsets, item.lengths))
