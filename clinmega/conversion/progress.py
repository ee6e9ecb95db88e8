"""Progress bar (rich) over tensors/bytes and the end-of-run summary with peak memory."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import psutil
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn, TransferSpeedColumn)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Summary:
    """What a conversion did; ``str()`` is the line the CLI prints."""

    action: str
    output: str
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    rss: int = 0

    def __str__(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-9) / 1e6
        return (f"{self.action}: {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in "
                f"{self.seconds:.1f} s ({rate:.0f} MB/s), peak RSS {self.peak_rss / 2**30:.2f} "
                f"GiB -> {self.output}")


class Tracker:
    """Counts tensors and bytes, drives an optional rich progress bar."""

    def __init__(self, action: str, output: str, total_bytes: int, show: bool = True):
        self.summary = Summary(action, output)
        self._start = time.perf_counter()
        self._progress = None
        if show:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[tensor]}"), transient=False)
            self._task = self._progress.add_task(action, total=total_bytes, tensor="")
            self._progress.start()

    def advance(self, name: str, nbytes: int) -> None:
        self.summary.tensors += 1
        self.summary.bytes += nbytes
        if self._progress is not None:
            self._progress.update(self._task, advance=nbytes, tensor=name)

    def finish(self) -> Summary:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.summary.seconds = time.perf_counter() - self._start
        self.summary.peak_rss = peak_rss_bytes()
        self.summary.rss = psutil.Process().memory_info().rss
        return self.summary
