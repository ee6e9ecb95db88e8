"""prepare pretrain: token-exact round trip through megatron-core, bad-input accounting, atomicity."""

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from data_utils import random_text, sp_reference, write_jsonl

from clinmega.data import pretrain
from clinmega.data.config import PretrainPrepConfig
from clinmega.data.pretrain import is_complete, output_paths, prepare_pretrain


def _corpus(tmp_path: Path, n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng, rng.randrange(1, 400)) for _ in range(n)]


def _read_all(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_round_trip_token_exact_all_formats_and_worker_invariant(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _corpus(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"meta": {"body": t}} for t in texts[:300]])
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write("".join(json.dumps({"meta": {"body": t}}) + "\n" for t in texts[300:450]).encode())
    pq.write_table(pa.table({"meta": [{"body": t} for t in texts[450:]]}), tmp_path / "c.parquet", row_group_size=40)
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"), str(tmp_path / "*.parquet")]

    outs = {}
    for workers in (1, 2):
        cfg = PretrainPrepConfig(
            inputs=inputs,
            output_prefix=str(tmp_path / f"out{workers}"),
            text_field="meta.body",
            workers=workers,
            chunk_mb=0.05,
            progress=False,
        )
        m = prepare_pretrain(cfg)
        assert m["totals"]["documents_written"] == len(texts) and m["totals"]["documents_skipped"] == 0
        assert m["output"]["dtype"] == "uint16" and m["output"]["bos_written"] is True
        outs[workers] = output_paths(cfg.output_prefix)["bin"].read_bytes()
    assert outs[1] == outs[2]  # sharding does not change the output

    sp = sp_reference("mistral-v1")
    expected = [[1] + ids + [2] for ids in sp.encode(texts)]
    assert _read_all(tmp_path / "out2") == expected
    assert m["totals"]["tokens"] == sum(map(len, expected))
    assert [f["documents_written"] for f in m["files"]] == [300, 150, 150]


def test_no_bos_option(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world"}])
    prepare_pretrain(
        PretrainPrepConfig(
            inputs=[str(tmp_path / "a.jsonl")],
            output_prefix=str(tmp_path / "o"),
            add_bos=False,
            workers=1,
            progress=False,
        )
    )
    assert _read_all(tmp_path / "o") == [sp_reference("mistral-v1").encode("hello world") + [2]]


def test_gpt_dataset_reads_prepared_data(tmp_path):
    from clinmega.data.blend import build_blend
    from clinmega.data.config import BlendConfig, BlendSource

    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in _corpus(tmp_path, 300)])
    prepare_pretrain(
        PretrainPrepConfig(
            inputs=[str(tmp_path / "a.jsonl")], output_prefix=str(tmp_path / "d"), workers=1, progress=False
        )
    )
    blend = build_blend(
        BlendConfig(
            sources=[BlendSource("only", str(tmp_path / "d"), weight=1.0)],
            seq_length=32,
            train_samples=50,
            split="100,0,0",
            cache_dir=str(tmp_path / "cache"),
        )
    )
    sample = blend.train[3]
    assert sample["tokens"].shape == (32,) and sample["labels"].shape == (32,)
    assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()
    stream = np.concatenate([np.asarray(x) for x in _read_all(tmp_path / "d")])
    tokens = sample["tokens"].numpy()
    windows = np.lib.stride_tricks.sliding_window_view(stream, 32)
    assert (windows == tokens).all(axis=1).any()  # the sample is a real window of some document order


BAD = {
    2: b"{not json\n",
    5: b"\n",
    7: b'{"other": "x"}\n',
    9: b'{"text": "   "}\n',
    11: b'{"text": 42}\n',
    13: b"[1, 2]\n",
    15: b'{"text": "caf\xe9"}\n',
    17: b'{"text": "lone \\ud800 surrogate"}\n',
}
REASONS = {
    2: "malformed_json",
    5: "blank_line",
    7: "missing_field",
    9: "empty",
    11: "wrong_type",
    13: "not_an_object",
    15: "non_utf8",
    17: "non_utf8",
}


def test_every_bad_input_kind_is_counted_with_file_and_line(tmp_path):
    rng = random.Random(3)
    good = [random_text(rng, 30) for _ in range(3000)] + ["word " * 900]  # last one is too long
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": t} for t in good], raw_lines=BAD)
    m = prepare_pretrain(
        PretrainPrepConfig(
            inputs=[str(path)],
            output_prefix=str(tmp_path / "o"),
            max_tokens=500,
            workers=2,
            chunk_mb=0.02,
            progress=False,
        )
    )
    f = m["files"][0]
    expected = {}
    for r in REASONS.values():
        expected[r] = expected.get(r, 0) + 1
    expected["too_long"] = 1
    assert f["skipped"] == expected
    assert f["documents_read"] == len(good) + len(BAD) and f["documents_written"] == len(good) - 1
    lines = {(e["line"], e["reason"]) for e in f["examples"]}
    assert {(pos + 1, REASONS[pos]) for pos in BAD} <= lines  # absolute 1-based line numbers
    assert (len(good) + len(BAD), "too_long") in lines
    sp = sp_reference("mistral-v1")
    assert _read_all(tmp_path / "o") == [[1] + ids + [2] for ids in sp.encode(good[:-1])]


def test_failure_midway_leaves_nothing_complete_looking(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in _corpus(tmp_path, 400)])
    calls = {"n": 0}
    real = pretrain.documents_to_sequences

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "documents_to_sequences", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_pretrain(
            PretrainPrepConfig(
                inputs=[str(path)], output_prefix=str(tmp_path / "o"), batch_docs=100, workers=1, progress=False
            )
        )
    assert not any(p.exists() for p in output_paths(tmp_path / "o").values())
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]  # scratch cleaned up too


def test_sigkill_during_run_leaves_no_complete_output(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in _corpus(tmp_path, 200)])
    prefix = tmp_path / "o"
    script = textwrap.dedent(f"""
        import sys, time
        from clinmega.data import pretrain
        real = pretrain.merge_shards
        def slow_merge(*a, **k):
            n = real(*a, **k)
            print("MERGED", flush=True)
            time.sleep(60)
            return n
        pretrain.merge_shards = slow_merge
        pretrain.prepare_pretrain(pretrain.PretrainPrepConfig(inputs=[{str(path)!r}], output_prefix={str(prefix)!r},
                                  workers=1, progress=False))
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        line = b""
        while time.time() < deadline and b"MERGED" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert b"MERGED" in line, "child never reached the merge"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not is_complete(prefix)
    assert not any(p.exists() for p in output_paths(prefix).values())
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert not IndexedDataset.exists(str(prefix))


def test_refuses_to_overwrite_without_flag(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x y"}])
    cfg = PretrainPrepConfig(inputs=[str(path)], output_prefix=str(tmp_path / "o"), workers=1, progress=False)
    prepare_pretrain(cfg)
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_pretrain(cfg)
    cfg.overwrite = True
    prepare_pretrain(cfg)
    assert is_complete(tmp_path / "o")


def test_missing_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        prepare_pretrain(
            PretrainPrepConfig(
                inputs=[str(tmp_path / "nothing-here*.jsonl")], output_prefix=str(tmp_path / "o"), progress=False
            )
        )


def test_hugging_face_tokenizer_directory(tmp_path):
    from clinmega.data.tokenizers import load_tokenizer
    from clinmega.demo.hf_checkpoint import write_tokenizer

    hf_dir = write_tokenizer(tmp_path / "hf", vocab_size=32000)
    texts = ["Troponin I 0.04 ng/mL, ECG: sinus rhythm.", "Ω-3 résumé 😀"]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    m = prepare_pretrain(
        PretrainPrepConfig(
            inputs=[str(path)], output_prefix=str(tmp_path / "o"), tokenizer=str(hf_dir), workers=1, progress=False
        )
    )
    assert m["tokenizer"]["kind"] == "huggingface" and m["tokenizer"]["vocab_size"] == 32000
    hf = load_tokenizer(hf_dir).hf
    assert _read_all(tmp_path / "o") == [
        [hf.bos_token_id, *hf.encode(t, add_special_tokens=False), hf.eos_token_id] for t in texts
    ]
    # ...and as the sentencepiece library and transformers read that folder (not only clinmega's loader)
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    assert _read_all(tmp_path / "o") == [[sp.bos_id(), *sp.encode(t), sp.eos_id()] for t in texts]
    auto = AutoTokenizer.from_pretrained(str(hf_dir))
    assert _read_all(tmp_path / "o") == [[*auto(t)["input_ids"], auto.eos_token_id] for t in texts]
