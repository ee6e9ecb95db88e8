"""Hugging Face checkpoint folders: lazy tensor reading and streaming sharded-safetensors writing.

The safetensors format (8-byte little-endian header length, JSON header with
``dtype``/``shape``/``data_offsets``, padded to 8 bytes, then the raw bytes, row-major) is the one
documented by the safetensors project; both sides handle it directly, so tensor bytes move
between the file and the caller's memory with one copy:

* Reading parses the headers (validated against the file size) and reads a tensor's bytes with
  positional reads straight into a tensor the caller provides, which may be a strided view such as
  one of ``Mapping.hf_views`` (each contiguous block is read in place). Peak memory is what the
  caller provides. ``.bin`` pickle checkpoints are read only when explicitly allowed, with
  ``torch.load(weights_only=True)``.
* Writing streams: the shapes and dtypes of all tensors are known in advance, so each shard's
  header is written first and tensor bytes are appended as they are produced, from views
  without making them contiguous first; a shard is never held in memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from clinmega.conversion import dtypes, rawio
from clinmega.conversion.errors import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Files copied next to the weights (tokenizer and generation settings), when present.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
          "F16": torch.float16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int | None = None  # of the tensor's bytes in a safetensors file


def _safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, every entry checked against the file's size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {length} does not fit the file ({size} bytes)")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ConversionError(f"{file}: cannot read safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{file}: cannot read safetensors header: not a JSON object")
    start, out = 8 + length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConversionError(f"{file}: tensor {name!r}: bad header entry {entry!r} "
                                  f"({type(err).__name__}: {err})") from None
        if end - begin != rawio.nbytes(shape, dtype) or begin < 0 or start + end > size:
            raise ConversionError(f"{file}: tensor {name!r}: data_offsets [{begin}, {end}] do not "
                                  f"hold a {list(shape)} {entry['dtype']} tensor within the "
                                  f"file's {size} bytes (truncated file?)")
        out[name] = TensorInfo(file, shape, dtype, start + begin)
    return out


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConversionError(f"{path}: cannot read pickle checkpoint: {err}") from None


class HFReader:
    """The weight tensors of a HF model folder (safetensors, single or sharded with an index)."""

    def __init__(self, folder: str | Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"{self.folder}: not a folder")
        files, index = self._weight_files(allow_pickle)
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            self.tensors.update(self._headers(file))
        for name, file in (index or {}).items():
            if name not in self.tensors or self.tensors[name].file != file:
                raise ConversionError(f"{file}: tensor {name!r} listed in the index is not in "
                                      "this file")

    def _weight_files(self, allow_pickle: bool) -> tuple[list[Path], dict[str, Path] | None]:
        """The weight files, and {tensor name: file} when the checkpoint has an index."""
        for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE),
                                        (PICKLE_INDEX, PICKLE_SINGLE)):
            index_path, single = self.folder / index_name, self.folder / single_name
            found = index_path if index_path.exists() else single if single.exists() else None
            if found is None:
                continue
            if single_name == PICKLE_SINGLE and not allow_pickle:
                raise ConversionError(
                    f"{found}: pickle (.bin) checkpoints can run code when loaded; convert them "
                    "to safetensors or pass --allow-pickle (then read with "
                    "torch.load(weights_only=True))")
            if found is single:
                return [single], None
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConversionError(f"{index_path}: invalid index ({err})") from None
            index = {name: self.folder / f for name, f in weight_map.items()}
            files = sorted(set(index.values()))
            for file in files:
                if not file.is_file():
                    raise ConversionError(f"{file}: shard listed in {index_path.name} is missing")
            return files, index
        raise ConversionError(f"{self.folder}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} "
                              "found")

    def _headers(self, file: Path) -> dict[str, TensorInfo]:
        if file.suffix == ".bin":
            return {name: TensorInfo(file, tuple(t.shape), t.dtype)
                    for name, t in _load_pickle(file).items()}
        return _safetensors_header(file)

    def read_into(self, name: str, dest: torch.Tensor, allow_downcast: bool = False) -> None:
        """Fill ``dest`` (same number of elements, any dtype, any view whose row-major order is
        the tensor's) with tensor ``name``; a lossy cast is refused unless ``allow_downcast``."""
        info = self.tensors[name]
        if dest.numel() != math.prod(info.shape):
            raise ConversionError(f"{info.file}: tensor {name!r} {list(info.shape)} does not fit "
                                  f"{list(dest.shape)}")
        if info.offset is None:  # pickle checkpoint
            state = _load_pickle(info.file)
            stored = state[name]
        else:
            stored = dest if dest.dtype == info.dtype else torch.empty(dest.shape, dtype=info.dtype)
            where = f"{info.file}: tensor {name!r}"
            with rawio.opened(info.file, where) as fd:
                rawio.read_into(fd, stored, info.offset, where)
        if stored is not dest:
            dest.copy_(dtypes.cast(stored.reshape(dest.shape), dest.dtype, name, allow_downcast))


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return rawio.nbytes(self.shape, self.dtype)


def _split_shards(planned: Sequence[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in planned:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(shard: Sequence[PlannedTensor]) -> bytes:
    entries, offset = {}, 0
    for t in shard:
        entries[t.name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    entries["__metadata__"] = {"format": "pt"}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Writes ``planned`` tensors, in order, into HF-named shards of at most ``max_shard_bytes``
    (one ``model.safetensors``, or ``single_name``, when they fit in one, else ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json``)."""

    def __init__(self, folder: str | Path, planned: Sequence[PlannedTensor],
                 max_shard_bytes: int = 5 * 10**9, single_name: str = SAFETENSORS_SINGLE):
        self.folder = Path(folder)
        self.shards = _split_shards(planned, max_shard_bytes)
        n = len(self.shards)
        self.files = ([single_name] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._stream = None
        self._shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next planned tensor, given as a tensor or view with its elements in
        row-major order (e.g. one of ``Mapping.hf_views``); returns the bytes written."""
        if self._next >= len(self._order):
            raise ConversionError(f"tensor {name!r}: all planned tensors were already written")
        shard, planned = self._order[self._next]
        if (name, tensor.numel(), tensor.dtype) != (planned.name, math.prod(planned.shape),
                                                    planned.dtype):
            raise ConversionError(
                f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype}: expected "
                f"{planned.name!r} {planned.shape} {planned.dtype} next")
        if shard != self._shard:
            self._close_stream()
            self._shard = shard
            self._stream = open(self.folder / self.files[shard], "wb")
            self._stream.write(_header(self.shards[shard]))
        for block in rawio.contiguous_blocks(tensor.detach()):
            self._stream.write(rawio.byte_view(block))
        self._next += 1
        return planned.nbytes

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()  # made durable by staging.commit
            self._stream = None

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must be written."""
        self._close_stream()
        if self._next != len(self._order):
            raise ConversionError(f"tensor {self._order[self._next][1].name!r} was never written")
        if len(self.files) > 1:
            weight_map = {t.name: f for f, shard in zip(self.files, self.shards) for t in shard}
            total = sum(t.nbytes for shard in self.shards for t in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
