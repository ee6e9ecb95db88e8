"""``prepare merge``: join the shards of a ``prepare pretrain --shard i/N`` run into one indexed dataset.

Shard ``i`` of ``N`` of prefix ``P`` is ``P-0000i-of-0000N.{bin,idx,manifest.json}``; the shards cover
contiguous parts of the inputs in input order (``readers.plan_chunks``), so concatenating them in shard
order with megatron-core's ``IndexedDatasetBuilder.add_index`` (as Megatron-LM's
``tools/merge_datasets.py`` does) gives the dataset a one-shot run writes, byte for byte.

Before writing anything the merge checks that all ``N`` shards are there and complete, that they were
made from the same inputs with the same options and tokenizer, and that the parts of any file split
between shards abut. The merged manifest has one entry per input file with absolute line numbers (a
shard counts the lines of a file that began in an earlier shard from its own start) and lists the
shards it was made from. Outputs are published like ``prepare pretrain``'s: manifest last.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from typing import Any

import numpy as np

from clinmega.utils.atomic import staging_dir, write_json_atomic
from clinmega.data.config import MergeConfig
from clinmega.data.manifest import FileStats, build_manifest
from clinmega.data.pretrain import is_complete, output_paths
from clinmega.data.readers import shard_suffix

# options that decide the content of a prepared dataset: shards must agree on them
_CONTENT_KEYS = ("tokenizer", "tokenizer_backend", "text_field", "add_bos", "max_tokens")


def find_shards(cfg: MergeConfig) -> list[str]:
    """Shard prefixes: ``cfg.inputs`` (prefixes or globs of prefixes), else ``<output_prefix>-*-of-*``."""
    patterns = cfg.inputs or [cfg.output_prefix + "-[0-9]*-of-[0-9]*"]
    found: list[str] = []
    for pat in patterns:
        if glob.has_magic(pat):
            matches = sorted(m.removesuffix(".manifest.json") for m in glob.glob(pat + ".manifest.json"))
        else:
            matches = [pat]
        if not matches:
            raise FileNotFoundError(f"no shard matches {pat!r} (looked for {pat}.manifest.json)")
        found += [m for m in matches if m not in found]
    return found


def _load_shards(prefixes: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(prefix, manifest) per shard in shard order, after the consistency checks of the module doc."""
    shards = []
    for p in prefixes:
        if not is_complete(p):
            missing = [x.name for x in output_paths(p).values() if not x.exists()]
            raise FileNotFoundError(f"{p}: shard is not complete (missing {', '.join(missing)})")
        manifest = json.loads(output_paths(p)["manifest"].read_text(encoding="utf-8"))
        if "shard" not in manifest:
            raise ValueError(f"{p}: not a shard (its manifest has no 'shard'; made without --shard)")
        shards.append((p, manifest))
    shards.sort(key=lambda s: s[1]["shard"]["index"])
    first = shards[0][1]
    count = first["shard"]["count"]
    indices = [m["shard"]["index"] for _, m in shards]
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        dup = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(
            f"shards of {count}: " + (f"missing {missing}" if missing else "") + (f" duplicated {dup}" if dup else "")
        )
    for p, m in shards[1:]:
        for what, mine, theirs in [
            ("shard count", m["shard"]["count"], count),
            ("inputs", m["shard"]["inputs"], first["shard"]["inputs"]),
            ("tokenizer sha256", m["tokenizer"].get("sha256"), first["tokenizer"].get("sha256")),
            ("dtype", m["output"]["dtype"], first["output"]["dtype"]),
            *[(f"config.{k}", m["config"].get(k), first["config"].get(k)) for k in _CONTENT_KEYS],
        ]:
            if mine != theirs:
                raise ValueError(f"{p}: {what} {mine!r} differs from shard 0's {theirs!r} ({shards[0][0]})")
    _check_ranges(shards)
    return shards


def _check_ranges(shards: list[tuple[str, dict[str, Any]]]) -> None:
    """A file split between shards must be covered by abutting parts (bytes or row groups)."""
    last_end: dict[str, Any] = {}
    for p, m in shards:
        for path, r in m["shard"]["ranges"].items():
            if path in last_end and r["unit"] != "file" and r["start"] != last_end[path]:
                raise ValueError(f"{p}: {path} continues at {r['unit']} {r['start']}, the previous shard ended at "
                                 f"{last_end[path]}")
            last_end[path] = r["end"]


def _file_stats(entry: dict[str, Any]) -> FileStats:
    names = {f.name for f in dataclasses.fields(FileStats)}
    return FileStats(**{k: v for k, v in entry.items() if k in names})


def merge_pretrain_shards(cfg: MergeConfig) -> dict[str, Any]:
    """Run ``prepare merge``; returns the merged manifest (also ``<output_prefix>.manifest.json``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if not cfg.output_prefix:
        raise ValueError("output_prefix is required")
    outs = output_paths(cfg.output_prefix)
    if any(p.exists() for p in outs.values()) and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output_prefix}: output exists; use overwrite")
    t0 = time.perf_counter()
    shards = _load_shards(find_shards(cfg))
    first = shards[0][1]
    dtype = np.dtype(first["output"]["dtype"]).type
    files: dict[str, FileStats] = {}
    lines: dict[str, int] = {}
    for _, m in shards:
        for entry in m["files"]:
            part = _file_stats(entry)
            if part.path not in files:
                files[part.path] = FileStats(part.path)
                lines[part.path] = 0
            files[part.path].merge(part, line_offset=lines[part.path])
            lines[part.path] += part.lines_spanned
    order = [p for p in first["shard"]["inputs"] if p in files]
    with staging_dir(outs["bin"]) as tmp:
        builder = IndexedDatasetBuilder(str(tmp / "merged.bin"), dtype=dtype)
        for prefix, _ in shards:
            builder.add_index(prefix)
        builder.finalize(str(tmp / "merged.idx"))
        sequences = len(builder.sequence_lengths)
        if sequences != sum(m["output"]["sequences"] for _, m in shards):
            raise AssertionError("merged sequence count differs from the shards' total")
        config = {**first["config"], "shard": None, "output_prefix": os.fspath(cfg.output_prefix)}
        manifest = build_manifest(
            "prepare-pretrain",
            config,
            [files[p] for p in order],
            tokenizer=first["tokenizer"],
            merged_from=[{"prefix": p, "shard": m["shard"]["index"], "host": m.get("host"),
                          "sequences": m["output"]["sequences"]} for p, m in shards],
            output={**first["output"], "prefix": os.fspath(cfg.output_prefix), "sequences": sequences},
            timing={"seconds": round(time.perf_counter() - t0, 3),
                    "shard_seconds": [m["timing"]["seconds"] for _, m in shards]},
        )
        outs["manifest"].unlink(missing_ok=True)
        os.replace(tmp / "merged.bin", outs["bin"])
        os.replace(tmp / "merged.idx", outs["idx"])
        write_json_atomic(outs["manifest"], manifest)
    return manifest


def shard_prefix(prefix: str, index: int, count: int) -> str:
    """The output prefix ``prepare pretrain --shard index/count`` writes for ``prefix``."""
    return prefix + shard_suffix((index, count))

