"""One-ahead prefetching: while one tensor is written, the next is read and transformed; and
the buffers that let streaming reuse memory instead of allocating per tensor."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Hashable, Iterable, Sequence, TypeVar

import torch

from clinmega.conversion.rawio import nbytes

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Prefetcher(Generic[K, V]):
    """``get(item)`` returns ``fn(item)``; items are expected in ``order``, and the one after the
    item just asked for is computed on a background thread meanwhile (file reads and torch ops
    release the GIL). At most one result is in flight, so memory grows by one item. An item asked
    for out of order is computed in the calling thread, after the one in flight has finished."""

    def __init__(self, fn: Callable[[K], V], order: Sequence[K]):
        self._fn = fn
        self._following = dict(zip(order, order[1:]))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="clinmega-prefetch")
        self._ahead: tuple[K, Future] | None = None

    def get(self, item: K) -> V:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == item:
            result = ahead[1].result()
        else:
            if ahead is not None:  # not wanted now, but let it finish: it may share memory
                ahead[1].exception()
            result = self._fn(item)
        del ahead
        following = self._following.get(item)
        if following is not None:
            self._ahead = (following, self._pool.submit(self._fn, following))
        return result

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetcher[K, V]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ReusedBuffers:
    """``count`` byte buffers, each large enough for the largest of ``tensors`` (shape, dtype),
    used in turn (``turn % count``).

    Streaming conversion handles one tensor after another; reading each into fresh memory costs
    a page fault per 4 KiB on first touch, which on virtual machines takes as long as the disk
    read itself. Buffers allocated once and reused avoid that. The caller guarantees that a
    buffer's previous tensor is no longer used when its turn comes again (with a one-ahead
    ``Prefetcher``: two buffers, turn = position in the order).
    """

    def __init__(self, count: int, tensors: Iterable[tuple[Sequence[int], torch.dtype]]):
        size = max((nbytes(shape, dtype) for shape, dtype in tensors), default=0)
        self._buffers = [torch.empty(size, dtype=torch.uint8) for _ in range(count)]

    def tensor(self, turn: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised ``shape``/``dtype`` tensor in buffer ``turn % count``."""
        buffer = self._buffers[turn % len(self._buffers)]
        size = nbytes(shape, dtype)
        if size > buffer.numel():
            raise ValueError(f"{tuple(shape)} {dtype} needs {size} bytes, buffers hold "
                             f"{buffer.numel()}")
        return exact_storage(buffer[:size].view(dtype).view(tuple(shape)))


def exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous ``tensor`` as a tensor whose storage is exactly its own bytes, sharing memory.

    torch's checkpoint writer clones (allocates and copies) a tensor that views a larger storage
    before saving it, so that only its bytes are saved; a tensor of a reused buffer, or a chunk
    of a unit, passed through this is saved as is.
    """
    if not tensor.is_contiguous():
        raise ValueError("exact_storage needs a contiguous tensor")
    start = tensor.storage_offset() * tensor.element_size()
    storage = tensor.untyped_storage()[start:start + tensor.nbytes]
    return torch.empty(0, dtype=tensor.dtype).set_(storage, 0, tensor.shape)
