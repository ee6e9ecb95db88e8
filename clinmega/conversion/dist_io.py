"""megatron-core distributed checkpoints (torch_dist), written and read one tensor at a time.

Writing: the model's own ``sharded_state_dict()`` (built on the meta device, so it costs no
memory) says which keys, global shapes, shards and objects the checkpoint must hold; it goes
through megatron-core's ``dist_checkpointing.save`` (factories, validation, common state,
``metadata.json``) unchanged, except that the strategy hands DCP a planner whose
``resolve_data`` *produces* each shard's data on demand. torch's FileSystemWriter asks for one
item at a time, and with one file per item it keeps no reference to earlier items, so peak memory
is about one tensor.

Reading: any region of a stored global tensor is read with DCP's resharding reads into a
preallocated tensor, without megatron-core or a process group.
"""

from __future__ import annotations

import json
import warnings
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
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

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


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Reads the chunk at ``offsets`` of each requested global tensor into a given tensor."""

    def __init__(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.requests = requests

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, tensor) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape)
            items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        tensor = self.requests[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        return tensor

    def commit_tensor(self, read_item, tensor):
        pass  # read in place


class _CachedReader(dcp.FileSystemReader):
    def __init__(self, path: Path):
        super().__init__(str(path))
        self._metadata = super().read_metadata()

    def read_metadata(self, *args, **kwargs):
        return self._metadata


class DistCheckpointReader:
    """Random access to the global tensors of a megatron-core torch_dist checkpoint."""

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
            self._reader = _CachedReader(self.directory)
        except Exception as err:
            raise ConversionError(f"{self.directory}: cannot read .metadata: {err}") from None
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self._reader.read_metadata().state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        """The region ``[offsets, offsets + sizes)`` of global tensor ``key``, stored dtype."""
        tensor = torch.empty(sizes, dtype=self.dtype(key))
        planner = _RegionLoadPlanner({key: (offsets, tensor)})
        try:
            with warnings.catch_warnings():  # "no process group: single-process load" is intended
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state_dict={key: tensor}, storage_reader=self._reader, planner=planner,
                         no_dist=True)
        except Exception as err:
            raise ConversionError(f"{self.directory}: cannot read tensor {key!r} at {offsets}: "
                                  f"{err}") from None
        return tensor
