"""Per-input-file accounting shared by every data stage, and the manifest JSON it ends up in.

Invariant (checked by ``FileStats.check``): ``documents_read == documents_written + sum(skipped)`` —
every record read is either written or skipped for a named reason; nothing disappears silently.
The first ``MAX_EXAMPLES`` skips per file are kept with their line number and detail.
A file whose reading broke off (a truncated or corrupt compressed stream, a damaged Parquet row group)
lists each break in ``damaged`` (``line``: the first line not read, ``kind``, ``reason``); its documents
before the break are counted as usual, and ``totals.files_damaged`` counts such files.
"""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from clinmega import __version__

MAX_EXAMPLES = 50

SKIP_REASONS = {
    "blank_line": "the line is empty or whitespace only",
    "non_utf8": "the line is not valid UTF-8 (or the text holds lone surrogates)",
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the JSON value is not an object",
    "missing_field": "the configured field is absent or null",
    "wrong_type": "the configured field is not of the expected type",
    "empty": "the text is empty or whitespace only",
    "too_long": "longer than the configured limit",
    "invalid_conversation": "roles/turns do not form a valid conversation",
    "no_loss_tokens": "no assistant token left to train on (after truncation)",
    "contaminated": "shares n-grams with an evaluation set",
}


@dataclass
class FileStats:
    """Counts for one input file (merged across the chunks it was split into)."""

    path: str
    documents_read: int = 0
    documents_written: int = 0
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    damaged: list[dict[str, Any]] = field(default_factory=list)  # breaks, see the module doc

    def skip(self, line: int, reason: str, detail: str = "") -> None:
        """Count one skipped record. ``line`` is 1-based (row number for Parquet)."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"line": line, "reason": reason, "detail": detail[:300]})

    def merge(self, other: "FileStats", line_offset: int) -> None:
        """Add ``other`` (a later chunk of the same file whose line 1 is line ``line_offset + 1``)."""
        self.documents_read += other.documents_read
        self.documents_written += other.documents_written
        self.tokens += other.tokens
        for k, v in other.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        room = MAX_EXAMPLES - len(self.examples)
        self.examples.extend({**e, "line": e["line"] + line_offset} for e in other.examples[: max(room, 0)])
        self.damaged.extend({**d, "line": d["line"] + line_offset} for d in other.damaged)

    @property
    def lines_spanned(self) -> int:
        """Input lines/rows this (chunk's) record covers: those read plus Parquet rows lost to damage."""
        return self.documents_read + sum(d.get("rows_lost", 0) for d in self.damaged)

    def damage_summary(self) -> str:
        """``path:line: kind (reason)`` for each break, ``; ``-joined (empty when undamaged)."""
        return "; ".join(f"{self.path}:{d['line']}: {d['kind']} ({d['reason']})" for d in self.damaged)

    @property
    def documents_skipped(self) -> int:
        return sum(self.skipped.values())

    def check(self) -> None:
        """Assert the accounting invariant; a failure is a bug in clinmega, not in the data."""
        if self.documents_read != self.documents_written + self.documents_skipped:
            raise AssertionError(
                f"{self.path}: read {self.documents_read} != written {self.documents_written} "
                f"+ skipped {self.documents_skipped}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["documents_skipped"] = self.documents_skipped
        return d

    def messages(self) -> list[str]:
        """Human-readable ``file:line: reason (detail)`` lines for the kept examples."""
        return [f"{self.path}:{e['line']}: {e['reason']} ({e['detail']})" for e in self.examples]


def merge_chunk_stats(paths: list[Any], chunks: list[Any], stats: list[FileStats]) -> tuple[list[FileStats], list[int]]:
    """Per-file stats from per-chunk stats (chunks in file order, as ``readers.plan_chunks`` makes them),
    and each chunk's line offset in its file (to turn chunk-relative line numbers into absolute ones)."""
    files = [FileStats(str(p)) for p in paths]
    lines = [0] * len(files)
    offsets = []
    for chunk, st in zip(chunks, stats):
        offsets.append(lines[chunk.file_index])
        files[chunk.file_index].merge(st, line_offset=lines[chunk.file_index])
        lines[chunk.file_index] += st.lines_spanned
    return files, offsets


def totals(files: list[FileStats]) -> dict[str, Any]:
    """Sum of the per-file counts."""
    skipped: dict[str, int] = {}
    for f in files:
        for k, v in f.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    return {
        "documents_read": sum(f.documents_read for f in files),
        "documents_written": sum(f.documents_written for f in files),
        "documents_skipped": sum(skipped.values()),
        "tokens": sum(f.tokens for f in files),
        "skipped": skipped,
        "files_damaged": sum(bool(f.damaged) for f in files),
    }


def damage_line(manifest: dict[str, Any]) -> str | None:
    """One line saying which input files were damaged and where, or None when none was."""
    bad = [f for f in manifest.get("files", []) if f.get("damaged")]
    if not bad:
        return None
    where = "; ".join(f"{f['path']}:{d['line']}: {d['kind']}" for f in bad for d in f["damaged"])
    return (f"damaged input: {len(bad)} of {len(manifest['files'])} file(s), documents before each break kept "
            f"(details under files[].damaged in the manifest): {where}")


def build_manifest(stage: str, config: Any, files: list[FileStats], **extra: Any) -> dict[str, Any]:
    """The manifest dict every stage writes: stage, config, per-file stats, totals, extras."""
    for f in files:
        f.check()

    return {
        "stage": stage,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "clinmega_version": __version__,
        "config": asdict(config) if is_dataclass(config) else config,
        **extra,
        "files": [f.to_dict() for f in files],
        "totals": totals(files),
        "skip_reasons": {k: SKIP_REASONS[k] for k in sorted({r for f in files for r in f.skipped})},
    }


def report_damage(manifest: dict[str, Any], strict: bool, log: Any) -> None:
    """Log each damaged file; with ``strict``, raise (after the outputs were published) naming them."""
    line = damage_line(manifest)
    if line is None:
        return
    for f in manifest["files"]:
        for d in f.get("damaged", []):
            log.warning("damaged input %s:%s: %s (%s)", f["path"], d["line"], d["kind"], d["reason"])
    if strict:
        from clinmega.data.readers import DamagedInputError

        raise DamagedInputError(f"{line} (strict: failing; outputs were written up to each break)")
