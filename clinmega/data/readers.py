"""Record iteration over JSONL, JSONL.gz and Parquet inputs, split into chunks for parallel workers.

Inputs are given as paths or glob patterns (``expand_inputs``). ``plan_chunks`` cuts plain JSONL files
into byte ranges (a line belongs to the chunk in which it starts), Parquet files into row-group ranges
and keeps each ``.gz`` file whole (gzip cannot seek). ``iter_records`` yields one ``Record`` per line or
row with a 1-based line number *relative to its chunk*; ``FileStats.merge`` with the line counts of the
preceding chunks turns those into absolute line numbers.

Every line is accounted for: a record either carries the field's value or a skip reason
(``blank_line``, ``non_utf8``, ``malformed_json``, ``not_an_object``, ``missing_field``, ``wrong_type``).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class Chunk:
    """A unit of work: ``[start, end)`` bytes of a JSONL file, row groups of a Parquet file, or a whole
    ``.gz`` file (``end == -1``). ``file_index`` orders files, ``index`` orders chunks globally."""

    path: str
    fmt: str  # "jsonl" | "jsonl.gz" | "parquet"
    start: int
    end: int
    file_index: int
    index: int
    size: int  # bytes, for progress reporting


class Record(NamedTuple):
    """One line/row: ``value`` is the field's value when ``reason`` is None."""

    line: int
    value: Any
    reason: str | None
    detail: str


def expand_inputs(patterns: str | Sequence[str]) -> list[Path]:
    """Paths matched by ``patterns`` (globs allowed, ``**`` recursive), in order, without duplicates.

    Raises FileNotFoundError naming each pattern that matches nothing.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[Path] = []
    seen: set[Path] = set()
    for pat in patterns:
        pat = os.fspath(pat)
        matches = sorted(glob.glob(os.path.expanduser(pat), recursive=True)) if glob.has_magic(pat) else [pat]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"input {pat!r} matches no file")
        for m in matches:
            p = Path(m).resolve()
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def detect_format(path: str | os.PathLike[str]) -> str:
    """``jsonl``, ``jsonl.gz`` or ``parquet`` from the file name."""
    name = os.fspath(path).lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".gz"):
        if name[:-3].endswith(JSONL_SUFFIXES):
            return "jsonl.gz"
    elif name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise ValueError(f"{path}: unsupported input format (expected .jsonl/.json/.ndjson[.gz] or .parquet)")


def plan_chunks(paths: Sequence[Path], workers: int, max_chunk_mb: float = 64.0) -> list[Chunk]:
    """Split inputs into chunks (see module doc) of about a quarter of the input per worker, at least
    1 MiB and at most ``max_chunk_mb`` MiB, so all workers stay busy and memory per task is bounded."""
    total = sum(os.path.getsize(p) for p in paths)
    chunk_bytes = max(1, int(min(max_chunk_mb * (1 << 20), max(1 << 20, total // max(4 * workers, 1)))))
    chunks: list[Chunk] = []
    for fi, path in enumerate(paths):
        fmt = detect_format(path)
        size = os.path.getsize(path)
        if fmt == "jsonl":
            bounds = list(range(0, size, max(chunk_bytes, 1))) + [size]
            for a, b in zip(bounds[:-1], bounds[1:]):
                chunks.append(Chunk(str(path), fmt, a, b, fi, len(chunks), b - a))
            if size == 0:
                chunks.append(Chunk(str(path), fmt, 0, 0, fi, len(chunks), 0))
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            n_groups = pq.ParquetFile(path).metadata.num_row_groups
            per = max(1, int(n_groups * chunk_bytes / max(size, 1)))
            starts = list(range(0, n_groups, per)) or [0]
            for a in starts:
                b = min(a + per, n_groups)
                chunks.append(Chunk(str(path), fmt, a, b, fi, len(chunks), size * (b - a) // max(n_groups, 1)))
        else:
            chunks.append(Chunk(str(path), fmt, 0, -1, fi, len(chunks), size))
    return chunks


def get_field(obj: Any, key: str) -> Any:
    """``obj[key]`` where ``key`` may be dotted (``meta.text``); None when absent."""
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def iter_lines(chunk: Chunk) -> Iterator[bytes]:
    """Raw lines (with their newline) of a JSONL/JSONL.gz chunk."""
    if chunk.fmt == "jsonl.gz":
        with gzip.open(chunk.path, "rb") as f:
            yield from f
        return
    with open(chunk.path, "rb") as f:
        pos = chunk.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":  # started mid-line: that line belongs to the previous chunk
                pos += len(f.readline())
        while pos < chunk.end:
            line = f.readline()
            if not line:
                return
            pos += len(line)
            yield line


def parse_line(raw: bytes) -> tuple[Any, str | None, str]:
    """(object, reason, detail) for one raw JSONL line; reason is None when it parsed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, "non_utf8", f"byte {exc.start}: {exc.reason}"
    if not text or text.isspace():  # isspace: no copy of a long line, unlike strip
        return None, "blank_line", ""
    try:
        return json.loads(text), None, ""
    except json.JSONDecodeError as exc:
        return None, "malformed_json", f"column {exc.colno}: {exc.msg}"


def iter_objects(chunk: Chunk, columns: Sequence[str] | None = None) -> Iterator[Record]:
    """Every line/row of ``chunk`` as a parsed object (``value``) or a skip reason.

    ``columns`` restricts the Parquet columns read (top-level names); JSONL always yields whole objects.
    """
    if chunk.fmt == "parquet":
        yield from _parquet_rows(chunk, columns)
        return
    for line_no, raw in enumerate(iter_lines(chunk), start=1):
        yield object_record(line_no, raw)


def object_record(line_no: int, raw: bytes) -> Record:
    """One raw JSONL line as a parsed object (``value``) or a parse skip reason."""
    obj, reason, detail = parse_line(raw)
    if reason is None and not isinstance(obj, dict):
        obj, reason, detail = None, "not_an_object", f"got {type(obj).__name__}"
    return Record(line_no, obj, reason, detail)


def _parquet_rows(chunk: Chunk, columns: Sequence[str] | None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(chunk.path)
    names = set(pf.schema_arrow.names)
    cols = [c for c in (columns or []) if c in names] or None
    line = 0
    for batch in pf.iter_batches(row_groups=range(chunk.start, chunk.end), columns=cols, batch_size=8192):
        for row in batch.to_pylist():
            line += 1
            yield Record(line, row, None, "")


def iter_records(chunk: Chunk, field: str) -> Iterator[Record]:
    """Every line/row of ``chunk`` with ``value`` = the string at ``field`` (dotted keys allowed), or a
    skip reason: the parse reasons of ``iter_objects`` plus those of :func:`text_record`."""
    for rec in iter_objects(chunk, [field.split(".")[0]]):
        yield rec if rec.reason is not None else text_record(rec.line, rec.value, field)


def text_record(line: int, obj: Any, field: str) -> Record:
    """The record of a parsed object: ``value`` = the string at ``field``, or the skip reason
    ``missing_field``, ``wrong_type``, ``empty`` or ``non_utf8`` (text holding lone surrogates, which no
    tokenizer can encode)."""
    value = get_field(obj, field)
    if value is None:
        return Record(line, None, "missing_field", f"no {field!r}")
    if not isinstance(value, str):
        return Record(line, None, "wrong_type", f"{field!r} is {type(value).__name__}, expected string")
    if not value or value.isspace():
        return Record(line, None, "empty", f"{field!r} is blank")
    try:
        if not value.isascii():  # lone surrogates (from JSON escapes) cannot be encoded
            value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return Record(line, None, "non_utf8", f"{field!r} char {exc.start}: {exc.reason}")
    return Record(line, value, None, "")
