"""Answer extraction from generated text: which option (index) did the model choose?

Rules, first hit wins (letters are uppercase unless bracketed or followed by ``).:``/end; a bare article
"a" never counts):

1. an answer statement ("The answer is (C)", "Answer: C", "the correct option is C", "Final answer - C",
   "the answer is metformin"), taking the **last** one (chain-of-thought discusses other options first);
2. ``\\boxed{C}``;
3. a commitment ("I'd choose B", "I would go with option B", "it's B", "(B) is correct", "B is the best
   answer"), last one;
4. a reply that starts with a letter ("C", "(C)", "C.", "C) text", "C: text") or with an option text;
5. exactly one option text mentioned anywhere.

Otherwise ``None`` (scored as wrong, kept in the per-item output).
"""

from __future__ import annotations

import re
from typing import Sequence

from clinmega.benchmark_files import LETTERS

_CUE = re.compile(
    r"(?:\b(?:final|correct|best|right|most\s+likely|most\s+appropriate|true)\s+)?"
    r"(?:\banswer\b|\b(?:correct|best|right)\s+(?:option|choice|response)\b)"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be|here\s+is|is\s+therefore))?"
    r"\s*[:=\-–—]?\s*(?:(?:the\s+)?(?:option|choice|letter)\s*)?[:\-]?\s*",
    re.IGNORECASE,
)
_LETTER = re.compile(r"[\(\[\{]\s*([A-Za-z])\s*[\)\]\}]|([A-Z])(?![A-Za-z0-9'])|([a-z])(?=[\).:]|\s*$)")
_COMMIT = re.compile(
    r"(?:\b(?:choose|chose|select|pick|go\s+with|opt\s+for|it'?s|it\s+is)\s+(?:(?:the\s+)?(?:option|choice|answer)\s+)?"
    r"(?P<a>[\(\[]?[A-Za-z][\)\]]?)(?![A-Za-z]))"
    r"|(?:(?:\b(?:option|choice)\s+)?(?P<b>\([A-Za-z]\)|\b[A-Z]\b)\s+is\s+(?:the\s+)?(?:correct|right|best|most\s+likely))",
    re.IGNORECASE,
)
_BOXED = re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-Za-z])\)?")
_LEADING = re.compile(r"\s*[\(\[]?([A-Z])(?:[\)\]\.:,]|\s*$|\s+[-–—]\s)")


def extract_answer(text: str, options: Sequence[str]) -> int | None:
    """Index of the option that ``text`` answers with, or None when it commits to none."""
    text = re.sub(r"[*_`#]+", "", text).strip()
    options = [o.strip() for o in options]
    n = len(options)
    for cue in reversed(list(_CUE.finditer(text))):
        hit = _letter_at(text, cue.end(), n) if cue.end() < len(text) else None
        hit = hit if hit is not None else _option_at(text, cue.end(), options)
        if hit is not None:
            return hit
    for m in reversed(list(_BOXED.finditer(text))):
        if (i := _index(m.group(1), n, bracketed=True)) is not None:
            return i
    for m in reversed(list(_COMMIT.finditer(text))):
        token = m.group("a") or m.group("b")
        if (i := _index(token.strip("()[]"), n, bracketed=token[0] in "([" or token.isupper())) is not None:
            return i
    if (m := _LEADING.match(text)) and (i := _index(m.group(1), n, bracketed=True)) is not None:
        return i
    if (m := re.match(r"\s*([A-Z])\s+", text)) and (i := _index(m.group(1), n, bracketed=True)) is not None:
        if _option_at(text, m.end(), options) == i:  # "C Hyperkalaemia"
            return i
    if (i := _option_at(text, 0, options)) is not None:
        return i
    mentioned = {i for i, o in enumerate(options) if re.search(rf"(?<!\w){re.escape(o)}(?!\w)", text, re.IGNORECASE)}
    return mentioned.pop() if len(mentioned) == 1 else None


def _index(letter: str, n: int, bracketed: bool) -> int | None:
    if not bracketed and letter.islower():
        return None
    i = LETTERS.find(letter.upper())
    return i if 0 <= i < n else None


def _letter_at(text: str, pos: int, n: int) -> int | None:
    m = _LETTER.match(text, pos)
    if not m:
        return None
    letter = m.group(1) or m.group(2) or m.group(3)
    if m.group(3) and letter == "a" and re.match(r"a\s+\w", text[m.start():]):
        return None
    return _index(letter, n, bracketed=True)


def _option_at(text: str, pos: int, options: Sequence[str]) -> int | None:
    """The longest option whose text starts at ``pos`` (case-insensitive, then a non-word character)."""
    rest = text[pos:].lower()
    hits = [(len(o), i) for i, o in enumerate(options)
            if rest.startswith(o.lower()) and not rest[len(o):len(o) + 1].isalnum()]
    return max(hits)[1] if hits else None
