"""One-ahead prefetching: while one tensor is written, the next is read and transformed."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Hashable, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Prefetcher(Generic[K, V]):
    """``get(item)`` returns ``fn(item)``; items are expected in ``order``, and the one after the
    item just asked for is computed on a background thread meanwhile (file reads and torch ops
    release the GIL). At most one result is in flight, so memory grows by one item. An item asked
    for out of order is computed in the calling thread."""

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
