"""Hugging Face checkpoint folders: lazy tensor reading and streaming sharded-safetensors writing.

Reading opens a weight file only for the tensors asked for (``safetensors.safe_open``, opened
per read, so no file mapping outlives the tensors taken from it), so peak memory is about the
tensors of one mapping. ``.bin`` pickle checkpoints are read only when explicitly allowed, with
``torch.load(weights_only=True)``.

Writing streams: the shapes and dtypes of all tensors are known in advance, so each shard's
safetensors header is written first and tensor bytes are appended as they are produced; a
shard is never held in memory. The format (8-byte little-endian header length, JSON header with
``dtype``/``shape``/``data_offsets``, padded to 8 bytes, then the raw bytes) is the one
documented by the safetensors project.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open

from clinmega.conversion.errors import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Files copied next to the weights (tokenizer and generation settings), when present.
ASSET_FILES = ("generation_config.json", "tokenizer.model", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "tekken.json", "chat_template.jinja", "chat_template.json")

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
          "F16": torch.float16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


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
        try:
            with safe_open(file, framework="pt") as f:
                out = {}
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name] = TensorInfo(file, tuple(sl.get_shape()), DTYPES[sl.get_dtype()])
                return out
        except Exception as err:
            raise ConversionError(f"{file}: cannot read safetensors header: {err}") from None

    def read(self, names: Sequence[str]) -> list[torch.Tensor]:
        """Load ``names`` (each file opened once, then closed)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        loaded: dict[str, torch.Tensor] = {}
        for file, group in by_file.items():
            try:
                if file.suffix == ".bin":
                    state = _load_pickle(file)
                    loaded.update({n: state[n].clone() for n in group})
                    del state
                    continue
                with safe_open(file, framework="pt") as f:
                    loaded.update({n: f.get_tensor(n) for n in group})
            except ConversionError:
                raise
            except Exception as err:
                raise ConversionError(f"{file}: cannot read tensor(s) {group}: {err}") from None
        return [loaded[n] for n in names]


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()


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
        entries[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    entries["__metadata__"] = {"format": "pt"}
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Writes ``planned`` tensors, in order, into HF-named shards of at most ``max_shard_bytes``
    (one ``model.safetensors`` when they fit in one, else ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json``)."""

    def __init__(self, folder: str | Path, planned: Sequence[PlannedTensor],
                 max_shard_bytes: int = 5 * 10**9):
        self.folder = Path(folder)
        self.shards = _split_shards(planned, max_shard_bytes)
        n = len(self.shards)
        self.files = ([SAFETENSORS_SINGLE] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._stream = None
        self._shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next planned tensor; returns the bytes written."""
        if self._next >= len(self._order):
            raise ConversionError(f"tensor {name!r}: all planned tensors were already written")
        shard, planned = self._order[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (planned.name, planned.shape,
                                                         planned.dtype):
            raise ConversionError(
                f"tensor {name!r} {tuple(tensor.shape)} {tensor.dtype}: expected "
                f"{planned.name!r} {planned.shape} {planned.dtype} next")
        if shard != self._shard:
            self._close_stream()
            self._shard = shard
            self._stream = open(self.folder / self.files[shard], "wb")
            self._stream.write(_header(self.shards[shard]))
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._stream.write(memoryview(data))
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


def copy_assets(source: str | Path | None, dest: str | Path,
                names: Iterable[str] = ASSET_FILES) -> list[str]:
    """Copy the tokenizer / generation-config files present in ``source``; returns their names."""
    if source is None:
        return []
    source = Path(source)
    copied = []
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, Path(dest) / name)
            copied.append(name)
    return copied


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
