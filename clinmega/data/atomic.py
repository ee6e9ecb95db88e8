"""Atomic outputs: everything is written under a temporary name and renamed into place.

A killed job therefore leaves either the previous complete output or a ``.tmp-*`` leftover that no
reader mistakes for a result. For multi-file outputs (a ``.bin``/``.idx`` pair, an SFT directory) the
manifest is published last and is the completion marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tmp_sibling(path: Path, suffix: str = "") -> Path:
    """A unique temporary name in the same directory as ``path`` (same filesystem, so rename is atomic),
    with ordinary file permissions (mkstemp's are 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(name)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file + fsync + rename."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary directory next to ``final`` that is removed on exit, whatever happens.

    Callers move finished files out of it with ``os.replace``; anything left is scratch.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename the finished directory ``tmp`` to ``final`` (replacing an old one only if ``overwrite``)."""
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} exists; pass overwrite to replace it")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
