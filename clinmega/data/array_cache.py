"""A directory cache of named numpy arrays plus JSON metadata, for results that are costly to rebuild
and read by many later runs (the evaluation index of ``decontaminate``).

An entry is the folder ``<root>/<key>/`` holding one ``<name>.npy`` per array and ``meta.json``, written
last: a folder without it is never read. Entries are written under a temporary name and renamed into
place (``clinmega.utils.atomic``), so concurrent writers (shard jobs on a shared filesystem) race only to
publish identical contents, and a killed writer leaves scratch that no reader opens. Arrays are opened
memory-mapped and read-only: forked workers and other processes on the machine share their pages.

A damaged entry (a missing or truncated file, metadata that does not match the arrays) is reported by
``load`` as a reason, never raised: the caller rebuilds, and ``store`` replaces it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from clinmega.utils.atomic import publish_dir, staging_dir, write_json_atomic

META = "meta.json"


def content_key(*parts: Any, files: Iterable[str | os.PathLike[str]] = ()) -> str:
    """A hex key of ``parts`` (anything JSON can write) and the bytes of ``files``, in order."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in files:
        h.update(b"\0" + os.fspath(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:32]


def load(root: str | os.PathLike[str], key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | str:
    """(arrays, metadata) of the entry ``key``, arrays memory-mapped read-only; or why it cannot be used
    (``"absent"`` when there is none)."""
    folder = Path(root) / key
    meta_path = folder / META
    if not meta_path.is_file():
        return "absent"
    where = meta_path
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        arrays = {}
        for name, spec in meta["arrays"].items():
            where = folder / f"{name}.npy"
            a = np.load(where, mmap_mode="r", allow_pickle=False)
            if list(a.shape) != spec["shape"] or a.dtype.str != spec["dtype"]:
                return f"{where}: shape {list(a.shape)} {a.dtype.str}, the metadata says {spec}"
            arrays[name] = a
        return arrays, meta["meta"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{where}: {type(exc).__name__}: {exc}"


def store(root: str | os.PathLike[str], key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write the entry ``key`` (replacing a damaged or older one); returns its folder."""
    final = Path(root) / key
    with staging_dir(final) as tmp:
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(a), allow_pickle=False)
        spec = {name: {"shape": list(a.shape), "dtype": np.asarray(a).dtype.str} for name, a in arrays.items()}
        write_json_atomic(tmp / META, {"arrays": spec, "meta": meta})
        try:
            publish_dir(tmp, final, overwrite=True)
        except OSError:  # another writer published the same entry first
            if not (final / META).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return final
