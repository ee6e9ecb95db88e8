"""Corpora larger than one machine: `--shard i/N` + `prepare merge` equal a one-shot run, byte for byte,
launched through the Slurm array script (with `srun` stood in for locally); decontaminate shards."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from data_utils import random_text, write_jsonl

from clinmega.cli import main
from clinmega.data.config import DecontamConfig, MergeConfig, PretrainPrepConfig
from clinmega.data.decontam import decontaminate
from clinmega.data.merge import merge_pretrain_shards
from clinmega.data.pretrain import output_paths, prepare_pretrain

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "containers/slurm/prepare_array.sbatch"


def make_corpus(root: Path) -> list[str]:
    """A plain JSONL that the shard cut falls inside (with a malformed line after the cut), a .gz and
    a Parquet file of several row groups. Returns the input paths."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(11)
    texts = [random_text(rng, rng.randrange(5, 200)) for _ in range(700)]
    write_jsonl(root / "a.jsonl", [{"text": t} for t in texts[:500]], raw_lines={420: b"{not json\n"})
    with gzip.open(root / "b.jsonl.gz", "wb") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[500:600]).encode())
    pq.write_table(pa.table({"text": texts[600:]}), root / "c.parquet", row_group_size=10)
    return [str(root / n) for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")]


def one_shot(root: Path, inputs: list[str]) -> dict:
    return prepare_pretrain(PretrainPrepConfig(inputs=inputs, output_prefix=str(root / "one"), workers=1,
                                               progress=False))


def assert_same_dataset(a: str, b: str) -> None:
    pa, pb = output_paths(a), output_paths(b)
    assert pa["bin"].read_bytes() == pb["bin"].read_bytes()
    assert pa["idx"].read_bytes() == pb["idx"].read_bytes()
    ma, mb = (json.loads(p["manifest"].read_text()) for p in (pa, pb))
    assert ma["files"] == mb["files"] and ma["totals"] == mb["totals"]  # absolute line numbers too
    assert ma["output"]["sequences"] == mb["output"]["sequences"]


def _fake_slurm_bin(tmp_path: Path) -> Path:
    """`srun` that drops its own options and runs the command (`python`: this environment's, first on PATH)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bindir / "srun").chmod(0o755)
    return bindir


def test_sbatch_array_two_shards_then_merge_equal_one_shot(tmp_path):
    inputs = make_corpus(tmp_path)
    bindir = _fake_slurm_bin(tmp_path)
    env = {**os.environ, "PATH": f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_COUNT": "2",
           "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1", "WORKERS": "2"}
    prefix = str(tmp_path / "sharded")
    for i in range(2):
        r = subprocess.run(["bash", str(SBATCH), "--inputs", *inputs, "--output-prefix", prefix],
                           env={**env, "SLURM_ARRAY_TASK_ID": str(i)}, cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    shards = [json.loads(output_paths(f"{prefix}-0000{i}-of-00002")["manifest"].read_text()) for i in range(2)]
    assert all(inputs[0] in s["shard"]["ranges"] for s in shards)  # the cut falls inside a.jsonl
    assert shards[1]["shard"]["ranges"][inputs[0]]["start"] > 0
    r = subprocess.run(["bash", str(SBATCH), "--output-prefix", prefix], env={**env, "VERB": "merge"},
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    m = one_shot(tmp_path, inputs)
    assert_same_dataset(str(tmp_path / "one"), prefix)
    assert m["files"][0]["examples"][0]["line"] == 421  # after the cut: absolute again once merged
    merged = json.loads(output_paths(prefix)["manifest"].read_text())
    assert [s["shard"] for s in merged["merged_from"]] == [0, 1] and merged["config"]["shard"] is None

    bad = subprocess.run(["bash", str(SBATCH)], env={**env, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "1"},
                         cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "the array must be 0-1" in bad.stderr


def test_merge_refuses_missing_or_mismatched_shards(tmp_path, capsys):
    inputs = make_corpus(tmp_path)
    base = dict(inputs=inputs, output_prefix=str(tmp_path / "p"), workers=1, progress=False)
    for i in range(3):
        prepare_pretrain(PretrainPrepConfig(**base, shard=f"{i}/3"))
    output_paths(str(tmp_path / "p-00001-of-00003"))["manifest"].unlink()
    assert main(["prepare", "merge", "--output-prefix", str(tmp_path / "p")]) == 2
    assert "missing [1]" in capsys.readouterr().err
    prepare_pretrain(PretrainPrepConfig(**{**base, "add_bos": False}, shard="1/3", overwrite=True))
    with pytest.raises(ValueError, match="config.add_bos"):
        merge_pretrain_shards(MergeConfig(output_prefix=str(tmp_path / "p")))
    assert not output_paths(str(tmp_path / "p"))["manifest"].exists()
    with pytest.raises(ValueError, match="shard: .* 0 <= i < N"):
        prepare_pretrain(PretrainPrepConfig(**base, shard="3/3"))


def test_decontaminate_shards_concatenate_to_the_one_shot_output(tmp_path):
    rng = random.Random(12)
    question = " ".join(f"ev{rng.randrange(10_000)}" for _ in range(30))
    write_jsonl(tmp_path / "eval.jsonl", [{"question": question}])
    docs = [{"text": random_text(rng, rng.randrange(5, 100))} for _ in range(400)]
    for i in (30, 350):
        docs[i] = {"text": f"case {i}: {question}"}
    write_jsonl(tmp_path / "train.jsonl", docs)
    base = dict(inputs=[str(tmp_path / "train.jsonl")], eval_sets=[str(tmp_path / "eval.jsonl")],
                output_dir=str(tmp_path / "clean"), workers=1, progress=False)
    one = decontaminate(DecontamConfig(**base))
    parts = [decontaminate(DecontamConfig(**base, shard=f"{i}/2")) for i in range(2)]
    joined = b"".join((tmp_path / f"clean-0000{i}-of-00002" / "train.jsonl").read_bytes() for i in range(2))
    assert joined == (tmp_path / "clean" / "train.jsonl").read_bytes()
    assert [p["documents_flagged"] for p in parts] == [1, 1] and one["documents_flagged"] == 2
    assert parts[1]["shard"]["ranges"][str(tmp_path / "train.jsonl")]["start"] > 0
