"""Record iteration over JSONL (plain, ``.gz``, ``.zst``, ``.xz``) and Parquet inputs, split into chunks
for parallel workers.

Inputs are given as paths or glob patterns (``expand_inputs``). ``plan_chunks`` cuts plain JSONL files
into byte ranges (a line belongs to the chunk in which it starts), Parquet files into row-group ranges
and keeps each compressed file whole (a compressed stream cannot seek). With ``shard=(i, n)`` it plans
only shard ``i`` of ``n``: the inputs, laid end to end, are cut into ``n`` contiguous byte ranges and a
shard takes the plain-JSONL bytes, the compressed files and the Parquet row groups that start in its
range, so the shards in order are exactly the one-shot input order. ``iter_records`` yields one
``Record`` per line or row with a 1-based line number *relative to its chunk*; ``FileStats.merge`` with
the line counts of the preceding chunks turns those into absolute line numbers.

Every line is accounted for: a record either carries the field's value or a skip reason
(``blank_line``, ``non_utf8``, ``malformed_json``, ``not_an_object``, ``missing_field``, ``wrong_type``).
A UTF-8 byte-order mark at the start of a file is not part of its first line.

Damaged inputs: a compressed stream that is truncated or corrupt, or a Parquet file whose footer or a
row group cannot be decoded, does not raise. The readers yield every line decoded before the break
(a last line whose newline never arrived is not trusted) and, when given a ``damage`` list, append one
entry ``{"line", "kind", "reason", ...}`` per break (``line``: the first line, chunk-relative, that was
not read); without a ``damage`` list they raise ``DamagedInputError``. A damaged Parquet row group is
skipped (its row count comes from the footer, ``rows_lost``) and the next row groups are read. gzip
checks its CRC only at the end of a member, so after corruption *inside* a gzip member the lines decoded
before the decoder noticed cannot be verified; a truncated file (the common case: an interrupted copy)
loses nothing but its last partial line.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NamedTuple, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
# compressed JSONL: file-name suffix -> format name used in Chunk.fmt
COMPRESSED_SUFFIXES = {".gz": "jsonl.gz", ".zst": "jsonl.zst", ".zstd": "jsonl.zst", ".xz": "jsonl.xz"}
INPUT_SUFFIXES = tuple(j + c for j in JSONL_SUFFIXES for c in ("", *COMPRESSED_SUFFIXES)) + (".parquet",)
UTF8_BOM = b"\xef\xbb\xbf"
_READ_BLOCK = 1 << 17  # compressed bytes per decoder call (output per call: its decompression ratio times this)
_LINE_BUFFER = 1 << 20  # read buffer of plain JSONL: the default 8 KiB makes readline 7x slower on long lines
_SALVAGE_PIECE = 1  # compressed bytes per decoder call when recovering the bytes before a corruption (<= 128K calls)


class DamagedInputError(ValueError):
    """A damaged input read without a ``damage`` list to record it in."""


@dataclass(frozen=True)
class Chunk:
    """A unit of work: ``[start, end)`` bytes of a JSONL file, row groups of a Parquet file, or a whole
    compressed file (``end == -1``). ``file_index`` orders files, ``index`` orders chunks globally."""

    path: str
    fmt: str  # "jsonl" | "jsonl.gz" | "jsonl.zst" | "jsonl.xz" | "parquet"
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
    """``jsonl``, ``jsonl.gz``, ``jsonl.zst``, ``jsonl.xz`` or ``parquet`` from the file name."""
    name = os.fspath(path).lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    base, ext = os.path.splitext(name)
    if ext in COMPRESSED_SUFFIXES and base.endswith(JSONL_SUFFIXES):
        return COMPRESSED_SUFFIXES[ext]
    raise ValueError(
        f"{path}: unsupported input format (expected .jsonl/.json/.ndjson, optionally .gz/.zst/.xz, or .parquet)"
    )


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"i/N"`` (0 <= i < N) -> ``(i, N)``; None stays None. Raises ValueError naming the problem."""
    if spec is None or spec == "":
        return None
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise ValueError(f"shard: expected 'i/N' (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard: {spec!r} needs 0 <= i < N")
    return i, n


def shard_suffix(shard: tuple[int, int]) -> str:
    """The name part of shard ``(i, N)``: ``-00001-of-00004`` (sorts in shard order)."""
    return f"-{shard[0]:05d}-of-{shard[1]:05d}"


def plan_chunks(
    paths: Sequence[Path], workers: int, max_chunk_mb: float = 64.0, shard: tuple[int, int] | None = None
) -> list[Chunk]:
    """Split inputs into chunks (see module doc) of about a quarter of the input per worker, at least
    1 MiB and at most ``max_chunk_mb`` MiB, so all workers stay busy and memory per task is bounded.
    With ``shard=(i, n)``, only the chunks of shard ``i`` (module doc); ``Chunk.index`` counts within it."""
    sizes = [os.path.getsize(p) for p in paths]
    total = sum(sizes)
    lo, hi = (0, total) if shard is None else (total * shard[0] // shard[1], total * (shard[0] + 1) // shard[1])
    last_shard = shard is None or shard[0] == shard[1] - 1

    def mine(pos: int) -> bool:  # does the unit starting at global byte ``pos`` belong to this shard?
        return lo <= pos < hi or (last_shard and pos == hi)

    share = hi - lo
    workers = max(workers, 1)
    chunk_bytes = max(1, int(min(max_chunk_mb * (1 << 20), max(1 << 20, share // (4 * workers)))))
    chunks: list[Chunk] = []
    base = 0
    for fi, (path, size) in enumerate(zip(paths, sizes)):
        fmt = detect_format(path)
        if fmt == "jsonl":
            a, b = max(lo - base, 0), min(hi - base, size)
            if size == 0 and mine(base):
                chunks.append(Chunk(str(path), fmt, 0, 0, fi, len(chunks), 0))
            elif a < b:
                bounds = list(range(a, b, chunk_bytes)) + [b]
                for x, y in zip(bounds[:-1], bounds[1:]):
                    chunks.append(Chunk(str(path), fmt, x, y, fi, len(chunks), y - x))
        elif fmt == "parquet":
            n_groups = _parquet_row_groups(path)
            starts = [g for g in range(n_groups) if mine(base + size * g // max(n_groups, 1))]
            if n_groups == 0 and mine(base):  # unreadable footer or no row groups: the reader reports it
                chunks.append(Chunk(str(path), fmt, 0, 0, fi, len(chunks), size))
            per = max(1, int(n_groups * chunk_bytes / max(size, 1)))
            for k in range(0, len(starts), per):
                a, b = starts[k], starts[min(k + per, len(starts)) - 1] + 1
                chunks.append(Chunk(str(path), fmt, a, b, fi, len(chunks), size * (b - a) // max(n_groups, 1)))
        elif mine(base):
            chunks.append(Chunk(str(path), fmt, 0, -1, fi, len(chunks), size))
        base += size
    return chunks


def file_ranges(chunks: Sequence[Chunk]) -> dict[str, dict[str, Any]]:
    """Per file, the part that ``chunks`` cover: ``{"unit": "bytes"|"row_groups"|"file", "start", "end"}``
    (``end`` exclusive; a compressed file is always whole)."""
    out: dict[str, dict[str, Any]] = {}
    for c in chunks:
        unit = {"jsonl": "bytes", "parquet": "row_groups"}.get(c.fmt, "file")
        r = out.setdefault(c.path, {"unit": unit, "start": c.start, "end": c.end})
        r["end"] = c.end
    return out


def _parquet_row_groups(path: Path) -> int:
    """Row groups in a Parquet footer; 0 when the footer cannot be read (the reader reports the damage)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_row_groups
    except (OSError, pa.ArrowException):
        return 0


def get_field(obj: Any, key: str) -> Any:
    """``obj[key]`` where ``key`` may be dotted (``meta.text``); None when absent."""
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


class _DecodedStream(io.RawIOBase):
    """The decompressed bytes of a ``.gz``/``.zst``/``.xz`` file (all members/frames/streams in turn) as
    a raw stream. At a truncation or a decoder error it ends and sets ``damage`` to ``(kind, reason)``
    (``kind``: ``truncated`` | ``corrupt``), having produced every byte the decoder gave before the break:
    a decoder call that raises loses its output, so after an error the file is decoded again, in
    ``_SALVAGE_PIECE``-byte pieces from the failed block on, to recover the bytes before the break."""

    def __init__(self, path: str, fmt: str, fine_from: int | None = None) -> None:
        super().__init__()
        self._path, self._fmt = path, fmt
        self._file: BinaryIO = open(path, "rb")
        self._fine_from = fine_from  # salvage pass: compressed offset from which to feed small pieces
        self._decoder: Any = None
        self._input = b""  # compressed bytes read but not yet given to a decoder
        self._fed = 0  # compressed bytes consumed so far
        self._out = memoryview(b"")
        self._done = False
        self.decoded = 0  # decompressed bytes produced
        self.damage: tuple[str, str] | None = None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._file.close()
        super().close()

    def _new_decoder(self) -> Any:
        if self._fmt == "jsonl.gz":
            return zlib.decompressobj(wbits=31)  # gzip container: header, deflate, CRC-32 + size trailer
        if self._fmt == "jsonl.xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_AUTO)
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj()

    def _errors(self) -> tuple[type[BaseException], ...]:
        if self._fmt == "jsonl.zst":
            import zstandard

            return (zstandard.ZstdError,)
        return (zlib.error, lzma.LZMAError, EOFError)

    def _take(self) -> bytes:
        """The next piece of compressed input (b"" at the end of the file)."""
        size = _READ_BLOCK
        if self._fine_from is not None:
            size = _SALVAGE_PIECE if self._fed >= self._fine_from else min(size, self._fine_from - self._fed)
        if not self._input:
            self._input = self._file.read(max(size, _READ_BLOCK))
        data, self._input = self._input[:size], self._input[size:]
        return data

    def _fill(self) -> None:
        data = self._take()
        if self._decoder is None:  # between members/frames/streams
            if not data:
                self._done = True
                return
            stripped = data.lstrip(b"\0")  # zero padding is allowed there (gzip, xz)
            self._fed += len(data) - len(stripped)
            data = stripped
            if not data:
                return
            self._decoder = self._new_decoder()
        elif not data:
            self.damage = ("truncated", f"the compressed stream ends before its end marker "
                                        f"(after {self.decoded} decompressed bytes)")
            self._done = True
            return
        try:
            out = self._decoder.decompress(data)  # all output for this piece: at most ratio x _READ_BLOCK
        except self._errors() as exc:
            self._done = True
            if self._fine_from is None:
                self._salvage()
            if self.damage is None:
                self.damage = ("corrupt", f"{type(exc).__name__}: {exc} (after {self.decoded} decompressed bytes)")
            return
        self._fed += len(data)
        if self._decoder.eof:
            unused = self._decoder.unused_data
            self._fed -= len(unused)
            self._input = unused + self._input
            self._decoder = None
        self.decoded += len(out)
        self._out = memoryview(out)

    def _salvage(self) -> None:
        """Decode the file again, finely from the failed piece on; keep the bytes beyond ``decoded``."""
        again = _DecodedStream(self._path, self._fmt, fine_from=self._fed)
        with again:
            extra = io.BufferedReader(again).read()[self.decoded :]
        self.decoded += len(extra)
        self._out = memoryview(extra)
        self.damage = again.damage

    def readinto(self, buffer: Any) -> int:
        while not len(self._out):
            if self._done:
                return 0
            self._fill()
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

def iter_lines(chunk: Chunk, damage: list[dict[str, Any]] | None = None) -> Iterator[bytes]:
    """Raw lines (with their newline) of a JSONL chunk, plain or compressed; the UTF-8 BOM that may
    begin a file is removed from its first line. Damage handling: module doc."""
    if chunk.fmt != "jsonl":
        yield from _compressed_lines(chunk, damage)
        return
    with open(chunk.path, "rb", buffering=_LINE_BUFFER) as f:
        pos = chunk.start
        if pos > 0:
            f.seek(pos - 1)
            if f.read(1) != b"\n":  # started mid-line: that line belongs to the previous chunk
                pos += len(f.readline())
        elif chunk.end > 0:
            line = f.readline()
            pos += len(line)
            yield line[3:] if line.startswith(UTF8_BOM) else line
        while pos < chunk.end:
            line = f.readline()
            if not line:
                return
            pos += len(line)
            yield line


def _compressed_lines(chunk: Chunk, damage: list[dict[str, Any]] | None) -> Iterator[bytes]:
    stream = _DecodedStream(chunk.path, chunk.fmt)
    n = 0
    with io.BufferedReader(stream, 1 << 20) as f:
        for line in f:
            if not line.endswith(b"\n") and stream.damage is not None:  # the break fell inside this line
                report_damage(damage, chunk.path, n + 1, *stream.damage, partial_line_bytes=len(line))
                return
            n += 1
            yield line[3:] if n == 1 and line.startswith(UTF8_BOM) else line
    if stream.damage is not None:
        report_damage(damage, chunk.path, n + 1, *stream.damage, partial_line_bytes=0)


def report_damage(damage: list[dict[str, Any]] | None, path: str, line: int, kind: str, reason: str,
                  **extra: Any) -> None:
    """Record a break at ``line`` (the first line not read) in ``damage``, or raise without a list."""
    if damage is None:
        raise DamagedInputError(f"{path}:{line}: {kind} input: {reason}")
    damage.append({"line": line, "kind": kind, "reason": reason, **extra})


@contextlib.contextmanager
def open_compressed_writer(path: str | os.PathLike[str], fmt: str) -> Iterator[BinaryIO]:
    """A binary file for writing JSONL in ``fmt`` (``detect_format``'s names): plain, gzip, zstd or xz."""
    if fmt == "jsonl.gz":
        import gzip

        with gzip.open(path, "wb") as f:
            yield f
    elif fmt == "jsonl.xz":
        with lzma.open(path, "wb") as f:
            yield f
    elif fmt == "jsonl.zst":
        import zstandard

        with open(path, "wb") as raw, zstandard.ZstdCompressor(write_checksum=True).stream_writer(raw) as f:
            yield f
    else:
        with open(path, "wb") as f:
            yield f


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


def iter_objects(
    chunk: Chunk, columns: Sequence[str] | None = None, damage: list[dict[str, Any]] | None = None
) -> Iterator[Record]:
    """Every line/row of ``chunk`` as a parsed object (``value``) or a skip reason.

    ``columns`` restricts the Parquet columns read (top-level names); JSONL always yields whole objects.
    ``damage``: see the module doc.
    """
    if chunk.fmt == "parquet":
        yield from _parquet_rows(chunk, columns, damage)
        return
    for line_no, raw in enumerate(iter_lines(chunk, damage), start=1):
        yield object_record(line_no, raw)


def object_record(line_no: int, raw: bytes) -> Record:
    """One raw JSONL line as a parsed object (``value``) or a parse skip reason."""
    obj, reason, detail = parse_line(raw)
    if reason is None and not isinstance(obj, dict):
        obj, reason, detail = None, "not_an_object", f"got {type(obj).__name__}"
    return Record(line_no, obj, reason, detail)


def _parquet_rows(chunk: Chunk, columns: Sequence[str] | None, damage: list[dict[str, Any]] | None) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(chunk.path, page_checksum_verification=True)
        meta = pf.metadata
    except (OSError, pa.ArrowException) as exc:
        report_damage(damage, chunk.path, 1, "corrupt", f"cannot read the Parquet footer: {exc}", rows_lost=0)
        return
    names = set(pf.schema_arrow.names)
    cols = [c for c in (columns or []) if c in names] or None
    line = 0
    for group in range(chunk.start, chunk.end):
        first = line
        try:
            for batch in pf.iter_batches(row_groups=[group], columns=cols, batch_size=8192, use_threads=False):
                for row in batch.to_pylist():
                    line += 1
                    yield Record(line, row, None, "")
        except (OSError, pa.ArrowException) as exc:
            rows = meta.row_group(group).num_rows
            lost = rows - (line - first)
            report_damage(damage, chunk.path, line + 1, "corrupt", f"row group {group}: {exc}",
                          row_group=group, rows_lost=lost)
            line = first + rows  # later rows keep their row numbers


def iter_records(chunk: Chunk, field: str, damage: list[dict[str, Any]] | None = None) -> Iterator[Record]:
    """Every line/row of ``chunk`` with ``value`` = the string at ``field`` (dotted keys allowed), or a
    skip reason: the parse reasons of ``iter_objects`` plus those of :func:`text_record`. ``damage``:
    module doc."""
    for rec in iter_objects(chunk, [field.split(".")[0]], damage):
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
