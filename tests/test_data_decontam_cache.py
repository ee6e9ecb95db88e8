"""decontaminate's on-disk evaluation index (``index_cache``): reused across runs and shards with the same
results, keyed by the evaluation files' bytes, and a damaged entry rebuilt instead of trusted."""

import json
import random

import numpy as np
import pytest
from data_utils import write_jsonl

from clinmega.data import array_cache, decontam
from clinmega.data.config import DecontamConfig


@pytest.fixture()
def sets(tmp_path):
    rng = random.Random(3)
    words = [f"w{i}" for i in range(400)]
    evals = [{"question": " ".join(rng.choice(words) for _ in range(30)), "opa": "a b", "opb": "c"} for _ in range(40)]
    docs = []
    for i in range(300):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(5, 60)))
        if i % 11 == 0:
            q = evals[i % 40]["question"].split()
            text += " " + " ".join(q[3:20])
        docs.append({"text": text})
    write_jsonl(tmp_path / "medmcqa.jsonl", evals)
    write_jsonl(tmp_path / "train.jsonl", docs)
    return tmp_path


def _run(tmp, out, cache, **kw):
    decontam._INDEXES.clear()  # the per-process cache would hide the disk one
    cfg = DecontamConfig(inputs=[str(tmp / "train.jsonl")], eval_sets=[str(tmp / "medmcqa.jsonl")],
                         output_dir=str(tmp / out), mode="report", workers=1, progress=False,
                         index_cache=str(cache) if cache else None, **kw)
    manifest = decontam.decontaminate(cfg)
    suffix = f"-{int(kw['shard'].split('/')[0]):05d}-of-{int(kw['shard'].split('/')[1]):05d}" if "shard" in kw else ""
    return manifest, (tmp / (out + suffix) / "flagged.jsonl").read_text()


def _same(a, b):
    strip = ("timing", "eval_index", "config")
    return {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


def test_second_run_reads_the_stored_index_and_finds_the_same(sets):
    cache = sets / "cache"
    plain, flagged = _run(sets, "plain", None)
    assert plain["eval_index"] == "built" and plain["documents_flagged"] >= 20
    first, flagged1 = _run(sets, "one", cache)
    assert first["eval_index"].startswith("built, stored in ")
    second, flagged2 = _run(sets, "two", cache)
    assert second["eval_index"].startswith("cache ")
    assert flagged == flagged1 == flagged2 and _same(plain, first) and _same(first, second)
    index = decontam.eval_index_for(DecontamConfig(eval_sets=[str(sets / "medmcqa.jsonl")], index_cache=str(cache)))
    assert isinstance(index.keys, np.memmap) and index._bitmap is not None  # mapped, prefilter stored too


def test_changed_evaluation_bytes_are_a_new_entry(sets):
    cache = sets / "cache"
    _run(sets, "one", cache)
    path = sets / "medmcqa.jsonl"
    lines = path.read_text().splitlines()
    lines[0] = json.dumps({"question": "entirely new words " * 5})  # same file name, other content
    path.write_text("\n".join(lines) + "\n")
    again, _ = _run(sets, "two", cache)
    assert again["eval_index"].startswith("built")
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_damaged_entry_is_reported_and_rebuilt(sets, caplog):
    cache = sets / "cache"
    _, flagged = _run(sets, "one", cache)
    (entry,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    keys = entry / "keys.npy"
    keys.write_bytes(keys.read_bytes()[:-40])  # a truncated copy
    assert "keys.npy" in array_cache.load(cache, entry.name)
    again, flagged2 = _run(sets, "two", cache)
    assert again["eval_index"].startswith("built, stored in ") and flagged2 == flagged
    assert any("cache unusable" in r.message for r in caplog.records)
    third, flagged3 = _run(sets, "three", cache)  # the entry was replaced by a whole one
    assert third["eval_index"].startswith("cache ") and flagged3 == flagged


def test_entry_without_its_metadata_is_never_read(tmp_path):
    array_cache.store(tmp_path, "k", {"a": np.arange(5)}, {"x": 1})
    arrays, meta = array_cache.load(tmp_path, "k")
    assert arrays["a"].tolist() == [0, 1, 2, 3, 4] and meta == {"x": 1}
    (tmp_path / "k" / array_cache.META).unlink()  # as after a writer killed before publishing it
    assert array_cache.load(tmp_path, "k") == "absent"


def test_shard_jobs_share_one_entry(sets):
    cache = sets / "cache"
    m0, _ = _run(sets, "sh", cache, shard="0/2")
    m1, _ = _run(sets, "sh", cache, shard="1/2")
    assert m0["eval_index"].startswith("built") and m1["eval_index"].startswith("cache ")
