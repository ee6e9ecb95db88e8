"""``decontaminate``: find (and optionally remove) training documents that share word n-grams with
evaluation sets (MedQA / MedMCQA / PubMedQA / MMLU-style JSONL).

Text is normalised (Unicode NFKC, lower case, words = runs of ``\\w``); every word gets a 64-bit
blake2b hash and every n-gram (default 13 words) a 64-bit polynomial hash of its words, computed
vectorised with numpy. The evaluation side becomes one sorted ``uint64`` array (a few MB even for all
of MedQA+MedMCQA+PubMedQA+MMLU), shared by forked worker processes; training files are streamed in
byte-range chunks, so memory does not grow with the corpus. A document is flagged when it contains at
least ``min_matches`` distinct evaluation n-grams.

The training field (``text_field``) may be a string or, as for chat data (``messages``), a list/dict
whose strings are each checked (no n-gram spans two strings). Evaluation records contribute the text
of the fields named in ``eval_fields`` (matched case-insensitively; strings, lists and dicts of strings
such as MedQA's ``options`` are walked), each string hashed separately so no n-gram spans two fields. Items with no field of ``ngram`` words or more
cannot be checked and are counted as such.

``mode="remove"`` writes each training file minus flagged lines (kept lines byte-identical, other lines
included — unparseable lines are passed through and counted, never dropped silently) to
``output_dir``; ``mode="report"`` only reports. Always written: ``output_dir/decontam_manifest.json``
and ``output_dir/flagged.jsonl`` (file, line, matched n-gram count, evaluation sets and items hit).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from clinmega.utils.atomic import staging_dir, write_json_atomic
from clinmega.data.config import DecontamConfig
from clinmega.data.manifest import FileStats, build_manifest, merge_chunk_stats
from clinmega.data.parallel import run_chunk_tasks
from clinmega.data.readers import (
    Chunk,
    expand_inputs,
    get_field,
    iter_lines,
    parse_line,
    plan_chunks,
)

_WORD = re.compile(r"\w+")
_PRIME = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so the polynomial hash is well spread mod 2**64


def normalize_words(text: str) -> list[str]:
    """NFKC + lower case, split into ``\\w+`` words."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


_WORD_CACHE: dict[str, int] = {}


def word_hashes(words: list[str]) -> np.ndarray:
    """64-bit blake2b hash of each word (cached per process; the cache is reset past 4M entries)."""
    cache = _WORD_CACHE
    missing = [w for w in set(words) if w not in cache]
    if len(cache) + len(missing) > 4_000_000:
        cache.clear()
        missing = list(set(words))
    for w in missing:
        cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
    return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of every ``n``-word window of the normalised ``text`` (empty if fewer words)."""
    words = normalize_words(text)
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    w = word_hashes(words)
    m = len(words) - n + 1
    acc = w[:m].copy()
    with np.errstate(over="ignore"):
        for j in range(1, n):
            acc *= _PRIME
            acc += w[j : j + m]
    return acc


def _field_texts(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _field_texts(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _field_texts(v)


def eval_item_texts(record: dict[str, Any], fields: Iterable[str]) -> list[str]:
    """Strings of ``record`` under ``fields`` (case-insensitive keys)."""
    wanted = {f.lower() for f in fields}
    return [t for k, v in record.items() if k.lower() in wanted for t in _field_texts(v)]


@dataclass
class EvalIndex:
    """Sorted unique n-gram hashes of all evaluation sets, each with the first (set, item) owning it."""

    keys: np.ndarray  # uint64, sorted
    owner_set: np.ndarray  # int32 index into names
    owner_item: np.ndarray  # int64 line number in that set's file
    names: list[str]
    stats: dict[str, dict[str, Any]]

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Positions in ``keys`` of the distinct ``hashes`` that occur in the evaluation sets."""
        if not len(self.keys) or not len(hashes):
            return np.zeros(0, dtype=np.int64)
        h = np.unique(hashes)
        pos = np.minimum(np.searchsorted(self.keys, h), len(self.keys) - 1)
        return pos[self.keys[pos] == h]


def _benchmark_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(position, record) of an evaluation file; ``None`` records are unreadable lines.

    JSONL is read line by line with the configured ``eval_fields``; the other layouts the
    evaluation loaders accept (PubMedQA's PMID-keyed JSON, MMLU's headerless CSV) are read by
    :func:`clinmega.evaluation.benchmarks.load_file` and indexed by question, options and context.
    """
    if path.suffix.lower() in (".json", ".csv"):
        from clinmega.evaluation.benchmarks import load_file

        for position, item in enumerate(load_file(path), start=1):
            yield position, {"question": item.question, "options": list(item.options),
                             "context": item.context or ""}
        return
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            obj, reason, _ = parse_line(raw)
            if reason == "blank_line":
                continue
            yield line_no, obj if reason is None and isinstance(obj, dict) else None


def build_eval_index(paths: list[Path], fields: list[str], n: int) -> EvalIndex:
    """Read every evaluation file and index its n-grams (see module doc)."""
    all_keys, sets, items = [], [], []
    names: list[str] = []
    stats: dict[str, dict[str, Any]] = {}
    for si, path in enumerate(paths):
        name = path.name
        names.append(name)
        st = {"path": str(path), "items": 0, "items_too_short": 0, "ngrams": 0, "unreadable_lines": 0}
        for line_no, obj in _benchmark_records(path):
            if obj is None:
                st["unreadable_lines"] += 1
                continue
            st["items"] += 1
            hashes = [ngram_hashes(t, n) for t in eval_item_texts(obj, fields)]
            h = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
            if not len(h):
                st["items_too_short"] += 1
                continue
            st["ngrams"] += len(h)
            all_keys.append(h)
            sets.append(np.full(len(h), si, dtype=np.int32))
            items.append(np.full(len(h), line_no, dtype=np.int64))
        if st["unreadable_lines"]:
            raise ValueError(f"{path}: {st['unreadable_lines']} evaluation line(s) are not JSON objects")
        stats[name] = st
    if not all_keys:
        return EvalIndex(np.zeros(0, np.uint64), np.zeros(0, np.int32), np.zeros(0, np.int64), names, stats)
    keys = np.concatenate(all_keys)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    first = np.concatenate([[True], keys[1:] != keys[:-1]])
    return EvalIndex(keys[first], np.concatenate(sets)[order][first], np.concatenate(items)[order][first], names, stats)


@dataclass
class _Task:
    chunk: Chunk
    part: str | None  # where kept lines go (None in report mode)
    cfg: DecontamConfig


_INDEXES: dict[tuple, EvalIndex] = {}  # built once per process; forked workers inherit the parent's


def eval_index_for(cfg: DecontamConfig) -> EvalIndex:
    """The evaluation index for ``cfg``, cached per process (keyed by the eval files with their size and
    mtime, the fields and n)."""
    paths = expand_inputs(cfg.eval_sets)
    files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    key = (files, tuple(cfg.eval_fields), cfg.ngram)
    if key not in _INDEXES:
        _INDEXES.clear()  # one index at a time: they can be large
        _INDEXES[key] = build_eval_index(paths, cfg.eval_fields, cfg.ngram)
    return _INDEXES[key]


def _scan_chunk(task: _Task) -> tuple[FileStats, dict[str, int], list[dict[str, Any]]]:
    """Worker: (stats, unchecked-line counts by reason, flagged documents with chunk-relative lines)."""
    cfg = task.cfg
    index = eval_index_for(cfg)
    stats = FileStats(task.chunk.path)
    unchecked: dict[str, int] = {}
    flagged: list[dict[str, Any]] = []
    with open(task.part, "wb") if task.part else contextlib.nullcontext() as out:
        for line_no, raw in enumerate(iter_lines(task.chunk), start=1):
            stats.documents_read += 1
            obj, reason, _ = parse_line(raw)
            value = get_field(obj, cfg.text_field) if reason is None else None
            texts = list(_field_texts(value))
            if not texts:
                reason = reason or ("missing_field" if value is None else "wrong_type")
                unchecked[reason] = unchecked.get(reason, 0) + 1
            else:
                hits = index.lookup(np.concatenate([ngram_hashes(t, cfg.ngram) for t in texts]))
                if len(hits) >= cfg.min_matches:
                    sets = sorted({index.names[s] for s in index.owner_set[hits].tolist()})
                    flagged.append(
                        {
                            "line": line_no,
                            "matched_ngrams": int(len(hits)),
                            "eval_sets": sets,
                            "eval_items": sorted(
                                {
                                    (index.names[s], int(i))
                                    for s, i in zip(index.owner_set[hits], index.owner_item[hits])
                                }
                            )[:5],
                        }
                    )
                    if cfg.mode == "remove":
                        stats.skip(line_no, "contaminated", f"{len(hits)} n-grams shared with {', '.join(sets)}")
                        continue
            stats.documents_written += 1
            if out is not None:
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")
    return stats, unchecked, flagged


def decontaminate(cfg: DecontamConfig) -> dict[str, Any]:
    """Run ``decontaminate``; returns the manifest (also ``<output_dir>/decontam_manifest.json``)."""
    if cfg.mode not in ("remove", "report"):
        raise ValueError(f"mode must be 'remove' or 'report', got {cfg.mode!r}")
    if not cfg.output_dir:
        raise ValueError("output_dir is required")
    if cfg.ngram < 1 or cfg.min_matches < 1:
        raise ValueError("ngram and min_matches must be >= 1")
    out_dir = Path(cfg.output_dir)
    manifest_path = out_dir / "decontam_manifest.json"
    if manifest_path.exists() and not cfg.overwrite:
        raise FileExistsError(f"{manifest_path} exists; use overwrite")
    paths = expand_inputs(cfg.inputs)
    for p in paths:
        if not p.name.lower().endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")):
            raise ValueError(f"{p}: decontaminate reads JSONL training files only")
    t0 = time.perf_counter()
    index = eval_index_for(cfg)  # built before forking, so workers share it copy-on-write
    chunks = plan_chunks(paths, cfg.workers, cfg.chunk_mb)
    out_dir.mkdir(parents=True, exist_ok=True)
    with staging_dir(manifest_path) as tmp:
        tasks = [_Task(c, str(tmp / f"part_{c.index:06d}") if cfg.mode == "remove" else None, cfg) for c in chunks]
        results = run_chunk_tasks(_scan_chunk, tasks, cfg.workers, "decontaminate", cfg.progress)
        files, offsets = merge_chunk_stats(paths, chunks, [r[0] for r in results])
        unchecked: list[dict[str, int]] = [{} for _ in paths]
        flagged_lines: list[str] = []
        for chunk, offset, (_, unch, flagged) in zip(chunks, offsets, results):
            for k, v in unch.items():
                unchecked[chunk.file_index][k] = unchecked[chunk.file_index].get(k, 0) + v
            flagged_lines += [json.dumps({"file": chunk.path, **f, "line": f["line"] + offset}) for f in flagged]
        manifest_path.unlink(missing_ok=True)  # the completion marker goes first, comes back last
        outputs = _write_outputs(tasks, chunks, paths, out_dir, tmp) if cfg.mode == "remove" else []
        per_set = {name: dict(st, documents_flagged=0) for name, st in index.stats.items()}
        for line in flagged_lines:
            for s in json.loads(line)["eval_sets"]:
                per_set[s]["documents_flagged"] += 1
        manifest = build_manifest(
            "decontaminate",
            cfg,
            files,
            eval_sets=per_set,
            eval_ngrams_unique=int(len(index.keys)),
            documents_flagged=len(flagged_lines),
            unchecked_lines_passed_through=unchecked,
            outputs=outputs,
            timing={"seconds": round(time.perf_counter() - t0, 3)},
        )
        flagged_tmp = tmp / "flagged.jsonl"
        flagged_tmp.write_text("".join(x + "\n" for x in flagged_lines), encoding="utf-8")
        os.replace(flagged_tmp, out_dir / "flagged.jsonl")
        write_json_atomic(manifest_path, manifest)
    return manifest


def _write_outputs(tasks: list[_Task], chunks: list[Chunk], paths: list[Path], out_dir: Path, tmp: Path) -> list[str]:
    """Concatenate each file's kept parts (gzip again for .gz inputs) and move them into ``out_dir``."""
    import gzip

    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"training inputs share file names; cannot write them side by side in {out_dir}")
    finals = []
    for fi, path in enumerate(paths):
        staged = tmp / f"final_{fi}"
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(staged, "wb") as dst:
            for task, chunk in zip(tasks, chunks):
                if chunk.file_index == fi and task.part:
                    with open(task.part, "rb") as src:
                        shutil.copyfileobj(src, dst, 16 << 20)
                    os.unlink(task.part)
        final = out_dir / path.name
        if final.resolve() == path.resolve():
            raise ValueError(f"{final}: output would overwrite its input")
        os.replace(staged, final)
        finals.append(str(final))
    return finals
