"""The vectorised n-gram scan against a straightforward reference: sets of normalised word tuples."""

import json
import random
import re
import unicodedata

import numpy as np
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


@pytest.fixture(params=["compiled", "numpy"])
def ngram_pass(request, monkeypatch):
    """Run a test through the compiled n-gram pass and through the numpy one."""
    from clinmega.data import decontam

    if request.param == "compiled":
        assert decontam._kernel is not None, "the C extension clinmega.data._ngrams was not built (pip install -e .)"
    else:
        monkeypatch.setattr(decontam, "_kernel", None)
    return request.param


@pytest.mark.parametrize("min_matches", [1, 3])
def test_flags_exactly_the_reference_documents(tmp_path, min_matches, ngram_pass):
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


def test_batch_hashes_equal_per_text_hashes_and_never_span_texts(ngram_pass):
    rng = random.Random(0)
    texts = [_sentence(rng, rng.randint(0, 40)) for _ in range(200)]
    h, owner = batch_ngram_hashes(texts, 4)
    for i, t in enumerate(texts):
        assert (h[owner == i] == ngram_hashes(t, 4)).all()
        assert len(ngram_hashes(t, 4)) == max(0, len(re.findall(r"\w+", unicodedata.normalize("NFKC", t).lower())) - 3)
    a, b = ngram_hashes("alpha beta gamma", 3), ngram_hashes("alpha beta gammb", 3)
    assert len(a) == len(b) == 1 and a[0] != b[0]


# Characters where NFKC depends on the neighbours or changes the length: combining marks after ASCII
# letters, ligatures, fractions, Hangul jamo that compose, halfwidth kana with a voiced mark, the Kelvin
# sign, micro, superscripts, fullwidth forms; and (CASE) where lower case does: final sigma, dotted capital I.
CASE = ["ΟΔΟΣ", "Σ", "İstanbul"]
TRICKY = ["e\u0301", "\u0301", "ﬁ", "½", "\u1100\u1161\u11a8", "\u1100", "\u1161", "ｶﾞ", "ﾞ", "K", "µg", "×10⁹/L", "Ｂ12", "Straße", "naïve", "中文", "x_1", "a\u0308\u0301", "\u00c5", "A\u030a", "㎎",
          "fever", "mg", "°C", "—", "Ω", "ǅ"]
_P, _M = 0x100000001B3, (1 << 64) - 1


def _fmix(x):
    x ^= x >> 33
    x = x * 0xFF51AFD7ED558CCD & _M
    x ^= x >> 33
    x = x * 0xC4CEB9FE1A85EC53 & _M
    return x ^ (x >> 33)


def _ref_hashes(text, n):
    """The n-gram hashes spelt out word by word: normalise as the module doc says, hash each word as the
    polynomial of its code points, mixed, and each n-gram as the polynomial of its words' hashes."""
    words = []
    for w in re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower()):
        h = 0
        for ch in w:
            h = (h * _P + ord(ch)) & _M
        words.append(_fmix(h))
    out = []
    for i in range(len(words) - n + 1):
        h = 0
        for w in words[i : i + n]:
            h = (h * _P + w) & _M
        out.append(h)
    return out


@pytest.mark.parametrize("seed,case", [(0, False), (1, False), (2, True)])
def test_batch_normalisation_equals_per_text_nfkc_and_lower(seed, case, ngram_pass):
    rng = random.Random(seed)
    pool = TRICKY + [w for w in WORDS if "Σ" not in w] + (CASE if case else [])
    texts = []
    for _ in range(300):
        parts = [rng.choice(pool) + rng.choice(["", "", " ", " ", ",", "\n", "-"]) for _ in range(rng.randint(0, 30))]
        texts.append(("" if rng.random() < 0.7 else rng.choice(TRICKY)) + " ".join(parts))
    texts += ["", "\u0301", "ﬁ ﬁ", "Ａ\u0301 b"]
    h, owner = batch_ngram_hashes(texts, 2)
    for i, t in enumerate(texts):
        assert h[owner == i].tolist() == _ref_hashes(t, 2), t


def test_index_cut_into_parts_on_workers_equals_a_plain_first_owner_table(tmp_path, monkeypatch):
    """Evaluation files cut into many byte ranges, indexed on 2 workers: every n-gram with the first
    (set, line) that holds it, the per-set counts, exactly as a word-tuple table read in file order
    (blank lines counted as lines, a BOM on line 1, options as a list or as fields)."""
    from clinmega.data import decontam

    rng = random.Random(5)
    n = 3
    sets = []
    for si in range(2):
        lines = []
        for i in range(150):
            if i % 17 == 5:
                lines.append(b"\n")
                continue
            q = _sentence(rng, rng.randint(0, 12))
            rec = {"question": q, "options": [_sentence(rng, 4), _sentence(rng, 1)]} if i % 2 else \
                {"Question": q, "opa": _sentence(rng, 5), "id": i}
            lines.append(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
        path = tmp_path / f"eval{si}.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" * (si == 0) + b"".join(lines))
        sets.append((path, lines))
    first, stats = {}, {}
    for si, (path, lines) in enumerate(sets):
        st = {"items": 0, "items_too_short": 0, "ngrams": 0}
        for line_no, raw in enumerate(lines, start=1):
            if raw == b"\n":
                continue
            rec = json.loads(raw)
            texts = [v for k, v in rec.items() if k.lower() in ("question", "opa")]
            texts += rec.get("options", [])
            grams = [g for t in texts for g in _ref_ngram_list(t, n)]
            st["items"] += 1
            st["items_too_short"] += not grams
            st["ngrams"] += len(grams)
            for g in grams:
                first.setdefault(g, (si, line_no))
        stats[path.name] = st
    monkeypatch.setattr(decontam, "EVAL_PART_BYTES", 300)
    paths = [p for p, _ in sets]
    assert len(decontam._eval_parts(paths, ["question"], n, 2)) == 8  # 4 byte ranges a file
    idx = decontam.build_eval_index(paths, ["question", "options", "opa"], n, workers=2)
    got = {int(k): (int(s), int(i)) for k, s, i in zip(idx.keys, *idx.owners(np.arange(len(idx.keys))))}
    want = {ngram_hashes(" ".join(g), n)[0].item(): owner for g, owner in first.items()}
    assert got == want
    for name, st in stats.items():
        assert {k: idx.stats[name][k] for k in st} == st


def _ref_ngram_list(text, n):
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


@pytest.mark.parametrize("local_fixes", [4096, 0])  # out-of-order runs mended one by one / one argsort
def test_stable_key_order_equals_stable_argsort_when_high_bits_collide(monkeypatch, local_fixes):
    """The index's sort (positions packed into the keys' low bits, then fixed up) against numpy's stable
    argsort, on keys that share their high bits but differ in the low ones, and on repeated keys."""
    from clinmega.data import decontam
    from clinmega.data.decontam import _first_of_each, _stable_key_order

    monkeypatch.setattr(decontam, "_MAX_LOCAL_FIXES", local_fixes)

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, 5000, dtype=np.uint64) * np.uint64(2)
    keys[:300] = keys[300:600] | np.uint64(2**12 - 2)  # same high bits, larger low ones, earlier
    keys[600:900] = keys[300:600] & ~np.uint64(2**12 - 1)  # ... smaller low ones, later
    keys[rng.integers(0, 5000, 1500)] = keys[rng.integers(0, 5000, 1500)]  # repeats
    keys[-3:] = np.uint64(2**64 - 1)
    order, ranked = _stable_key_order(keys)
    assert order.tolist() == np.argsort(keys, kind="stable").tolist()
    assert (ranked == np.sort(keys)).all()
    line = np.arange(len(keys))
    u, first = _first_of_each(keys, line)
    assert u.tolist() == sorted(set(keys.tolist()))
    assert first.tolist() == [int(np.flatnonzero(keys == k)[0]) for k in u]


def test_one_lookup_fold_of_simple_characters_equals_the_reference():
    """Batches whose every character folds alone (fullwidth letters, the micro sign, a fullwidth low line
    that NFKC turns into a word character) take the one-table path and still equal the reference."""
    from clinmega.data.decontam import _folded_codepoints

    rng = random.Random(3)
    pool = ["x\uff3fy", "\uff21\uff22C", "5\u00b5g", "\uff44ose", "Stra\u00dfe", "\u00c9t\u00c9", "caf\u00e9"]
    pool += [w for w in WORDS if w.isascii()]
    texts = [" ".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(200)]
    assert _folded_codepoints("\n".join(texts))[1] is not None  # the fast path is the one tested here
    h, owner = batch_ngram_hashes(texts, 2)
    for i, t in enumerate(texts):
        assert h[owner == i].tolist() == _ref_hashes(t, 2), t


def test_item_fields_never_share_an_ngram_and_a_literal_cut_character_is_text(tmp_path, ngram_pass):
    """An item's strings are hashed as one text cut at NUL: no n-gram spans two fields, every n-gram of
    each field is there, and a NUL written in a field (JSON \\u0000) separates words like a space."""
    from clinmega.data import decontam

    n = 3
    items = [{"question": "alpha beta gamma delta", "opa": "epsilon zeta", "opb": "eta theta iota"},
             {"question": "one two\u0000three four", "options": ["five six", "seven\u0000eight nine"]},
             {"question": "a b", "opa": "c d"}]  # no field of n words: no n-gram across the fields either
    write_jsonl(tmp_path / "eval.jsonl", items)
    idx = decontam.build_eval_index([tmp_path / "eval.jsonl"], ["question", "options", "opa", "opb"], n)
    want = set()
    for it in items:
        for v in it.values():
            for t in (v if isinstance(v, list) else [v]):
                want |= {ngram_hashes(" ".join(g), n)[0].item() for g in _ref_ngram_list(t.replace("\0", " "), n)}
    assert set(idx.keys.tolist()) == want
    assert ngram_hashes("gamma delta epsilon", n)[0].item() not in want  # across two fields
    assert idx.stats["eval.jsonl"]["items_too_short"] == 1


def test_prefilter_bitmap_holds_exactly_the_keys_top_bits():
    """The bitmap built from sorted keys (distinct bits of a byte summed) equals one built bit by bit."""
    from clinmega.data.decontam import EvalIndex

    rng = np.random.default_rng(1)
    for size in (1, 7, 5000):
        keys = np.unique(rng.integers(0, 2**64 - 1, size, dtype=np.uint64, endpoint=True))
        keys[: len(keys) // 3] = keys[: len(keys) // 3] & np.uint64(0xFFFF000000000000)  # shared bytes and bits
        keys = np.unique(keys)
        index = EvalIndex(keys, [], [], {})
        index.prefilter()
        want = np.zeros_like(index._bitmap)
        top = (keys >> index._shift).tolist()
        for t in top:
            want[t >> 3] |= 1 << (t & 7)
        assert (index._bitmap == want).all()


def test_unreadable_evaluation_lines_are_refused_naming_the_file(tmp_path):
    """A malformed line or a non-object line in an evaluation file stops the run with the file and count
    (such a file would otherwise be checked only in part)."""
    from clinmega.data import decontam

    path = tmp_path / "medqa.jsonl"
    path.write_text('{"question": "a b c d"}\n{"question": broken\n[1, 2]\n{"question": "e f g h"}\n')
    with pytest.raises(ValueError, match=r"medqa\.jsonl: 2 evaluation line\(s\) are not JSON objects"):
        decontam.build_eval_index([path], ["question"], 3)


@pytest.mark.parametrize("n", [1, 2, 5, 13])
def test_compiled_ngram_pass_equals_the_numpy_one(n):
    """Hashes and owners of the C pass equal numpy's on ASCII (one byte a character) and non-ASCII
    batches, with and without NUL segment cuts, empty texts, texts without words and one-word texts."""
    from clinmega.data import decontam

    assert decontam._kernel is not None, "the C extension clinmega.data._ngrams was not built (pip install -e .)"
    rng = random.Random(n)
    ascii_words = [w for w in WORDS if w.isascii()]
    for trial in range(30):
        pool = ascii_words if trial % 2 else WORDS + TRICKY
        texts = []
        for _ in range(rng.randint(1, 40)):
            k = rng.choice([0, 0, 1, 3, 12, 40])
            texts.append("".join(rng.choice(pool) + rng.choice([" ", ", ", "\x00", "\n", "--", "  "])
                                 for _ in range(k)))
        for segments in (False, True):
            cps, starts, is_word = decontam._normalised_codepoints(texts)
            if is_word is None:
                is_word = decontam._word_mask(cps)
            want_h, want_o = decontam._numpy_ngrams(cps, is_word, starts, n, segments)
            got_h, got_o = decontam.batch_ngram_hashes(texts, n, segments=segments)
            assert got_h.tolist() == want_h.tolist() and got_o.tolist() == want_o.tolist()
