"""``decontaminate``: find (and optionally remove) training documents that share word n-grams with
evaluation sets (MedQA / MedMCQA / PubMedQA / MMLU-style JSONL).

Text is normalised (Unicode NFKC, lower case, words = runs of ``\\w``); every word gets a 64-bit
hash (polynomial of its code points, mixed) and every n-gram (default 13 words) a 64-bit polynomial hash
of its words, all computed vectorised with numpy over batches of ~0.5M characters (no per-word Python;
NFKC and lower case go through per-code-point tables, one byte per character for ASCII batches, strings
only for the rare runs whose normalisation depends on their neighbours). The evaluation side is hashed on
the worker processes in line-aligned byte ranges (an item's fields as one text cut at NUL) and becomes
one sorted ``uint64`` array plus a bitmap prefilter (tens to hundreds of MB for hundreds of thousands of
questions), shared by the forked scanning workers, optionally kept on disk for later runs
(``index_cache``); which evaluation item first holds an n-gram is looked up only for the n-grams a
training document shares. Training files are streamed in
byte-range chunks and batches, so memory does not grow with the corpus. A document is flagged when it contains at
least ``min_matches`` distinct evaluation n-grams.

The training field (``text_field``) may be a string or, as for chat data (``messages``), a list/dict
whose strings are each checked (no n-gram spans two strings). Evaluation records contribute the text
of the fields named in ``eval_fields`` (matched case-insensitively; strings, lists and dicts of strings
such as MedQA's ``options`` are walked), each string hashed separately so no n-gram spans two fields. Items with no field of ``ngram`` words or more
cannot be checked and are counted as such.

``mode="remove"`` writes each training file minus flagged lines (kept lines byte-identical, other lines
included — unparseable lines are passed through and counted, never dropped silently) to
``output_dir`` (compressed again in its input's format: .gz, .zst, .xz); ``mode="report"`` only reports.
Always written: ``output_dir/decontam_manifest.json`` and ``output_dir/flagged.jsonl`` (file, line,
matched n-gram count, evaluation sets and items hit). A damaged compressed input is scanned (and its
kept lines written) up to the break, which the manifest records (``files[].damaged``).

``shard="i/N"`` scans only shard ``i`` of ``N`` (``readers.plan_chunks``) into ``<output_dir>-0000i-of-0000N``;
a file split between shards has its kept lines in both shard directories, in order, and there counts
lines from its ``range.start`` byte (recorded in the manifest's ``shard.ranges``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import orjson

from clinmega.utils.atomic import staging_dir, write_json_atomic
from clinmega.data.config import DecontamConfig
from clinmega.data.manifest import FileStats, build_manifest, merge_chunk_stats, report_damage
from clinmega.data.parallel import run_chunk_tasks, run_parallel
from clinmega.data.readers import (
    Chunk,
    detect_format,
    expand_inputs,
    file_ranges,
    get_field,
    iter_lines,
    open_compressed_writer,
    parse_line,
    parse_shard,
    plan_chunks,
    shard_suffix,
)

try:  # the compiled n-gram pass (an optional extension: without a C compiler, numpy does it)
    from clinmega.data import _ngrams as _kernel
except ImportError:  # pragma: no cover - depends on the build
    _kernel = None

_WORD = re.compile(r"\w+")
_PRIME = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so the polynomial hash is well spread mod 2**64


def normalize_words(text: str) -> list[str]:
    """NFKC + lower case, split into ``\\w+`` words."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


_P64 = 0x100000001B3
_Q = np.uint64(pow(_P64, -1, 1 << 64))  # inverse of the prime mod 2**64 (it is odd)
_IS_WORD = np.zeros(0x110000, dtype=bool)  # code point -> matches \\w (filled lazily beyond ASCII)
_KNOWN = np.zeros(0x110000, dtype=bool)
_IS_WORD[:128] = [_WORD.fullmatch(chr(c)) is not None for c in range(128)]
_KNOWN[:128] = True
_POWERS: dict[str, np.ndarray] = {}
BATCH_CHARS = 1 << 19  # characters hashed per vectorised batch (smaller ones stay in cache; per-batch costs bound it)
SEGMENT_CUT = "\x00"  # joins the strings of one evaluation item: no n-gram spans it
EVAL_PART_BYTES = 4 << 20  # smallest byte range of an evaluation file indexed by one worker


def _word_mask(cps: np.ndarray) -> np.ndarray:
    """Whether each code point is a ``\\w`` character (decided by the regex itself, once per code point)."""
    high = cps[cps >= 128]
    if high.size:
        new = high[~_KNOWN[high]]
        if new.size:
            new = np.unique(new)
            _IS_WORD[new] = [_WORD.fullmatch(chr(c)) is not None for c in new.tolist()]
            _KNOWN[new] = True
    return _IS_WORD[cps]


def _powers(length: int) -> tuple[np.ndarray, np.ndarray]:
    """(P**i, Q**i) mod 2**64 for i < length (grown on demand, kept per process)."""
    if len(_POWERS.get("p", ())) < length:
        size = max(length, BATCH_CHARS + (BATCH_CHARS >> 2))
        with np.errstate(over="ignore"):
            _POWERS["p"] = np.cumprod(np.concatenate([[np.uint64(1)], np.full(size - 1, _PRIME)]), dtype=np.uint64)
            _POWERS["q"] = np.cumprod(np.concatenate([[np.uint64(1)], np.full(size - 1, _Q)]), dtype=np.uint64)
    return _POWERS["p"][:length], _POWERS["q"][:length]


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (spreads the polynomial word hash over all 64 bits)."""
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return x


_LOWER = np.arange(0x110000, dtype=np.uint32)  # code point -> its lower case (filled lazily beyond ASCII)
_LOWER[65:91] += 32
_SPECIAL_CASE = np.zeros(0x110000, dtype=bool)  # lower() is contextual (final sigma) or not one code point
_KNOWN_CASE = np.zeros(0x110000, dtype=bool)
_KNOWN_CASE[:128] = True


_NFKC1 = np.arange(0x110000, dtype=np.uint32)  # code point -> its NFKC where that is one context-free code point
_SIMPLE = np.ones(0x110000, dtype=bool)  # ... and whether it is (learnt lazily beyond ASCII)
_KNOWN_NFKC = np.zeros(0x110000, dtype=bool)
_KNOWN_NFKC[:128] = True
_SECONDS: set[int] = set()  # code points that can compose with the character before them


def _composing_seconds() -> set[int]:
    """Every code point that is the second of a canonical composition pair (the Unicode data's two-part
    canonical decompositions, all below U+30000), plus the Hangul vowel and trailing jamo."""
    if not _SECONDS:
        for c in range(0x30000):
            d = unicodedata.decomposition(chr(c))
            if d and d[0] != "<" and len(parts := d.split()) == 2:
                _SECONDS.add(int(parts[1], 16))
        _SECONDS.update(range(0x1160, 0x1200))
    return _SECONDS


def _learn_nfkc(new: np.ndarray) -> None:
    """Fill ``_NFKC1``/``_SIMPLE`` for code points not seen yet: simple when NFKC maps the character alone
    to one starter that composes with neither neighbour, so it may be mapped in place whatever surrounds it."""
    seconds = _composing_seconds()
    for c in np.unique(new).tolist():
        ch = chr(c)
        d = unicodedata.normalize("NFKC", ch)
        head = unicodedata.normalize("NFD", d)[:1]
        simple = (len(d) == 1 and not unicodedata.combining(ch) and not unicodedata.combining(d)
                  and not unicodedata.combining(head) and c not in seconds and ord(d) not in seconds
                  and ord(head) not in seconds)
        _SIMPLE[c] = simple
        _NFKC1[c] = ord(d) if simple else c
        _KNOWN_NFKC[c] = True


def _nfkc_codepoints(joined: str, cps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NFKC of ``joined`` (whose code points are ``cps``) as code points. Characters that are simple (see
    ``_learn_nfkc``) are mapped through a table; a run of non-ASCII characters holding any other one is
    normalised as a string together with the character before it (ASCII characters are starters that
    nothing composes into, so the text may be cut before any of them: NFKC(a + b) = NFKC(a) + NFKC(b) when
    b starts with one). Returns (code points, ends of the runs normalised as strings in the input, the
    cumulative length change after each) to map input positions to output ones."""
    none = np.zeros(0, np.int64)
    high = np.flatnonzero(cps >= 128)
    if not high.size:
        return cps, none, none
    cp_high = cps[high]
    new = cp_high[~_KNOWN_NFKC[cp_high]]
    if new.size:
        _learn_nfkc(new)
    out = cps.copy()
    out[high] = _NFKC1[cp_high]
    bad = ~_SIMPLE[cp_high]
    if not bad.any():
        return out, none, none
    run_of = np.zeros(len(high), dtype=np.int64)
    run_of[1:] = np.cumsum(np.diff(high) != 1)
    cut = np.flatnonzero(np.diff(high) != 1) + 1
    first = np.concatenate([[0], cut])
    last = np.concatenate([cut - 1, [len(high) - 1]])
    runs = np.unique(run_of[bad])
    pieces, ends, deltas = [], [], []
    prev = delta = 0
    norm = unicodedata.normalize
    for s, e in zip(np.maximum(high[first[runs]] - 1, 0).tolist(), (high[last[runs]] + 1).tolist()):
        s = max(s, prev)
        done = norm("NFKC", joined[s:e])
        pieces.append(out[prev:s])
        pieces.append(np.frombuffer(done.encode("utf-32-le", "surrogatepass"), dtype=np.uint32))
        prev = e
        delta += len(done) - (e - s)
        ends.append(e)
        deltas.append(delta)
    pieces.append(out[prev:])
    return np.concatenate(pieces), np.asarray(ends, np.int64), np.asarray(deltas, np.int64)


def _lower_codepoints(cps: np.ndarray) -> np.ndarray | None:
    """``str.lower`` applied to code points, or None where it depends on context or changes the length
    (final sigma, dotted capital I): the caller then lowers the strings themselves."""
    at = np.flatnonzero(cps >= 128)
    out = cps + ((cps - np.uint32(65)) < np.uint32(26)).astype(np.uint32) * np.uint32(32)
    if at.size:
        high = cps[at]
        new = high[~_KNOWN_CASE[high]]
        if new.size:
            for c in np.unique(new).tolist():
                low = chr(c).lower()
                _SPECIAL_CASE[c] = len(low) != 1 or c == 0x3A3
                _LOWER[c] = ord(low[0])
                _KNOWN_CASE[c] = True
        if _SPECIAL_CASE[high].any():
            return None
        out[at] = _LOWER[high]
    return out


_FOLD = _LOWER.copy()  # code point -> lower(NFKC(it)) where both are one context-free code point ...
_FOLD_OK = np.zeros(0x110000, dtype=bool)  # ... and whether they are (learnt lazily beyond ASCII)
_FOLD_WORD = np.zeros(0x110000, dtype=bool)  # whether that folded code point is a \w character
_KNOWN_FOLD = np.zeros(0x110000, dtype=bool)
_FOLD_OK[:128] = _KNOWN_FOLD[:128] = True
_FOLD_WORD[:128] = _IS_WORD[_FOLD[:128]]
_IDENTITY = np.arange(0x110000, dtype=np.uint32)  # the compiled pass's fold table for normalised text
_ASCII_FOLD = _FOLD[:128].astype(np.uint8)  # the same tables for ASCII text read as bytes
_ASCII_FOLD_WORD = _FOLD_WORD[:128].copy()


def _learn_fold(new: np.ndarray) -> None:
    """Fill the ``_FOLD`` tables for the (distinct) code points ``new`` from the NFKC, case and word ones."""
    unknown = new[~_KNOWN_NFKC[new]]
    if unknown.size:
        _learn_nfkc(unknown)
    mapped = _NFKC1[new]
    _lower_codepoints(mapped)  # learns the case of the NFKC results
    folded = _LOWER[mapped]
    _FOLD[new] = folded
    _FOLD_OK[new] = _SIMPLE[new] & ~_SPECIAL_CASE[mapped]
    _FOLD_WORD[new] = _word_mask(folded)
    _KNOWN_FOLD[new] = True


def _fold_tables(joined: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(code points of ``joined``, one byte each when it is ASCII, and the tables mapping each to its NFKC
    lower case and to whether that is a \\w character) when every character of it folds alone (see
    ``_FOLD``): the common case; else (its code points, None, None)."""
    if joined.isascii():  # the common case (CPython knows it without a scan)
        return np.frombuffer(joined.encode("ascii"), dtype=np.uint8), _FOLD, _FOLD_WORD
    raw = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    high = raw[raw >= 128]
    if high.size:
        new = high[~_KNOWN_FOLD[high]]
        if new.size:
            _learn_fold(np.asarray(sorted(set(new.tolist())), dtype=np.uint32))
        if not _FOLD_OK[high].all():
            return raw, None, None
    return raw, _FOLD, _FOLD_WORD


def _folded_codepoints(joined: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(code points of ``joined``, NFKC'd and lower-cased, and their \\w mask) in one table look-up each
    when every character of it folds alone (``_fold_tables``); else (its raw code points, None)."""
    raw, fold, word = _fold_tables(joined)
    if fold is None:
        return raw, None
    if raw.dtype == np.uint8:
        return np.take(_ASCII_FOLD, raw), np.take(_ASCII_FOLD_WORD, raw)
    return np.take(fold, raw), np.take(word, raw)  # np.take: twice as fast as indexing here


def _joined(texts: list[str]) -> tuple[str, np.ndarray]:
    """``texts`` joined by a newline, and where each starts in the result."""
    raw_starts = np.zeros(len(texts), dtype=np.int64)
    if len(texts) > 1:
        np.cumsum(np.fromiter((len(t) + 1 for t in texts[:-1]), np.int64, len(texts) - 1), out=raw_starts[1:])
    return "\n".join(texts), raw_starts


def _normalised_codepoints(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Code points of the NFKC, lower-cased ``texts`` joined by a newline (a non-word character: words and
    case rules never cross it), where each text starts in them, and their \\w mask when it came with them
    (else None)."""
    joined, raw_starts = _joined(texts)
    raw, is_word = _folded_codepoints(joined)
    if is_word is not None:
        return raw, raw_starts, is_word
    return _normalised_by_runs(texts, joined, raw, raw_starts)


def _normalised_by_runs(texts: list[str], joined: str, raw: np.ndarray,
                        raw_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """``_normalised_codepoints`` of a batch ``joined`` (code points ``raw``, texts starting at
    ``raw_starts``) in which some character does not fold alone: NFKC of the runs that need it as strings,
    then lower case by table or, where that depends on context, per text as ``str.lower`` does."""
    cps, run_ends, deltas = _nfkc_codepoints(joined, raw)
    lowered = _lower_codepoints(cps)
    if lowered is None:  # rare: lower each text as str.lower does, from its own NFKC
        done, starts = _joined([unicodedata.normalize("NFKC", t).lower() for t in texts])
        return np.frombuffer(done.encode("utf-32-le", "surrogatepass"), dtype=np.uint32), starts, None
    if run_ends.size:  # a text starts after a separator, never inside a normalised run
        k = np.searchsorted(run_ends, raw_starts, side="right")
        raw_starts = raw_starts + np.where(k > 0, deltas[np.maximum(k - 1, 0)], 0)
    return lowered, raw_starts, None


def _word_bounds(is_word: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first position, one past the last) of each run of True in ``is_word``."""
    w8 = is_word.view(np.int8)
    change = np.flatnonzero(w8[1:] != w8[:-1]) + 1
    if len(w8) and w8[0]:
        change = np.concatenate([[0], change])
    if len(w8) and w8[-1]:
        change = np.concatenate([change, [len(w8)]])
    return change[0::2], change[1::2]


def batch_ngram_hashes(texts: list[str], n: int, segments: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every ``n``-word window of each normalised text (no window spans two texts), and
    the index of the text each comes from; vectorised over the whole batch. With ``segments``, no window
    spans a ``SEGMENT_CUT`` character either (the fields of one evaluation item, joined by it).

    Normalisation (NFKC, then lower case) runs on the joined batch: NFKC only on its non-ASCII runs,
    lower case through a code-point table. A word's hash is the polynomial of its code points mod 2**64
    (computed for all words at once from prefix sums weighted by the prime's inverse powers), mixed by
    ``_fmix64``; an n-gram's hash is the polynomial of its words' hashes. Same words in the same order:
    same hash, in any batch."""
    empty = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    if not texts:
        return empty
    if _kernel is not None and n <= 64:
        joined, text_starts = _joined(texts)
        cps, fold, word = _fold_tables(joined)
        if fold is None:  # normalised in numpy and strings first, then mapped to themselves in the pass
            cps, text_starts, _ = _normalised_by_runs(texts, joined, cps, text_starts)
            cps = np.ascontiguousarray(cps, dtype=np.uint32)
            _word_mask(cps)  # learns the \w-ness of its code points
            fold, word = _IDENTITY, _IS_WORD
        if not cps.size:
            return empty
        cap = (len(cps) + 1) // 2  # a word and the character after it, at least
        hashes, owner = np.empty(cap, dtype=np.uint64), np.empty(cap, dtype=np.int64)
        count = _kernel.ngrams(cps, cps.itemsize, fold, word, text_starts, n, segments, hashes, owner)
        return hashes[:count], owner[:count]
    cps, text_starts, is_word = _normalised_codepoints(texts)
    if not cps.size:
        return empty
    if is_word is None:
        is_word = _word_mask(cps)
    return _numpy_ngrams(cps, is_word, text_starts, n, segments)


def _numpy_ngrams(cps: np.ndarray, is_word: np.ndarray, text_starts: np.ndarray, n: int,
                  segments: bool) -> tuple[np.ndarray, np.ndarray]:
    """The n-gram hashes of ``batch_ngram_hashes`` from the normalised code points, in numpy (the compiled
    ``clinmega.data._ngrams`` does the same in one pass; this runs where it could not be built)."""
    empty = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    starts, ends = _word_bounds(is_word)
    w = len(starts)
    if w < n:
        return empty
    ppow, qpow = _powers(len(cps))
    with np.errstate(over="ignore"):
        prefix = np.empty(len(cps) + 1, dtype=np.uint64)  # prefix[i]: sum of cps[t] Q**t for t < i
        prefix[0] = 0
        np.multiply(cps, qpow, out=prefix[1:])
        np.cumsum(prefix[1:], out=prefix[1:])
        words = _fmix64((np.take(prefix, ends) - np.take(prefix, starts)) * np.take(ppow, ends - 1))
        # the n-gram at word k is sum_j words[k+j] P**(n-1-j) = (S[k+n] - S[k]) P**(k+n-1), from the prefix
        # sums S of words[t] Q**t (Q = 1/P mod 2**64): a few passes instead of n
        sums = np.zeros(w + 1, dtype=np.uint64)
        np.cumsum(words * qpow[:w], out=sums[1:])
        acc = (sums[n:] - sums[:-n]) * ppow[n - 1 : w]
    # texts are cut at a non-word character, so each text's words are a run of ``starts``
    first = np.searchsorted(starts, text_starts)
    owner = np.repeat(np.arange(len(text_starts), dtype=np.int64), np.diff(first, append=w))
    m = w - n + 1
    if segments:  # NFKC and lower case leave the cut character (a non-word starter) as it is
        bounds = np.sort(np.concatenate([text_starts, np.flatnonzero(cps == ord(SEGMENT_CUT)) + 1]))
        segment = np.repeat(np.arange(len(bounds)), np.diff(np.searchsorted(starts, bounds), append=w))
        keep = segment[:m] == segment[n - 1 :]
    else:
        keep = owner[:m] == owner[n - 1 :]
    return acc[keep], owner[:m][keep]


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of every ``n``-word window of the normalised ``text`` (empty if fewer words)."""
    return batch_ngram_hashes([text], n)[0]


def _field_texts(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _field_texts(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _field_texts(v)


class _ItemTexts:
    """The strings of an evaluation record under ``fields`` (keys matched case-insensitively; strings,
    lists and dicts walked), in the record's key order; which keys are wanted is decided once per key
    layout (the records of one file share theirs)."""

    def __init__(self, fields: Iterable[str]) -> None:
        self.wanted = {f.lower() for f in fields}
        self.layouts: dict[tuple[str, ...], tuple[str, ...]] = {}

    def __call__(self, record: dict[str, Any]) -> str:
        """The record's strings joined by ``SEGMENT_CUT`` (see ``batch_ngram_hashes``; one that holds the
        cut character itself has it replaced by a space, which splits words and normalises the same)."""
        layout = tuple(record)
        keys = self.layouts.get(layout)
        if keys is None:
            keys = self.layouts[layout] = tuple(k for k in layout if k.lower() in self.wanted)
        try:
            strings = [record[k] for k in keys]
            joined = SEGMENT_CUT.join(strings)
        except TypeError:  # a list, a dict or a non-string among them (MedQA's options): walk them
            strings = [t for k in keys for t in _field_texts(record[k])]
            joined = SEGMENT_CUT.join(strings)
        if joined.count(SEGMENT_CUT) != max(len(strings) - 1, 0):
            joined = SEGMENT_CUT.join(t.replace(SEGMENT_CUT, " ") for t in strings)
        return joined


@dataclass
class EvalIndex:
    """Sorted unique n-gram hashes of all evaluation sets; ``owners`` gives the first (set, item) holding one.

    ``parts`` are the indexed byte ranges of the evaluation files in file order, each with its sorted
    unique keys and the (absolute) line first holding each: owners are looked up there only for the few
    keys a training document shares, so building the index merges keys only."""

    keys: np.ndarray  # uint64, sorted
    parts: list[tuple[int, np.ndarray, np.ndarray]]  # (set index into names, sorted keys, first line of each)
    names: list[str]
    stats: dict[str, dict[str, Any]]
    source: str = "built"  # or where the cache entry it was read from is
    _bitmap: np.ndarray | None = None
    _shift: np.uint64 = np.uint64(0)

    def owners(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(set index, line) of the first evaluation item holding each of the keys at positions ``pos``."""
        wanted = np.take(self.keys, pos)
        sets = np.full(len(wanted), -1, dtype=np.int32)
        items = np.zeros(len(wanted), dtype=np.int64)
        todo = np.arange(len(wanted))
        for set_index, part_keys, part_lines in self.parts:
            if not todo.size:
                break
            if not len(part_keys):
                continue
            at = np.minimum(np.searchsorted(part_keys, wanted[todo]), len(part_keys) - 1)
            hit = part_keys[at] == wanted[todo]
            sets[todo[hit]] = set_index
            items[todo[hit]] = part_lines[at[hit]]
            todo = todo[~hit]
        return sets, items

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Positions in ``keys`` of the distinct ``hashes`` that occur in the evaluation sets."""
        return np.unique(self.positions(hashes)[1])

    def prefilter(self) -> None:
        """Build the bitmap of the keys' top bits (see ``positions``) if it is not there yet."""
        if self._bitmap is None and len(self.keys):
            bits = int(min(32, max(16, int(np.ceil(np.log2(64 * len(self.keys)))))))
            self._shift = np.uint64(64 - bits)
            top = self.keys >> self._shift  # sorted, since the keys are
            top = top[_run_starts(top)]
            byte = top >> np.uint64(3)
            first = np.flatnonzero(_run_starts(byte))
            bit = np.left_shift(np.uint8(1), (top & np.uint64(7)).astype(np.uint8))
            self._bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)
            # distinct bits of one byte: their sum is their OR (np.bitwise_or.at is ~10x slower)
            self._bitmap[byte[first]] = np.add.reduceat(bit, first, dtype=np.uint8)

    def positions(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices into ``hashes``, positions in ``keys``) of the hashes that occur in the evaluation sets.

        A bitmap of the keys' top bits (built once, ~64 bits per key, shared by forked workers) rejects
        almost every training n-gram with one memory access; the rest are confirmed by binary search."""
        none = np.zeros(0, dtype=np.int64)
        if not len(self.keys) or not len(hashes):
            return none, none
        self.prefilter()
        top = hashes >> self._shift
        bits = np.take(self._bitmap, top >> np.uint64(3)) >> (top & np.uint64(7)).astype(np.uint8)
        maybe = np.flatnonzero(bits & np.uint8(1))
        wanted = hashes[maybe]
        by_value = np.argsort(wanted)  # numpy's binary search is ~10x faster on sorted needles
        maybe, wanted = maybe[by_value], wanted[by_value]
        pos = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        found = np.take(self.keys, pos) == wanted
        return maybe[found], pos[found]


@dataclass
class _EvalPart:
    """A byte range of one evaluation JSONL file (``chunk``), or a whole file of another layout (None)."""

    set_index: int
    path: Path
    chunk: Chunk | None
    fields: list[str]
    n: int


def _eval_parts(paths: list[Path], fields: list[str], n: int, workers: int) -> list[_EvalPart]:
    """Evaluation files cut into line-aligned byte ranges, about two per worker (at least 4 MiB each)."""
    parts = []
    for si, path in enumerate(paths):
        if path.suffix.lower() in (".json", ".csv"):
            parts.append(_EvalPart(si, path, None, fields, n))
            continue
        size = path.stat().st_size
        step = max(EVAL_PART_BYTES, -(-size // (2 * max(workers, 1))))
        bounds = list(range(0, size, step)) + [size] if size else [0, 0]
        for x, y in zip(bounds[:-1], bounds[1:]):
            parts.append(_EvalPart(si, path, Chunk(str(path), "jsonl", x, y, si, len(parts), y - x), fields, n))
    return parts


_BLANK: Any = object()  # a blank evaluation line: it counts as a line, not as an item


def _part_records(part: _EvalPart) -> Iterator[tuple[int, Any]]:
    """(position, record) of an evaluation part, positions counted from the part's first line; ``None``
    records are unreadable lines, ``_BLANK`` blank ones.

    JSONL is read line by line (orjson for clean lines, the readers' parser for the rest); the other
    layouts the evaluation loaders accept (PubMedQA's PMID-keyed JSON, MMLU's headerless CSV) are read
    by :func:`clinmega.benchmark_files.load_file` and indexed by question, options and context.
    """
    if part.chunk is None:
        from clinmega.benchmark_files import load_file

        for position, item in enumerate(load_file(part.path), start=1):
            yield position, {"question": item.question, "options": list(item.options),
                             "context": item.context or ""}
        return
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    for line_no, raw in enumerate(iter_lines(part.chunk), start=1):  # iter_lines drops a leading BOM
        try:
            obj = loads(raw)
            if type(obj) is dict:
                yield line_no, obj
                continue
        except decode_error:
            pass
        obj, reason, _ = parse_line(raw)
        if reason == "blank_line":
            yield line_no, _BLANK  # counted as a line, not an item
            continue
        yield line_no, obj if reason is None and isinstance(obj, dict) else None


def _index_part(part: _EvalPart) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Worker: (sorted unique n-gram hashes of the part, the part-relative line first owning each,
    counts: items, items with n-grams, n-grams, unreadable lines, lines)."""
    item_texts = _ItemTexts(part.fields)
    st = {"items": 0, "items_with_ngrams": 0, "ngrams": 0, "unreadable_lines": 0, "lines": 0}
    keys: list[np.ndarray] = []
    lines: list[np.ndarray] = []
    texts: list[str] = []
    text_items: list[int] = []

    def flush() -> None:
        h, owner = batch_ngram_hashes(texts, part.n, segments=True)
        line_of = np.asarray(text_items, dtype=np.int64)[owner]
        st["ngrams"] += len(h)
        if len(line_of):  # line_of never decreases: count its distinct values (np.unique hashes, slowly)
            st["items_with_ngrams"] += 1 + int(np.count_nonzero(line_of[1:] != line_of[:-1]))
        keys.append(h)
        lines.append(line_of)
        texts.clear()
        text_items.clear()

    chars = 0
    for line_no, obj in _part_records(part):
        st["lines"] = line_no
        if obj is _BLANK:
            continue
        if obj is None:
            st["unreadable_lines"] += 1
            continue
        st["items"] += 1
        text = item_texts(obj)
        texts.append(text)
        text_items.append(line_no)
        chars += len(text)
        if chars >= BATCH_CHARS:
            flush()
            chars = 0
    if texts:
        flush()
    return (*_first_of_each(np.concatenate(keys) if keys else np.zeros(0, np.uint64),
                            np.concatenate(lines) if lines else np.zeros(0, np.int64)), st)


def _stable_key_order(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``np.argsort(keys, kind="stable")``, the sorted keys) for uint64 ``keys``, faster: the positions
    are first put in the low bits of the keys and sorted with ``np.sort`` (vectorised, unlike argsort),
    which orders them by the keys' high bits and then by position. Only a run of equal high bits that
    holds distinct keys can then be out of order (rare for hashes: each such run is put in order alone;
    many of them, a stable argsort of the whole nearly sorted result)."""
    bits = max(1, int(len(keys) - 1).bit_length())
    low = np.uint64((1 << bits) - 1)
    packed = np.sort((keys & ~low) | np.arange(len(keys), dtype=np.uint64))
    order = (packed & low).astype(np.int64)
    near = np.take(keys, order)
    descents = np.flatnonzero(near[1:] < near[:-1])
    if len(descents) > _MAX_LOCAL_FIXES:
        fix = np.argsort(near, kind="stable")
        return order[fix], near[fix]
    if len(descents):
        high = packed >> np.uint64(bits)  # sorted
        for h in np.unique(high[descents]).tolist():
            a, b = np.searchsorted(high, np.array([h, h + 1], dtype=np.uint64))  # h < 2**63: bits >= 1
            fix = np.argsort(near[a:b], kind="stable")
            order[a:b], near[a:b] = order[a:b][fix], near[a:b][fix]
    return order, near


_MAX_LOCAL_FIXES = 4096  # out-of-order runs of equal high bits mended one by one (above: one argsort)


def _run_starts(ordered: np.ndarray) -> np.ndarray:
    """Where each run of equal values of the sorted ``ordered`` begins (a mask): its first elements."""
    return np.concatenate([[True], ordered[1:] != ordered[:-1]]) if len(ordered) else np.zeros(0, dtype=bool)


def _first_of_each(keys: np.ndarray, *payload: np.ndarray) -> tuple[np.ndarray, ...]:
    """``keys`` sorted and made unique, each with the payload of its first occurrence."""
    order, keys = _stable_key_order(keys)
    first = _run_starts(keys)
    at = order[first]
    return (keys[first], *(p[at] for p in payload))


def build_eval_index(paths: list[Path], fields: list[str], n: int, workers: int = 1) -> EvalIndex:
    """Read every evaluation file and index its n-grams (see module doc), the files' byte ranges hashed
    on ``workers`` processes."""
    parts = _eval_parts(paths, list(fields), n, workers)
    results = run_parallel(_index_part, parts, workers, description="indexing evaluation sets", progress=False)
    names = [p.name for p in paths]
    stats = {p.name: {"path": str(p), "items": 0, "items_too_short": 0, "ngrams": 0, "unreadable_lines": 0}
             for p in paths}
    all_keys, owned = [], []
    line_offset = 0
    for i, (part, (keys, lines, st)) in enumerate(zip(parts, results)):
        agg = stats[part.path.name]
        for k in ("items", "ngrams", "unreadable_lines"):
            agg[k] += st[k]
        agg["items_too_short"] += st["items"] - st["items_with_ngrams"]
        all_keys.append(keys)
        owned.append((part.set_index, keys, lines + line_offset))
        last_of_file = i + 1 == len(parts) or parts[i + 1].set_index != part.set_index
        line_offset = 0 if last_of_file else line_offset + st["lines"]
    for p in paths:
        if stats[p.name]["unreadable_lines"]:
            raise ValueError(f"{p}: {stats[p.name]['unreadable_lines']} evaluation line(s) are not JSON objects")
    merged = np.sort(np.concatenate(all_keys), kind="stable")  # the parts are sorted runs: this merges them
    keys = merged[_run_starts(merged)]
    return EvalIndex(keys, owned, names, stats)


@dataclass
class _Task:
    chunk: Chunk
    part: str | None  # where kept lines go (None in report mode)
    cfg: DecontamConfig


_INDEXES: dict[tuple, EvalIndex] = {}  # built once per process; forked workers inherit the parent's


def eval_index_for(cfg: DecontamConfig) -> EvalIndex:
    """The evaluation index for ``cfg``, cached per process (keyed by the eval files with their size and
    mtime, the fields and n) and, with ``cfg.index_cache``, on disk (see ``cached_eval_index``)."""
    paths = expand_inputs(cfg.eval_sets)
    files = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    key = (files, tuple(cfg.eval_fields), cfg.ngram, cfg.index_cache)
    if key not in _INDEXES:
        _INDEXES.clear()  # one index at a time: they can be large
        if cfg.index_cache:
            _INDEXES[key] = cached_eval_index(cfg.index_cache, paths, cfg.eval_fields, cfg.ngram, cfg.workers)
        else:
            _INDEXES[key] = build_eval_index(paths, cfg.eval_fields, cfg.ngram, cfg.workers)
        _INDEXES[key].prefilter()  # before any fork: workers share it
    return _INDEXES[key]


INDEX_FORMAT = 1  # bump when the hashing, the normalisation or the stored layout changes


def cached_eval_index(root: str, paths: list[Path], fields: list[str], n: int, workers: int = 1) -> EvalIndex:
    """``build_eval_index`` through the on-disk cache ``root`` (``clinmega.data.array_cache``): an entry is
    keyed by the evaluation files' paths and bytes, the fields, n and ``INDEX_FORMAT``; its arrays are
    memory-mapped, so shard jobs and repeated runs against the same evaluation sets skip the build and
    share the pages. A damaged entry is reported, rebuilt and replaced."""
    from clinmega.data import array_cache

    key = array_cache.content_key("decontam-eval-index", INDEX_FORMAT, n, sorted({f.lower() for f in fields}),
                                  [str(p) for p in paths], files=paths)
    found = array_cache.load(root, key)
    if not isinstance(found, str):
        arrays, meta = found
        bounds, sets = arrays["part_bounds"].tolist(), arrays["part_sets"].tolist()
        parts = [(s, arrays["part_keys"][a:b], arrays["part_lines"][a:b]) for s, a, b in zip(sets, bounds, bounds[1:])]
        index = EvalIndex(arrays["keys"], parts, meta["names"], meta["stats"], source=f"cache {Path(root) / key}")
        if meta["shift"] is not None:
            index._bitmap, index._shift = arrays["bitmap"], np.uint64(meta["shift"])
        return index
    if found != "absent":
        logging.getLogger(__name__).warning("evaluation index cache unusable, rebuilding it: %s", found)
    index = build_eval_index(paths, fields, n, workers)
    index.prefilter()
    part_keys = [k for _, k, _ in index.parts]
    arrays = {
        "keys": index.keys,
        "bitmap": index._bitmap if index._bitmap is not None else np.zeros(0, np.uint8),
        "part_keys": np.concatenate(part_keys) if part_keys else np.zeros(0, np.uint64),
        "part_lines": np.concatenate([l for _, _, l in index.parts]) if part_keys else np.zeros(0, np.int64),
        "part_bounds": np.concatenate([[0], np.cumsum([len(k) for k in part_keys], dtype=np.int64)]),
        "part_sets": np.asarray([s for s, _, _ in index.parts], dtype=np.int32),
    }
    meta = {"names": index.names, "stats": index.stats, "n": n, "fields": list(fields),
            "shift": int(index._shift) if index._bitmap is not None else None}
    index.source = f"built, stored in {array_cache.store(root, key, arrays, meta)}"
    return index


def _line_texts(raw: bytes, keys: list[str], field: str) -> tuple[list[str], str | None]:
    """(strings to check, reason when there are none) of one training line; orjson for clean lines."""
    try:
        v: Any = orjson.loads(raw)
        if type(v) is dict:
            for k in keys:
                v = v[k]
            if type(v) is str:
                return [v], None
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
        pass
    obj, reason, _ = parse_line(raw)
    value = get_field(obj, field) if reason is None else None
    texts = list(_field_texts(value))
    if not texts:
        return texts, reason or ("missing_field" if value is None else "wrong_type")
    return texts, None


def _scan_chunk(task: _Task) -> tuple[FileStats, dict[str, int], list[dict[str, Any]]]:
    """Worker: (stats, unchecked-line counts by reason, flagged documents with chunk-relative lines).

    Lines are buffered up to ``BATCH_CHARS`` characters, hashed and looked up as one batch, then
    written/skipped in order."""
    cfg = task.cfg
    index = eval_index_for(cfg)
    keys = cfg.text_field.split(".")
    stats = FileStats(task.chunk.path)
    unchecked: dict[str, int] = {}
    flagged: list[dict[str, Any]] = []
    lines: list[tuple[int, bytes]] = []
    texts: list[str] = []
    text_line: list[int] = []  # position in ``lines`` of each text

    def flush(out) -> None:
        hashes, owner = batch_ngram_hashes(texts, cfg.ngram)
        at, pos = index.positions(hashes)
        hits_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # document -> (sets, items) of its distinct hits
        if len(at):
            doc = np.asarray(text_line, dtype=np.int64)[owner[at]]
            pairs = np.unique(np.stack([doc, pos.astype(np.int64)], axis=1), axis=0)  # sorted by document
            hit_sets, hit_items = index.owners(pairs[:, 1])
            cut = np.flatnonzero(np.diff(pairs[:, 0])) + 1
            for d, a, b in zip(pairs[np.concatenate([[0], cut]), 0].tolist(), [0, *cut.tolist()],
                               [*cut.tolist(), len(pairs)]):
                hits_of[d] = hit_sets[a:b], hit_items[a:b]
        for i, (line_no, raw) in enumerate(lines):
            hits = hits_of.get(i)
            if hits is not None and len(hits[0]) >= cfg.min_matches:
                hit_sets, hit_items = hits
                sets = sorted({index.names[s] for s in hit_sets.tolist()})
                flagged.append(
                    {
                        "line": line_no,
                        "matched_ngrams": int(len(hit_sets)),
                        "eval_sets": sets,
                        "eval_items": sorted(
                            {(index.names[s], it) for s, it in zip(hit_sets.tolist(), hit_items.tolist())}
                        )[:5],
                    }
                )
                if cfg.mode == "remove":
                    stats.skip(line_no, "contaminated", f"{len(hit_sets)} n-grams shared with {', '.join(sets)}")
                    continue
            stats.documents_written += 1
            if out is not None:
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        lines.clear()
        texts.clear()
        text_line.clear()

    with open(task.part, "wb") if task.part else contextlib.nullcontext() as out:
        chars = 0
        for line_no, raw in enumerate(iter_lines(task.chunk, stats.damaged), start=1):
            stats.documents_read += 1
            line_texts, reason = _line_texts(raw, keys, cfg.text_field)
            if reason is not None:
                unchecked[reason] = unchecked.get(reason, 0) + 1
            for t in line_texts:
                texts.append(t)
                text_line.append(len(lines))
                chars += len(t)
            lines.append((line_no, raw))
            if chars >= BATCH_CHARS or len(lines) >= 65536:
                flush(out)
                chars = 0
        if lines:
            flush(out)
    return stats, unchecked, flagged


def decontaminate(cfg: DecontamConfig) -> dict[str, Any]:
    """Run ``decontaminate``; returns the manifest (also ``<output_dir>/decontam_manifest.json``)."""
    if cfg.mode not in ("remove", "report"):
        raise ValueError(f"mode must be 'remove' or 'report', got {cfg.mode!r}")
    if not cfg.output_dir:
        raise ValueError("output_dir is required")
    if cfg.ngram < 1 or cfg.min_matches < 1:
        raise ValueError("ngram and min_matches must be >= 1")
    shard = parse_shard(cfg.shard)
    out_dir = Path(cfg.output_dir + (shard_suffix(shard) if shard else ""))
    manifest_path = out_dir / "decontam_manifest.json"
    if manifest_path.exists() and not cfg.overwrite:
        raise FileExistsError(f"{manifest_path} exists; use overwrite")
    paths = expand_inputs(cfg.inputs)
    for p in paths:
        if detect_format(p) == "parquet":
            raise ValueError(f"{p}: decontaminate reads JSONL training files only (plain, .gz, .zst or .xz)")
    t0 = time.perf_counter()
    index = eval_index_for(cfg)  # built before forking, so workers share it copy-on-write
    chunks = plan_chunks(paths, cfg.workers, cfg.chunk_mb, shard)
    ranges = file_ranges(chunks)
    all_inputs = [str(p) for p in paths]
    if shard is not None:  # only the files this shard reads
        keep = [i for i, p in enumerate(paths) if str(p) in ranges]
        remap = {old: new for new, old in enumerate(keep)}
        paths = [paths[i] for i in keep]
        chunks = [dataclasses.replace(c, file_index=remap[c.file_index]) for c in chunks]
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
            eval_index=index.source,
            documents_flagged=len(flagged_lines),
            unchecked_lines_passed_through=unchecked,
            outputs=outputs,
            **({"shard": {"index": shard[0], "count": shard[1], "inputs": all_inputs, "ranges": ranges}}
               if shard else {}),
            timing={"seconds": round(time.perf_counter() - t0, 3)},
        )
        flagged_tmp = tmp / "flagged.jsonl"
        flagged_tmp.write_text("".join(x + "\n" for x in flagged_lines), encoding="utf-8")
        os.replace(flagged_tmp, out_dir / "flagged.jsonl")
        write_json_atomic(manifest_path, manifest)
    report_damage(manifest, cfg.strict, logging.getLogger(__name__))
    return manifest


def _write_outputs(tasks: list[_Task], chunks: list[Chunk], paths: list[Path], out_dir: Path, tmp: Path) -> list[str]:
    """Concatenate each file's kept parts (compressed again like the input) and move them into ``out_dir``."""
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"training inputs share file names; cannot write them side by side in {out_dir}")
    finals = []
    for fi, path in enumerate(paths):
        staged = tmp / f"final_{fi}"
        with open_compressed_writer(staged, detect_format(path)) as dst:
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
