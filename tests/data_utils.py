"""Shared helpers for the tests/test_data_*.py files: small corpora written on the fly."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "patient fever cough dyspnea troponin sepsis heparin aspirin mg IV q8h history presented with "
    "acute chronic renal failure diabetes insulin résumé naïve 中文 😀 the of and a to in"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + rng.choice(["", ".", "\n", "  "])


def write_jsonl(path: Path, records: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    """Write ``records`` as JSONL; ``raw_lines`` inserts exact bytes at given 0-based line positions."""
    raw_lines = raw_lines or {}
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]
    for pos in sorted(raw_lines):
        lines.insert(pos, raw_lines[pos])
    path.write_bytes(b"".join(lines))
    return path


def sp_reference(name: str):
    """The ``sentencepiece`` library processor for a mistral-common tokenizer file (the ground truth)."""
    import sentencepiece as spm

    from clinmega.data.tokenizers import mistral_common_model_path

    return spm.SentencePieceProcessor(model_file=str(mistral_common_model_path(name)))
