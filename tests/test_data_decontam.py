"""decontaminate: planted overlaps found, no false positives on disjoint text, remove/report modes."""

import json
import random

import numpy as np
import pytest
from data_utils import write_jsonl

from clinmega.data.config import DecontamConfig
from clinmega.data.decontam import (
    build_eval_index,
    decontaminate,
    ngram_hashes,
    normalize_words,
)


def _vocab(prefix, n=3000):
    return [f"{prefix}{i}" for i in range(n)]


@pytest.fixture()
def corpus(tmp_path):
    rng = random.Random(0)
    eval_words, train_words = _vocab("ev"), _vocab("tr")  # disjoint vocabularies
    medqa = [
        {
            "question": " ".join(rng.choice(eval_words) for _ in range(40)),
            "options": {"A": "aspirin", "B": "heparin"},
            "answer_idx": "A",
        }
        for _ in range(50)
    ]
    medmcqa = [{"question": "short one", "opa": "x", "opb": "y"}]  # too short to check
    pubmedqa = [{"QUESTION": "q " * 3, "CONTEXTS": [" ".join(rng.choice(eval_words) for _ in range(60))]}]
    write_jsonl(tmp_path / "medqa.jsonl", medqa)
    write_jsonl(tmp_path / "medmcqa.jsonl", medmcqa)
    write_jsonl(tmp_path / "pubmedqa.jsonl", pubmedqa)
    docs, planted = [], {}
    for i in range(1500):
        text = " ".join(rng.choice(train_words) for _ in range(rng.randrange(5, 200)))
        if i % 97 == 5:  # plant 13+ consecutive words of an eval item, re-cased and re-punctuated
            src = medqa[i % 50]["question"].split()
            text += " ... " + ", ".join(w.upper() for w in src[10:25]) + "!"
            planted[i + 1] = "medqa.jsonl"
        if i == 600:
            ctx = pubmedqa[0]["CONTEXTS"][0].split()
            text = "Intro. " + " ".join(ctx[:13]) + " outro"
            planted[i + 1] = "pubmedqa.jsonl"
        if i == 700:  # 12 words only: below the n-gram size, must not be flagged
            text += " " + " ".join(medqa[0]["question"].split()[:12])
        docs.append({"text": text, "id": i})
    train = write_jsonl(tmp_path / "train.jsonl", docs, raw_lines={100: b"not json\n"})
    return tmp_path, train, planted


def test_planted_overlaps_found_exactly_and_removed(corpus):
    root, train, planted = corpus
    m = decontaminate(
        DecontamConfig(
            inputs=[str(train)],
            eval_sets=[str(root / "*qa.jsonl")],
            output_dir=str(root / "clean"),
            workers=2,
            chunk_mb=0.02,
            progress=False,
        )
    )
    flagged = [json.loads(x) for x in (root / "clean" / "flagged.jsonl").read_text().splitlines()]
    # the raw bad line was inserted at 0-based position 100, so documents after it shift by one line
    expected = {(doc_line + (doc_line > 100)): name for doc_line, name in planted.items()}
    assert {f["line"]: f["eval_sets"] for f in flagged} == {k: [v] for k, v in expected.items()}
    assert m["documents_flagged"] == len(planted)
    assert m["eval_sets"]["medmcqa.jsonl"]["items_too_short"] == 1
    assert m["eval_sets"]["medqa.jsonl"]["documents_flagged"] == len(planted) - 1
    assert m["unchecked_lines_passed_through"] == [{"malformed_json": 1}]
    kept = (root / "clean" / "train.jsonl").read_bytes().splitlines(keepends=True)
    original = train.read_bytes().splitlines(keepends=True)
    assert kept == [line for i, line in enumerate(original, start=1) if i not in expected]
    assert m["files"][0]["skipped"] == {"contaminated": len(planted)}


def test_report_mode_keeps_everything_and_no_false_positives_on_disjoint_text(corpus):
    root, train, _ = corpus
    rng, words = random.Random(1), _vocab("tr")
    clean_docs = [{"text": " ".join(rng.choice(words) for _ in range(300))} for _ in range(300)]
    disjoint = write_jsonl(root / "disjoint.jsonl", clean_docs)
    m = decontaminate(
        DecontamConfig(
            inputs=[str(disjoint)],
            eval_sets=[str(root / "medqa.jsonl")],
            output_dir=str(root / "rep"),
            mode="report",
            workers=1,
            progress=False,
        )
    )
    assert m["documents_flagged"] == 0 and m["totals"]["documents_written"] == 300
    assert (root / "rep" / "flagged.jsonl").read_text() == ""
    assert not (root / "rep" / "disjoint.jsonl").exists()


def test_ngram_hashing_normalises_and_is_order_sensitive():
    a = ngram_hashes("The Patient, had FEVER!", 2)
    b = ngram_hashes("the patient had fever", 2)
    assert np.array_equal(a, b) and len(a) == 3
    assert not np.array_equal(ngram_hashes("fever had patient the", 2), b)
    assert normalize_words("ﬁbrosis Ｂ12") == ["fibrosis", "b12"]  # NFKC
    assert len(ngram_hashes("too short", 13)) == 0


def test_eval_index_is_sorted_unique(tmp_path):
    write_jsonl(tmp_path / "e.jsonl", [{"question": "a b c d e"}, {"question": "a b c d e f"}])
    idx = build_eval_index([tmp_path / "e.jsonl"], ["question"], 3)
    assert len(idx.keys) == 4 and np.all(np.diff(idx.keys.astype(np.float64)) != 0)
    assert len(idx.lookup(ngram_hashes("x a b c y", 3))) == 1


def test_chat_messages_field_is_checked_per_message(tmp_path):
    q = "which antibiotic is first line for community acquired pneumonia in a healthy adult outpatient"
    write_jsonl(tmp_path / "eval.jsonl", [{"question": q, "options": ["amoxicillin", "vancomycin"]}])
    chats = [
        {"messages": [{"role": "user", "content": q.upper() + "?"}, {"role": "assistant", "content": "Amoxicillin."}]},
        {"messages": [{"role": "user", "content": "unrelated"}, {"role": "assistant", "content": "fine"}]},
    ]
    write_jsonl(tmp_path / "chat.jsonl", chats)
    m = decontaminate(
        DecontamConfig(
            inputs=[str(tmp_path / "chat.jsonl")],
            eval_sets=[str(tmp_path / "eval.jsonl")],
            output_dir=str(tmp_path / "out"),
            text_field="messages",
            workers=1,
            progress=False,
        )
    )
    assert m["documents_flagged"] == 1 and m["files"][0]["documents_written"] == 1


def test_release_layouts_pubmedqa_json_and_mmlu_csv_are_indexed(tmp_path):
    """Evaluation sets in their release layouts (PMID-keyed JSON, headerless CSV) are read by the
    evaluation loaders; a training document quoting one of their items is flagged."""
    from clinmega.benchmark_files import load_file
    from clinmega.evaluation.benchmarks import SYNTHETIC_DIR

    pubmed = SYNTHETIC_DIR / "pubmedqa" / "synthetic_pubmedqa_test.json"
    mmlu = sorted((SYNTHETIC_DIR / "mmlu").rglob("*test*.csv"))[0]
    context = load_file(pubmed)[3].context.split()
    docs = [{"text": "Background reading: " + " ".join(context[:20]) + " end."},
            {"text": "An unrelated sentence about trains and rivers and bread. " * 5}]
    train = write_jsonl(tmp_path / "train.jsonl", docs)
    m = decontaminate(DecontamConfig(inputs=[str(train)], eval_sets=[str(pubmed), str(mmlu)],
                                     output_dir=str(tmp_path / "out"), mode="report", workers=1,
                                     progress=False))
    flagged = [json.loads(line) for line in (tmp_path / "out" / "flagged.jsonl").read_text().splitlines()]
    assert m["documents_flagged"] == 1 and flagged[0]["line"] == 1
