"""Atomic output folders: write into ``.<out>.tmp-shared`` (:func:`clinmega.utils.atomic.shared_tmp_dir`,
the same name on every rank), rename to ``<out>`` when complete.

A killed run leaves at most that hidden folder (removed by the next run), never a folder that looks
like a finished checkpoint.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from clinmega.conversion.errors import ConversionError
from clinmega.utils.atomic import shared_tmp_dir

def staging_dir(out: str | Path) -> Path:
    return shared_tmp_dir(out)


def check_output(out: str | Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output unless ``overwrite``."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ConversionError(f"{out}: output exists and is not a folder")
    if not overwrite and any(out.iterdir()):
        raise ConversionError(f"{out}: output folder is not empty; pass --overwrite to replace it")


def prepare(out: str | Path) -> Path:
    """Create an empty staging folder (removing one left by an interrupted run)."""
    tmp = staging_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(out: str | Path) -> None:
    """Make the staging folder durable (files are written without per-file fsync, so the kernel
    writes back while conversion goes on), then replace ``out`` by it."""
    out = Path(out)
    tmp = staging_dir(out)
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            _fsync(path)
    _fsync(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    _fsync(out.parent)


def abort(out: str | Path) -> None:
    shutil.rmtree(staging_dir(out), ignore_errors=True)


@contextmanager
def staged(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Single-process form: yields the staging folder; commits on success, removes it on error."""
    check_output(out, overwrite)
    tmp = prepare(out)
    try:
        yield tmp
    except BaseException:
        abort(out)
        raise
    commit(out)
