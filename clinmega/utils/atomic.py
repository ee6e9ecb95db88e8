"""Atomic outputs, for every stage: everything is written under a temporary name and renamed into place.

One temp-name convention: ``.<final name>.tmp-<tag>`` next to the final path (same filesystem, so the
rename is atomic; hidden, so no ``iter_*``/``*.bin`` glob and no reader mistakes it for a result).
The tag is random for a single writer (:func:`tmp_sibling`, :func:`staging_dir`) and ``shared`` for a
folder that several ranks write together and must name alike (:func:`shared_tmp_dir`: conversion
outputs, training checkpoints). A killed job leaves the previous complete output or such a leftover.
For multi-file outputs (a ``.bin``/``.idx`` pair, an SFT directory) the manifest is published last
and is the completion marker.
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


def tmp_name(final: Path, tag: str) -> Path:
    """``.<final name>.tmp-<tag>`` next to ``final``: the one temporary-name convention."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{tag}")


def shared_tmp_dir(final: str | os.PathLike[str]) -> Path:
    """The staging folder of ``final`` that every rank of a job computes alike (not created here)."""
    return tmp_name(Path(final), "shared")


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
        old = tmp_name(final, f"old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
