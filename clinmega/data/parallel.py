"""Run independent tasks in worker processes with a rich progress bar; results come back in task order.

Workers are forked (on Linux) so large read-only state loaded before the call — a tokenizer, an
n-gram table — is shared copy-on-write instead of pickled. ``workers <= 1`` runs everything in the
calling process, which is also what tests and debuggers want.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _NoProgress:
    """What ``_progress`` returns when the bar is off: rich is not even imported (start-up time)."""

    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, task_id: object, amount: float) -> None:
        return None


def _progress(description: str, total: float, enabled: bool):
    if not enabled:
        return _NoProgress(), None
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
    return progress, progress.add_task(description, total=total)


def run_parallel(
    fn: Callable[[T], R],
    tasks: Sequence[T],
    workers: int,
    *,
    description: str,
    weights: Sequence[float] | None = None,
    progress: bool = True,
) -> list[R]:
    """``[fn(t) for t in tasks]`` on ``workers`` processes, showing progress weighted by ``weights``.

    At most ``2 * workers`` tasks are in flight, so memory stays bounded however many tasks there are.
    An exception in a task cancels the rest and is re-raised here.
    """
    weights = list(weights) if weights is not None else [1.0] * len(tasks)
    bar, task_id = _progress(description, float(sum(weights)) or 1.0, progress)
    results: list[R | None] = [None] * len(tasks)
    with bar:
        if workers <= 1 or len(tasks) <= 1:
            for i, t in enumerate(tasks):
                results[i] = fn(t)
                bar.advance(task_id, weights[i])
            return results  # type: ignore[return-value]
        # HF tokenizers' Rust thread pool must not be used across fork; our processes are the parallelism.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            pending: dict[Future, int] = {}
            next_task = 0
            try:
                while next_task < len(tasks) or pending:
                    while next_task < len(tasks) and len(pending) < 2 * workers:
                        pending[pool.submit(fn, tasks[next_task])] = next_task
                        next_task += 1
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        i = pending.pop(fut)
                        results[i] = fut.result()
                        bar.advance(task_id, weights[i])
            except BaseException:
                for fut in pending:
                    fut.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return results  # type: ignore[return-value]


def run_chunk_tasks(
    fn: Callable[[T], R], tasks: Sequence[T], workers: int, description: str, progress: bool
) -> list[R]:
    """``run_parallel`` over tasks that each carry a ``chunk`` (readers.Chunk); progress is in input bytes."""
    weights = [t.chunk.size for t in tasks]  # type: ignore[attr-defined]
    return run_parallel(fn, tasks, workers, description=description, weights=weights, progress=progress)
