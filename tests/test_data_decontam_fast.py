"""The vectorised n-gram scan against a straightforward reference: sets of normalised word tuples."""

import json
import random
import re
import unicodedata

import pytest
from data_utils import write_jsonl

from clinmega.data.config import DecontamConfig
from clinmega.data.decontam import batch_ngram_hashes, decontaminate, ngram_hashes

WORDS = ("fever cough Patient HEART rate mg dose day twice é naïve Straße ﬁbrosis Ｂ12 Σίσυφος 中文 x_1 "
         "stage pain acute renal 45yo").split()


def _ref_ngrams(text, n):
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _sentence(rng, k):
    return " ".join(rng.choice(WORDS) + rng.choice(["", "", ",", ".", "!", " -", "\n"]) for _ in range(k))


@pytest.mark.parametrize("min_matches", [1, 3])
def test_flags_exactly_the_reference_documents(tmp_path, min_matches):
    rng = random.Random(min_matches)
    n = 5
    evals = [{"question": _sentence(rng, rng.randint(3, 30)), "options": [_sentence(rng, 6), "B"]} for _ in range(60)]
    docs = []
    for i in range(400):
        text = _sentence(rng, rng.randint(0, 80))
        if i % 7 == 0:  # planted: a slice of an evaluation question, re-cased and re-punctuated
            q = rng.choice(evals)["question"].split()
            a = rng.randint(0, max(0, len(q) - n))
            text += " " + " ".join(w.upper() if rng.random() < 0.3 else w for w in q[a : a + n + rng.randint(0, 4)])
        docs.append({"text": text + " " + _sentence(rng, rng.randint(0, 10))})
    write_jsonl(tmp_path / "eval.jsonl", evals)
    write_jsonl(tmp_path / "train.jsonl", docs)
    eval_grams = set()
    for e in evals:
        for t in [e["question"], *e["options"]]:
            eval_grams |= _ref_ngrams(t, n)
    expected = {}
    for line, d in enumerate(docs, start=1):
        shared = len(_ref_ngrams(d["text"], n) & eval_grams)
        if shared >= min_matches:
            expected[line] = shared
    assert len(expected) >= 10  # planted ones
    for workers, chunk_mb in ((1, 64.0), (2, 0.01)):
        out = tmp_path / f"out{workers}"
        decontaminate(DecontamConfig(inputs=[str(tmp_path / "train.jsonl")], eval_sets=[str(tmp_path / "eval.jsonl")],
                                     output_dir=str(out), ngram=n, min_matches=min_matches, mode="report",
                                     workers=workers, chunk_mb=chunk_mb, progress=False))
        got = {r["line"]: r["matched_ngrams"] for r in map(json.loads, (out / "flagged.jsonl").read_text().splitlines())}
        assert got == expected


def test_batch_hashes_equal_per_text_hashes_and_never_span_texts():
    rng = random.Random(0)
    texts = [_sentence(rng, rng.randint(0, 40)) for _ in range(200)]
    h, owner = batch_ngram_hashes(texts, 4)
    for i, t in enumerate(texts):
        assert (h[owner == i] == ngram_hashes(t, 4)).all()
        assert len(ngram_hashes(t, 4)) == max(0, len(re.findall(r"\w+", unicodedata.normalize("NFKC", t).lower())) - 3)
    a, b = ngram_hashes("alpha beta gamma", 3), ngram_hashes("alpha beta gammb", 3)
    assert len(a) == len(b) == 1 and a[0] != b[0]
