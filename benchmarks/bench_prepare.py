"""Benchmark ``prepare pretrain`` against the raw speed of its own tokenizer.

Generates a synthetic JSONL corpus (default 200 MB) in a temporary directory, then measures in one run:

1. ``prepare pretrain`` (Mistral v1 tokenizer, N workers): wall time, tokens/s, peak RSS;
2. the same tokenizer backend batch-encoding the same texts in N processes (texts pre-loaded, JSON
   parsing excluded): tokens/s — the ceiling for (1);
3. the ``sentencepiece`` library itself on a slice, for reference;

prints the ratios, and checks on sampled documents that the written ids equal ``sentencepiece``'s
``[BOS] + encode(text) + [EOS]`` (BOS is written by default).

    python benchmarks/bench_prepare.py [--mb 200] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLINICAL = (
    "patient presented with acute chest pain dyspnea fever cough hypertension diabetes mellitus "
    "troponin elevated ECG showed ST elevation myocardial infarction heparin aspirin clopidogrel "
    "metoprolol mg IV PO daily bid tid history of CKD stage creatinine eGFR sepsis lactate "
    "antibiotics ceftriaxone vancomycin blood cultures CT scan MRI chest x-ray bilateral infiltrates "
    "pneumonia COPD exacerbation nebulized albuterol prednisone discharge follow-up cardiology"
).split()


def make_corpus(path: Path, target_mb: int, seed: int = 0) -> int:
    """Write ~target_mb of JSONL documents of Zipf-distributed words (clinical terms, invented words,
    numbers, punctuation, some non-ASCII). Returns the number of documents."""
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ne", "tra", "ph", "ox", "zy", "en", "ul", "ri", "che", "qu", "os", "ia"]
    invented = ["".join(rng.choice(syll, size=rng.integers(1, 5))) for _ in range(40_000)]
    vocab = np.array(CLINICAL + invented + ["é", "naïve", "µg/kg", "°C", "≥", "±", "—", "–"], dtype=object)
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
    weights /= weights.sum()
    punct = np.array(["", "", "", "", ",", ".", ";", ":", "\n", "?"], dtype=object)
    n_docs = 0
    written = 0
    target = target_mb * 1_000_000
    pyrng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            batch = []
            for _ in range(2000):
                n = int(rng.integers(50, 2500))
                words = rng.choice(vocab, size=n, p=weights)
                ends = rng.choice(punct, size=n)
                nums = f" {pyrng.randint(0, 500)}.{pyrng.randint(0, 9)} mmol/L" if pyrng.random() < 0.5 else ""
                text = " ".join(w + e for w, e in zip(words, ends)) + nums
                batch.append(json.dumps({"text": text, "id": n_docs}, ensure_ascii=False) + "\n")
                n_docs += 1
            chunk = "".join(batch)
            f.write(chunk)
            written += len(chunk.encode("utf-8"))
    return n_docs


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _raw_worker(args: tuple[str, int, int, str]) -> tuple[int, float, float]:
    """Encode this worker's share of documents (loaded before timing); returns (tokens, seconds, CPU s)."""
    from clinmega.data.tokenizers import load_tokenizer

    path, rank, world, backend = args
    tok = load_tokenizer("mistral-v1", backend=backend)
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for i, line in enumerate(f) if i % world == rank]
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = 0
    for i in range(0, len(texts), 1024):
        flat, _ = tok.encode_flat(texts[i : i + 1024])
        tokens += flat.size
    return tokens, time.perf_counter() - t0, time.process_time() - c0


def raw_throughput(path: Path, workers: int, backend: str) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds) of ``workers`` processes encoding the corpus; wall = slowest."""
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_raw_worker, [(str(path), r, workers, backend) for r in range(workers)])
    return sum(r[0] for r in results), max(r[1] for r in results), sum(r[2] for r in results)


def sentencepiece_slice(path: Path, max_docs: int) -> tuple[int, float]:
    """Single-process ``sentencepiece`` library speed on the first documents, for reference."""
    from clinmega.data.tokenizers import load_tokenizer

    tok = load_tokenizer("mistral-v1", backend="sentencepiece")
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(max_docs), f)]
    t0 = time.perf_counter()
    tokens = sum(len(x) for x in tok.encode_batch(texts))
    return tokens, time.perf_counter() - t0


def check_exact(prefix: Path, corpus: Path, n_docs: int, samples: int = 300) -> tuple[int, bool]:
    """Compare sampled written documents with sentencepiece's [BOS] + ids + [EOS]."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from clinmega.data.tokenizers import load_tokenizer

    sp = load_tokenizer("mistral-v1", backend="sentencepiece")
    wanted = set(random.Random(1).sample(range(n_docs), min(samples, n_docs)))
    ds = IndexedDataset(str(prefix))
    bad = 0
    with open(corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i in wanted:
                expected = [sp.bos_id, *sp.encode(json.loads(line)["text"]), sp.eod_id]
                bad += ds[i].tolist() != expected
    bos_written = int(ds[0][0]) == sp.bos_id
    del ds
    return bad, bos_written


# ---- side-by-side runs against Megatron-LM and decontaminate (speed) ----------------------------------

MEGATRON_HOWTO = (
    "Megatron-LM is not on PyPI: git clone https://github.com/NVIDIA/Megatron-LM /work/scratch/megatron-lm "
    "(outside this repo) and pass --megatron-lm /work/scratch/megatron-lm"
)


def timed_command(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB of the largest process of the tree, output tail) of a fresh process."""
    import subprocess

    script = (
        "import resource, subprocess, sys, time; t=time.perf_counter(); "
        "r=subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "w=time.perf_counter()-t; m=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024; "
        "print(f'@@ {w} {m} {r.returncode}'); print((r.stdout+r.stderr)[-1500:])"
    )
    out = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True, env=env).stdout
    head, _, tail = out.partition("\n")
    _, wall, rss, rc = head.split()
    if int(rc) != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({rc}):\n{tail}")
    return float(wall), float(rss), tail


def hf_tokenizer_dir(root: Path) -> Path:
    """Mistral v1 as a Hugging Face tokenizer directory (gigatoken's own conversion of the SentencePiece
    model, the same encoder clinmega uses) for Megatron-LM's HuggingFaceTokenizer."""
    from gigatoken._load.sentencepiece import sentencepiece_to_tokenizer_json

    from clinmega.data.tokenizers import mistral_common_model_path

    d = root / "hf-mistral-v1"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.json").write_text(sentencepiece_to_tokenizer_json(mistral_common_model_path("mistral-v1").read_bytes()))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return d


def megatron_rows(corpus: Path, root: Path, megatron_lm: Path, workers: int) -> dict[str, tuple[float, float]]:
    """Wall and peak RSS of Megatron-LM's preprocess_data_fast.py (gigatoken) and preprocess_data.py."""
    tok = hf_tokenizer_dir(root)
    env = dict(os.environ, PYTHONPATH=str(megatron_lm), OMP_NUM_THREADS="1")
    common = ["--json-keys", "text", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok),
              "--append-eod"]
    rows = {}
    wall, rss, _ = timed_command([sys.executable, str(megatron_lm / "tools/preprocess_data_fast.py"),
                                  "--input", str(corpus), "--output-prefix", str(root / "mfast"), "--use-gigatoken",
                                  *common], env)
    rows["preprocess_data_fast.py --use-gigatoken"] = (wall, rss)
    if os.environ.get("BENCH_SLOW_MEGATRON", "1") == "1":
        wall, rss, _ = timed_command([sys.executable, str(megatron_lm / "tools/preprocess_data.py"), "--input",
                                      str(corpus), "--output-prefix", str(root / "mslow"), "--workers", str(workers),
                                      *common], env)
        rows["preprocess_data.py"] = (wall, rss)
    return rows


def make_eval_set(path: Path, corpus: Path, questions: int, planted: int = 50, seed: int = 0) -> None:
    """``questions`` MedMCQA-sized items (question + 4 options) drawn from the corpus' vocabulary, the first
    ``planted`` of them copied from corpus documents (so some training documents are contaminated)."""
    rng = random.Random(seed)
    with open(corpus, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
    vocab = [w for d in docs[:200] for w in d.split()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(questions):
            if i < planted:
                words = docs[i * 7 % len(docs)].split()
                a = rng.randrange(max(1, len(words) - 30))
                q = " ".join(words[a : a + 30])
            else:
                q = " ".join(rng.choices(vocab, k=rng.randint(15, 60)))
            opts = [" ".join(rng.choices(vocab, k=rng.randint(1, 8))) for _ in range(4)]
            f.write(json.dumps({"question": q, "opa": opts[0], "opb": opts[1], "opc": opts[2], "opd": opts[3]}) + "\n")


def clinmega_rows(corpus: Path, root: Path, workers: int, eval_questions: int) -> dict[str, tuple[float, float, str]]:
    """Wall, peak RSS and output of ``clinmega prepare pretrain`` and ``clinmega decontaminate`` (fresh processes)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "clinmega.cli"]
    rows = {}
    rows["clinmega prepare pretrain"] = timed_command(
        [*cli, "prepare", "pretrain", "--inputs", str(corpus), "--output-prefix", str(root / "out"),
         "--workers", str(workers), "--overwrite", "--no-progress"], env)
    evals = root / "eval_medmcqa_like.jsonl"
    make_eval_set(evals, corpus, eval_questions)
    rows["clinmega decontaminate"] = timed_command(
        [*cli, "decontaminate", "--inputs", str(corpus), "--eval-sets", str(evals), "--output-dir",
         str(root / "decon"), "--mode", "report", "--workers", str(workers), "--overwrite",
         "--no-progress"], env)
    return rows


def side_by_side(corpus: Path, root: Path, workers: int, megatron_lm: Path | None, eval_questions: int) -> None:
    """Print one table of fresh-process runs, with ratios to preprocess_data_fast.py (same run, same cores)."""
    size_mb = corpus.stat().st_size / 1e6
    print(f"load average before: {os.getloadavg()} on {os.cpu_count()} CPUs")
    rows: dict[str, tuple[float, float]] = {}
    if megatron_lm is None:
        print(MEGATRON_HOWTO)
    else:
        rows.update(megatron_rows(corpus, root, megatron_lm, workers))
    for name, (wall, rss, _) in clinmega_rows(corpus, root, workers, eval_questions).items():
        rows[name] = (wall, rss)
    anchor = rows.get("preprocess_data_fast.py --use-gigatoken", (None,))[0]
    prep = rows["clinmega prepare pretrain"][0]
    for name, (wall, rss) in rows.items():
        ratio = f"{anchor / wall:5.2f}x fast.py" if anchor else ""
        print(f"{name:42s} {wall:8.1f} s  {size_mb / wall:7.1f} MB/s  peak RSS (largest process) {rss:6.0f} MiB  "
              f"{ratio}  {prep / wall:5.2f}x prepare")
    print(f"load average after: {os.getloadavg()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="directory to keep the corpus/output in")
    ap.add_argument("--corpus", type=Path, default=None, help="an existing JSONL corpus (field text) instead of --mb")
    ap.add_argument("--megatron-lm", type=Path, default=None, help="a Megatron-LM source tree (" + MEGATRON_HOWTO + ")")
    ap.add_argument("--eval-questions", type=int, default=250_000, help="decontaminate: evaluation-set size")
    ap.add_argument("--side-by-side-only", action="store_true", help="only the fresh-process comparison table")
    args = ap.parse_args()
    if args.side_by_side_only:
        root = Path(tempfile.mkdtemp(prefix="bench_prepare_", dir=args.keep))
        try:
            corpus = args.corpus or root / "corpus.jsonl"
            if args.corpus is None:
                make_corpus(corpus, args.mb)
            side_by_side(corpus, root, args.workers, args.megatron_lm, args.eval_questions)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost is not the data's)

    from clinmega.data.config import PretrainPrepConfig
    from clinmega.data.pretrain import prepare_pretrain

    rss_baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    try:
        t0 = time.perf_counter()
        if corpus.exists() and args.keep:  # reuse a kept corpus
            with open(corpus, "rb") as f:
                n_docs = sum(1 for _ in f)
        else:
            n_docs = make_corpus(corpus, args.mb)
        size_mb = corpus.stat().st_size / 1e6
        print(f"corpus: {size_mb:.1f} MB, {n_docs} documents, generated in {time.perf_counter() - t0:.1f}s")

        t0, c0 = time.perf_counter(), _cpu_seconds()
        m = prepare_pretrain(
            PretrainPrepConfig(
                inputs=[str(corpus)],
                output_prefix=str(root / "out"),
                workers=args.workers,
                overwrite=True,
                progress=False,
            )
        )
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        total = m["totals"]["tokens"]
        content = total - 2 * m["totals"]["documents_written"]
        backend = m["tokenizer"]["backend"]
        rss_parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        prep_tps = content / wall
        print(
            f"prepare pretrain: {wall:.1f}s wall, {content / 1e6:.1f} M text tokens (+BOS/EOD: {total / 1e6:.1f} M), "
            f"{prep_tps / 1e6:.2f} M tok/s, {size_mb / wall:.1f} MB/s, backend={backend}, workers={args.workers}; "
            f"{cpu:.1f} CPU-s = {content / cpu / 1e6:.2f} M tok per CPU-s"
        )
        print(
            f"peak RSS: parent {rss_parent:.0f} MiB (after importing torch+megatron: {rss_baseline:.0f} MiB), "
            f"largest worker {rss_child:.0f} MiB (forked: includes the parent's pages it touched)"
        )

        raw_tokens, raw_wall, raw_cpu = raw_throughput(corpus, args.workers, backend)
        raw_tps = raw_tokens / raw_wall
        print(
            f"raw {backend} batch encode, {args.workers} processes, texts in memory: "
            f"{raw_tokens / 1e6:.1f} M tokens in {raw_wall:.1f}s = {raw_tps / 1e6:.2f} M tok/s; "
            f"{raw_tokens / raw_cpu / 1e6:.2f} M tok per CPU-s"
        )
        sp_tokens, sp_wall = sentencepiece_slice(corpus, 3000)
        sp_tps = sp_tokens / sp_wall
        print(f"sentencepiece library, 1 process (reference): {sp_tps / 1e6:.2f} M tok/s")
        print(
            f"ratio prepare / raw same-backend encode: {prep_tps / raw_tps:.3f} (wall), "
            f"{(content / cpu) / (raw_tokens / raw_cpu):.3f} (per CPU-second; less sensitive to other load)"
        )
        print(f"machine load average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        print(
            f"ratio prepare ({args.workers} workers) / sentencepiece x{args.workers}: "
            f"{prep_tps / (sp_tps * args.workers):.2f}"
        )
        assert raw_tokens == content, f"raw encode produced {raw_tokens} tokens, prepare {content}"
        bad, bos = check_exact(root / "out", corpus, n_docs)
        print(
            f"exactness: {bad} mismatching of 300 sampled documents vs sentencepiece; BOS written: {bos}; "
            f"EOD (= EOS id {m['output']['eod_id']}) appended"
        )
        print(f"target > 4.6 M tok/s: {'met' if prep_tps > 4.6e6 else 'NOT met'}")
        return 1 if bad else 0
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
