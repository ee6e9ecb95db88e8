"""Tensor bytes to and from files with one copy: positional reads straight into (views of)
tensors, and the contiguous pieces a strided view is written from."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from clinmega.conversion.errors import ConversionError


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a ``shape`` tensor of ``dtype``."""
    return math.prod(shape) * dtype.itemsize


def contiguous_blocks(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The contiguous pieces of ``tensor`` in row-major order (``tensor`` itself when it is
    contiguous; the rows of each leading index otherwise, e.g. the groups of a QKV view)."""
    if tensor.is_contiguous():
        yield tensor
    else:
        for sub in tensor.unbind(0):
            yield from contiguous_blocks(sub)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of contiguous ``tensor``, writable, sharing its memory."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


@contextmanager
def opened(path: Path, where: str) -> Iterator[int]:
    """A read-only file descriptor of ``path``; ``where`` names what was being read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise ConversionError(f"{where}: {err.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def read_into(fd: int, tensor: torch.Tensor, offset: int, where: str) -> None:
    """Fill ``tensor`` (contiguous, or a view whose row-major order is the file's) with the bytes
    at ``offset`` of ``fd``; a file that ends first is an error naming ``where``."""
    for block in contiguous_blocks(tensor):
        view = byte_view(block)
        while len(view):
            read = os.preadv(fd, [view], offset)
            if read == 0:
                raise ConversionError(f"{where}: the file ends before the data does "
                                      "(truncated?)")
            view, offset = view[read:], offset + read
