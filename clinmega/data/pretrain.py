"""``prepare pretrain``: JSONL (plain/.gz/.zst/.xz) or Parquet text -> megatron-core indexed dataset (``.bin``/``.idx``).

Each document becomes one sequence ``[BOS] ids [EOD]`` (BOS optional, on by default because Mistral
models always see BOS at a document start; EOD is the tokenizer's EOS) in the smallest dtype that holds
the vocabulary (``DType.optimal_dtype``: uint16 for Mistral). Chunks of the inputs are tokenized in
parallel worker processes, each writing a shard with megatron-core's ``IndexedDatasetBuilder``; the
shards are concatenated in input order, so the output is identical for any number of workers.

Outputs, published only when complete: ``<prefix>.bin``, ``<prefix>.idx`` and, last, the completion
marker ``<prefix>.manifest.json`` (per-file counts, skip reasons with file:line examples, tokenizer
identity). A killed run leaves only ``.<name>.tmp-*`` scratch, which no reader looks at.

``shard="i/N"`` prepares only shard ``i`` of ``N`` (``readers.plan_chunks``) into
``<prefix>-0000i-of-0000N.*``; ``clinmega.data.merge.merge_pretrain_shards`` joins the shards into one
dataset byte-identical to a one-shot run. In a shard's manifest, a file that began in an earlier shard
counts lines from its ``range.start`` byte; the merged manifest gives absolute line numbers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clinmega.utils.atomic import staging_dir, write_json_atomic
from clinmega.data.config import PretrainPrepConfig
from clinmega.data.indexed import append_sequences, finish, merge_shards, new_builder
from clinmega.data.manifest import FileStats, build_manifest, merge_chunk_stats, report_damage
from clinmega.data.parallel import run_chunk_tasks
from clinmega.data.fastjson import iter_texts
from clinmega.data.readers import (
    Chunk,
    expand_inputs,
    file_ranges,
    parse_shard,
    plan_chunks,
    shard_suffix,
)
from clinmega.data.tokenizers import cached_tokenizer

log = logging.getLogger(__name__)


def output_paths(prefix: str | os.PathLike[str]) -> dict[str, Path]:
    """The three files a pretraining dataset consists of."""
    p = os.fspath(prefix)
    return {"bin": Path(p + ".bin"), "idx": Path(p + ".idx"), "manifest": Path(p + ".manifest.json")}


def is_complete(prefix: str | os.PathLike[str]) -> bool:
    """True when the dataset at ``prefix`` was fully written (its manifest, written last, exists)."""
    return all(p.exists() for p in output_paths(prefix).values())


@dataclass
class _ChunkTask:
    chunk: Chunk
    shard_prefix: str
    cfg: PretrainPrepConfig


def documents_to_sequences(
    flat: np.ndarray, offsets: np.ndarray, bos_id: int | None, eod_id: int, dtype: type[np.number]
) -> tuple[np.ndarray, np.ndarray]:
    """Insert ``bos_id`` (if not None) before and ``eod_id`` after each document of a flat batch.

    Returns (tokens in ``dtype``, per-document output lengths). Raises if an id does not fit ``dtype``.
    """
    lengths = np.diff(offsets)
    out_lengths = lengths + 1 + (bos_id is not None)
    ends = np.cumsum(out_lengths)
    if flat.size and int(flat.max()) > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(flat.max())} does not fit {np.dtype(dtype).name}")
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    is_content = np.ones(out.size, dtype=bool)
    is_content[ends - 1] = False
    if bos_id is not None:
        is_content[ends - out_lengths] = False
    out[is_content] = flat  # a boolean scatter: much faster than fancy indexing by position
    out[ends - 1] = eod_id
    if bos_id is not None:
        out[ends - out_lengths] = bos_id
    return out, out_lengths


def _tokenize_chunk(task: _ChunkTask) -> FileStats:
    """Worker: tokenize one chunk into the shard ``task.shard_prefix``."""
    cfg = task.cfg
    tok = cached_tokenizer(cfg.tokenizer, cfg.tokenizer_backend)
    dtype = tok.token_dtype()
    bos = tok.bos_id if cfg.add_bos else None
    if cfg.add_bos and bos is None:
        raise ValueError(f"tokenizer {cfg.tokenizer} has no BOS token; set add_bos false")
    stats = FileStats(task.chunk.path)
    builder = new_builder(task.shard_prefix, dtype)
    texts: list[str] = []
    lines: list[int] = []
    chars = 0

    def flush() -> None:
        flat, offsets = tok.encode_flat(texts)
        if cfg.max_tokens is not None:
            lengths = np.diff(offsets)
            keep = lengths <= cfg.max_tokens
            if not keep.all():
                for i in np.flatnonzero(~keep):
                    stats.skip(lines[i], "too_long", f"{int(lengths[i])} tokens > max_tokens {cfg.max_tokens}")
                flat = flat[np.repeat(keep, lengths)]
                offsets = np.concatenate([[0], np.cumsum(lengths[keep])])
        tokens, out_lengths = documents_to_sequences(flat, offsets, bos, tok.eod_id, dtype)
        append_sequences(builder, tokens, out_lengths)
        stats.documents_written += len(out_lengths)
        stats.tokens += int(tokens.size)
        texts.clear()
        lines.clear()

    for rec in iter_texts(task.chunk, cfg.text_field, stats.damaged):
        stats.documents_read += 1
        if rec.reason is not None:
            stats.skip(rec.line, rec.reason, rec.detail)
            continue
        texts.append(rec.value)
        lines.append(rec.line)
        chars += len(rec.value)
        if len(texts) >= cfg.batch_docs or chars >= (8 << 20):
            flush()
            chars = 0
    if texts:
        flush()
    finish(builder, task.shard_prefix)
    return stats


def prepare_pretrain(cfg: PretrainPrepConfig) -> dict[str, Any]:
    """Run ``prepare pretrain``; returns the manifest (also written to ``<prefix>.manifest.json``)."""
    if not cfg.output_prefix:
        raise ValueError("output_prefix is required")
    shard = parse_shard(cfg.shard)
    prefix = cfg.output_prefix + (shard_suffix(shard) if shard else "")
    outs = output_paths(prefix)
    if any(p.exists() for p in outs.values()) and not cfg.overwrite:
        raise FileExistsError(
            f"{prefix}: output exists ({', '.join(p.name for p in outs.values() if p.exists())}); "
            "use overwrite"
        )
    paths = expand_inputs(cfg.inputs)
    tok = cached_tokenizer(cfg.tokenizer, cfg.tokenizer_backend)  # load (and validate) before forking
    chunks = plan_chunks(paths, cfg.workers, cfg.chunk_mb, shard)
    t0 = time.perf_counter()
    with staging_dir(outs["bin"]) as tmp:
        tasks = [_ChunkTask(c, str(tmp / f"shard_{c.index:06d}"), cfg) for c in chunks]
        results = run_chunk_tasks(_tokenize_chunk, tasks, cfg.workers, "tokenize", cfg.progress)
        t_tok = time.perf_counter() - t0
        n_sequences = merge_shards([t.shard_prefix for t in tasks], tmp / "merged", tok.token_dtype())
        files, _ = merge_chunk_stats(paths, chunks, results)
        if shard is not None:  # only the files this shard read, each with the range it covered
            ranges = file_ranges(chunks)
            files = [f for f in files if f.path in ranges]
        elapsed = time.perf_counter() - t0
        manifest = build_manifest(
            "prepare-pretrain",
            cfg,
            files,
            tokenizer=tok.identity(),
            **({"shard": {"index": shard[0], "count": shard[1], "inputs": [str(p) for p in paths],
                          "ranges": ranges}} if shard else {}),
            output={
                "prefix": prefix,
                "dtype": np.dtype(tok.token_dtype()).name,
                "bos_written": cfg.add_bos,
                "eod_id": tok.eod_id,
                "sequences": n_sequences,
            },
            timing={"seconds": round(elapsed, 3), "tokenize_seconds": round(t_tok, 3)},
        )
        outs["manifest"].unlink(missing_ok=True)  # the old marker goes first: never a stale "complete"
        os.replace(tmp / "merged.bin", outs["bin"])
        os.replace(tmp / "merged.idx", outs["idx"])
        write_json_atomic(outs["manifest"], manifest)
    for f in files:
        for msg in f.messages()[:5]:
            log.warning("skipped %s", msg)
    report_damage(manifest, cfg.strict, log)
    return manifest
