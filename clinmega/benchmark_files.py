"""Benchmark files: one local file in the layout of a public release -> a list of `Item`.

The readers both the evaluation loaders (:mod:`clinmega.evaluation.benchmarks`, which adds the
per-benchmark directory layout) and decontamination (:mod:`clinmega.data.decontam`, which indexes
the items' text) use; it sits below both packages.

Every reader turns one file into `Item`s (question, options, index of the correct option, optional
context and explanation). Problems are collected with file and line (or record key) and raised together
as one `BenchmarkFormatError`: an item is never skipped silently.

Accepted layouts (the format of a file is detected from its extension and the keys of each record):

* **MedQA** (jind11/MedQA `questions/US/*.jsonl`, 4-option `US/4_options/phrases_no_exclude_*.jsonl` and
  5-option `US/*.jsonl`; also the GBaker/MedQA-USMLE-4-options export): one JSON object per line,
  ``{"question": str, "options": {"A": str, "B": str, ...}, "answer_idx": "A".."E", "answer": str?,
  "meta_info": str?}``. ``answer`` (the option text), when present, must equal ``options[answer_idx]``.
* **MedQA, HF 4-option export** (GBaker/MedQA-USMLE-4-options-hf, lm-eval's ``medqa_4options`` source):
  ``{"id"?, "sent1": question, "ending0".."ending3": options, "label": 0-3}``.
* **MedMCQA** (medmcqa/medmcqa GitHub release `train.json`/`dev.json`, and the HF
  `openlifescienceai/medmcqa` export): one JSON object per line, ``{"id", "question", "opa", "opb",
  "opc", "opd", "cop", "exp"?, "subject_name"?, "choice_type"?}``. ``cop`` is **1-4 in the GitHub
  release** and **0-3 in the HF export** (whose hidden test split has ``cop = -1``). The base is inferred
  per file: a 0 means 0-based, a 4 means 1-based; a file holding only 1..3 is ambiguous and needs
  ``cop_base=`` (``load_file(..., cop_base=0|1)``, CLI ``--medmcqa-cop-base``). Rows without an answer
  (``cop`` -1 or missing) are errors.
* **PubMedQA** (pubmedqa/pubmedqa `ori_pqal.json`, `test_set.json`): one JSON object keyed by PMID,
  ``{"<pmid>": {"QUESTION": str, "CONTEXTS": [str], "LABELS": [str]?, "final_decision":
  "yes"|"no"|"maybe", "LONG_ANSWER": str?}}``. Also the HF `pubmed_qa` (pqa_labeled) rows as JSON
  lines: ``{"pubid", "question", "context": {"contexts": [str], "labels": [str]}, "final_decision",
  "long_answer"?}``. Options are always ``["yes", "no", "maybe"]``; the context is the abstract sections,
  prefixed by their labels when given ("OBJECTIVE: ..."); ``passages`` keeps the sections as written
  (lm-eval joins them unlabelled).
* **MMLU** (hendrycks/test `data/{dev,val,test}/<subject>_{dev,val,test}.csv`): CSV, no header, columns
  ``question, A, B, C, D, answer`` with the answer a letter.
* **HF multiple choice** (e.g. `cais/mmlu` rows exported to JSON lines, lm-eval's MMLU source): ``{"question", "choices": [str],
  "answer": int | "A".."Z", "subject"?}``.
* **Normalized** (clinmega's own): ``{"id": str, "question": str, "options": [str], "answer": int,
  "context": str?, "explanation": str?}``.

Question, option and passage texts are kept as written (a field that is empty after stripping is an
error); each prompt format decides about surrounding whitespace (`prompts`, `lm_eval_tasks`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PUBMEDQA_OPTIONS = ("yes", "no", "maybe")
MAX_REPORTED_ERRORS = 20


@dataclass(frozen=True)
class Item:
    """One multiple-choice question; ``answer`` indexes ``options``."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: int
    context: str | None = None
    explanation: str | None = None
    benchmark: str = ""
    passages: tuple[str, ...] = ()  # PubMedQA: the abstract's sections as written, without labels

    def __post_init__(self) -> None:
        if len(self.options) < 2:
            raise ValueError(f"item {self.id}: needs at least 2 options, got {len(self.options)}")
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"item {self.id}: answer {self.answer} outside 0..{len(self.options) - 1}")


class BenchmarkFormatError(ValueError):
    """Malformed records; ``problems`` lists ``"file:line: reason"`` for each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_REPORTED_ERRORS]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        super().__init__(f"{len(problems)} malformed benchmark record(s):\n  " + "\n  ".join(shown) + tail)


def load_file(path: str | Path, cop_base: int | None = None) -> list[Item]:
    """Read one benchmark file of any accepted layout (see the module docstring)."""
    path = Path(path)
    if path.suffix == ".csv":
        records = list(_csv_records(path))
    elif path.suffix == ".jsonl" or _looks_like_jsonl(path):
        records = list(_jsonl_records(path))
    else:
        records = list(_json_records(path))
    items: list[Item] = []
    problems: list[str] = []
    medmcqa_base = _infer_cop_base(path, records, cop_base, problems)
    for where, record in records:
        try:
            if isinstance(record, Exception):
                raise record
            items.append(_parse_record(record, where, medmcqa_base))
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"{where}: {e}")
    if problems:
        raise BenchmarkFormatError(problems)
    if not items:
        raise BenchmarkFormatError([f"{path}: no items"])
    return items


# ---------------------------------------------------------------------------------------------- readers
Record = tuple[str, "dict[str, Any] | list[str] | Exception"]


def _looks_like_jsonl(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        first = f.readline().strip()
        second = f.readline().strip()
    return first.startswith("{") and first.endswith("}") and second.startswith("{")


def _jsonl_records(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            yield where, record if isinstance(record, dict) else TypeError(f"expected an object, got {type(record).__name__}")


def _json_records(path: Path) -> Iterator[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        yield f"{path}:{e.lineno}", ValueError(f"invalid JSON ({e.msg} at column {e.colno})")
        return
    if isinstance(data, dict):  # PubMedQA: keyed by PMID
        for key, record in data.items():
            if isinstance(record, dict):
                yield f"{path}:[{key}]", {"_key": key, **record}
            else:
                yield f"{path}:[{key}]", TypeError(f"expected an object, got {type(record).__name__}")
    elif isinstance(data, list):
        for n, record in enumerate(data):
            yield f"{path}:[{n}]", record if isinstance(record, dict) else TypeError("expected an object")
    else:
        yield str(path), TypeError(f"expected a JSON object or list, got {type(data).__name__}")


def _csv_records(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            yield f"{path}:{reader.line_num}", row


# ---------------------------------------------------------------------------------------------- parsers
def _parse_record(record: dict | list, where: str, cop_base: int | None) -> Item:
    if isinstance(record, list):
        return _mmlu_csv(record, where)
    for keys, parser in _PARSERS:
        if keys <= record.keys():
            return parser(record, where, cop_base)
    raise ValueError(f"unrecognised record layout, keys {sorted(record)}")


def _text(record: dict, key: str) -> str:
    """The field as written (prompt formats strip or keep surrounding whitespace)."""
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def _item_id(record: dict, where: str, *keys: str) -> str:
    for k in keys:
        if record.get(k) not in (None, ""):
            return str(record[k])
    return where.rsplit("/", 1)[-1]


def _medqa(record: dict, where: str, _: int | None) -> Item:
    options = record["options"]
    if not isinstance(options, dict) or list(options) != list(LETTERS[: len(options)]):
        raise ValueError(f"'options' must be an object keyed A, B, C, ... in order, got {options!r}")
    letter = record["answer_idx"]
    if letter not in options:
        raise ValueError(f"answer_idx {letter!r} is not one of {list(options)}")
    if "answer" in record and record["answer"].strip() != str(options[letter]).strip():
        raise ValueError(f"answer {record['answer']!r} differs from options[{letter}] {options[letter]!r}")
    return Item(_item_id(record, where, "id"), _text(record, "question"),
                tuple(_text(options, k) for k in options), LETTERS.index(letter))


def _medqa_hf(record: dict, where: str, _: int | None) -> Item:
    keys = [f"ending{k}" for k in range(len(LETTERS)) if f"ending{k}" in record]
    if keys != [f"ending{k}" for k in range(len(keys))]:
        raise ValueError(f"options must be ending0, ending1, ... without gaps, got {keys}")
    label = record["label"]
    if not isinstance(label, int) or isinstance(label, bool):
        raise ValueError(f"'label' must be an integer index, got {label!r}")
    options = tuple(_text(record, k) for k in keys)
    return Item(_item_id(record, where, "id"), _text(record, "sent1"), options, _answer_index(label, len(options)))


def _medmcqa(record: dict, where: str, cop_base: int | None) -> Item:
    cop = record["cop"]
    if not isinstance(cop, int) or cop < 0:
        raise ValueError(f"no usable answer: cop={cop!r} (hidden test split?)")
    if cop_base is None:
        raise ValueError("cop base (0 or 1) unknown")
    answer = cop - cop_base
    if not 0 <= answer < 4:
        raise ValueError(f"cop {cop} outside the {cop_base}-based range")
    options = tuple(_text(record, k) for k in ("opa", "opb", "opc", "opd"))
    exp = record.get("exp")
    return Item(_item_id(record, where, "id"), _text(record, "question"), options, answer,
                explanation=exp.strip() if isinstance(exp, str) and exp.strip() else None)


def _pubmedqa(record: dict, where: str, _: int | None) -> Item:
    upper = "QUESTION" in record
    question = _text(record, "QUESTION" if upper else "question")
    ctx = record["CONTEXTS"] if upper else record["context"]["contexts"]
    labels = record.get("LABELS") if upper else record["context"].get("labels")
    if not isinstance(ctx, list) or not ctx or not all(isinstance(c, str) for c in ctx):
        raise ValueError("contexts must be a non-empty list of strings")
    passages = tuple(ctx)
    if labels and len(labels) == len(ctx):
        ctx = [f"{label}: {c}" for label, c in zip(labels, ctx)]
    decision = record["final_decision"]
    if decision not in PUBMEDQA_OPTIONS:
        raise ValueError(f"final_decision {decision!r} is not one of {PUBMEDQA_OPTIONS}")
    long_answer = record.get("LONG_ANSWER" if upper else "long_answer")
    return Item(_item_id(record, where, "_key", "pubid"), question, PUBMEDQA_OPTIONS,
                PUBMEDQA_OPTIONS.index(decision), context="\n".join(c.strip() for c in ctx), passages=passages,
                explanation=long_answer.strip() if isinstance(long_answer, str) and long_answer.strip() else None)


def _answer_index(value: Any, n: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"answer must be an index or a letter, got {value!r}")
    if isinstance(value, int):
        index = value
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    else:
        raise ValueError(f"answer must be an index or a letter, got {value!r}")
    if not 0 <= index < n:
        raise ValueError(f"answer {value!r} outside the {n} options")
    return index


def _choices(record: dict, where: str, _: int | None) -> Item:
    choices = record["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, (str, int, float)) for c in choices):
        raise ValueError("'choices' must be a list of strings")
    options = tuple(str(c) for c in choices)
    if not all(o.strip() for o in options):
        raise ValueError("empty choice")
    return Item(_item_id(record, where, "id"), _text(record, "question"), options,
                _answer_index(record["answer"], len(options)))


def _normalized(record: dict, where: str, _: int | None) -> Item:
    options = record["options"]
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise ValueError("'options' must be a list of non-empty strings")
    answer = record["answer"]
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise ValueError(f"'answer' must be an integer index, got {answer!r}")
    context, exp = record.get("context"), record.get("explanation")
    return Item(_item_id(record, where, "id"), _text(record, "question"), tuple(options),
                _answer_index(answer, len(options)), context=context or None, explanation=exp or None)


def _mmlu_csv(row: list[str], where: str) -> Item:
    if len(row) < 4:
        raise ValueError(f"expected columns question, options..., answer letter; got {len(row)} column(s)")
    *fields, answer = row
    question, options = fields[0], tuple(fields[1:])
    if not question.strip() or not all(o.strip() for o in options):
        raise ValueError("empty question or option")
    return Item(where.rsplit("/", 1)[-1], question, options, _answer_index(answer, len(options)))


_PARSERS: list[tuple[set[str], Callable[[dict, str, int | None], Item]]] = [
    ({"question", "options", "answer_idx"}, _medqa),
    ({"sent1", "ending0", "ending1", "label"}, _medqa_hf),
    ({"question", "opa", "opb", "opc", "opd", "cop"}, _medmcqa),
    ({"QUESTION", "CONTEXTS", "final_decision"}, _pubmedqa),
    ({"question", "context", "final_decision"}, _pubmedqa),
    ({"question", "choices", "answer"}, _choices),
    ({"question", "options", "answer"}, _normalized),
]


def _infer_cop_base(path: Path, records: list[Record], cop_base: int | None, problems: list[str]) -> int | None:
    cops = {r["cop"] for _, r in records if isinstance(r, dict) and isinstance(r.get("cop"), int)}
    if not cops or cop_base is not None:
        return cop_base
    if 0 in cops and 4 in cops:
        problems.append(f"{path}: MedMCQA 'cop' holds both 0 and 4: neither 0-based nor 1-based")
        return None
    if 0 in cops:
        return 0
    if 4 in cops:
        return 1
    problems.append(f"{path}: MedMCQA 'cop' values {sorted(cops)} fit both 0-based (HF) and 1-based (GitHub) "
                    "releases; pass cop_base=0 or 1 (--medmcqa-cop-base)")
    return None
