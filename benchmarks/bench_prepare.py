"""Benchmark ``prepare pretrain`` against the raw speed of its own tokenizer.

Takes a corpus (``--corpus FILE``: any input ``prepare pretrain`` reads — JSONL, plain or .gz/.zst/.xz, or
Parquet — with ``--text-field``) or generates one (default 200 MB) in a temporary directory: by default
clinical-note-like text with a long-tail vocabulary (misspelled terms, patient and clinician names,
record numbers, codes, dates, numbers with units: most words are rare, as in real notes; a corpus drawn
from a small word list flatters cache-based tokenizers), or ``--generator zipf`` for the older Zipf
corpus. Prints the corpus' vocabulary statistics, then measures in one run:

0. process start-up of the real CLI (``python -m clinmega.cli prepare pretrain`` on a one-document
   corpus: interpreter, imports, tokenizer load, worker pool), reported apart from the work rate;

1. ``prepare pretrain`` (Mistral v1 tokenizer, N workers): wall time, tokens/s, peak RSS;
2. the same tokenizer backend batch-encoding the same texts in N processes (texts pre-loaded, JSON
   parsing excluded): tokens/s — the ceiling for (1);
3. the ``sentencepiece`` library itself on a slice, for reference;

prints the ratios, and checks on sampled documents that the written ids equal ``sentencepiece``'s
``[BOS] + encode(text) + [EOS]`` (BOS is written by default).

    python benchmarks/bench_prepare.py [--corpus FILE [--text-field text]] [--mb 200] [--generator long-tail|zipf]
                                       [--workers 2] [--keep DIR]

``--side-by-side-only [--megatron-lm DIR] [--eval-scale 1.0] [--skip NAME]``: instead, one table of fresh
processes on the same corpus (field ``text``) and cores — Megatron-LM's ``tools/preprocess_data.py``
(``--workers N``) and ``tools/preprocess_data_fast.py --use-gigatoken`` (run from a source tree: Megatron-LM
is not on PyPI, see ``MEGATRON_HOWTO``), ``clinmega prepare pretrain`` and ``clinmega decontaminate``
(13-grams against generated evaluation sets in their release layouts, with the published lengths and the
published sizes times ``--eval-scale``: MedMCQA 193,155 + MedQA 12,723 + PubMedQA 1,000 + MMLU clinical
subsets 1,242 = 208,120 questions, see ``make_eval_sets``; run twice with ``--index-cache``: building the
evaluation index, then reusing it), plus the raw gigatoken ceiling (the texts already in memory, encode
only). Each row: wall, start-up (the same command on a one-document corpus and a one-question evaluation
file, no index cache), work time and rate without it by wall and by CPU seconds of the process tree, peak
RSS/PSS summed over the process tree (parent + workers, sampled every 0.1 s) and of its largest process,
ratios to preprocess_data_fast.py and to prepare, the load average; then the ids check (clinmega minus its
BOS equals each Megatron-LM output on every document; sampled documents equal sentencepiece).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

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


CLINICAL_TERMS = (
    "hypertension hyperlipidemia tachycardia bradycardia atrial fibrillation pneumonia bronchiectasis "
    "cholecystitis pancreatitis appendicitis diverticulitis cellulitis osteomyelitis pyelonephritis "
    "hepatosplenomegaly lymphadenopathy thrombocytopenia leukocytosis hyponatremia hyperkalemia "
    "hypoglycemia ketoacidosis encephalopathy hemiparesis aphasia dysarthria syncope vertigo "
    "dyspnea orthopnea hemoptysis hematemesis melena hematuria dysuria oliguria edema ascites "
    "jaundice pruritus erythema induration fluctuance tenderness guarding rebound crepitus "
    "metoprolol lisinopril amlodipine atorvastatin apixaban warfarin enoxaparin furosemide "
    "spironolactone metformin insulin glargine levothyroxine pantoprazole ondansetron ceftriaxone "
    "piperacillin tazobactam vancomycin azithromycin doxycycline prednisone methylprednisolone "
    "acetaminophen oxycodone hydromorphone gabapentin sertraline quetiapine haloperidol lorazepam "
    "echocardiogram electrocardiogram angiography colonoscopy bronchoscopy thoracentesis "
    "paracentesis intubation extubation tracheostomy debridement cholecystectomy arthroplasty"
).split()
CONNECTIVES = (
    "the patient was seen for with and without denies reports noted on exam history of likely "
    "consistent with no evidence of status post rule out follow up in plan continue start stop "
    "increase decrease monitor recheck discussed with family agrees to tolerating diet ambulating"
).split()
ABBREVIATIONS = ["pt", "c/o", "s/p", "h/o", "r/o", "w/", "b.i.d.", "q6h", "PRN", "NPO", "SOB", "CP", "N/V",
                 "HPI:", "ROS:", "A/P:", "PMH:", "Dx:", "Rx:", "f/u", "d/c", "WNL", "NKDA", "x3"]
UNITS = ["mg", "mg/dL", "mmol/L", "mEq/L", "g/dL", "mcg/kg/min", "units/kg/hr", "mL/hr", "mmHg", "bpm", "%",
         "°C", "kg", "cm", "×10⁹/L", "IU/L", "ng/mL", "µg", "L/min"]


def _misspell(word: str, rng: random.Random) -> str:
    """One random typing error: a swap, a drop, a doubled or a wrong letter."""
    i = rng.randrange(len(word))
    kind = rng.randrange(4)
    if kind == 0 and i < len(word) - 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    if kind == 2:
        return word[:i] + word[i] + word[i:]
    return word[:i] + rng.choice("aeioustnrl") + word[i + 1 :]


def _long_tail_token(rng: random.Random, syll: list[str]) -> str:
    r = rng.random()
    if r < 0.30:
        return rng.choice(CONNECTIVES)
    if r < 0.52:
        w = rng.choice(CLINICAL_TERMS)
        return _misspell(w, rng) if rng.random() < 0.15 else (w.capitalize() if rng.random() < 0.1 else w)
    if r < 0.60:
        return rng.choice(ABBREVIATIONS)
    if r < 0.72:  # a measurement
        value = rng.choice([f"{rng.randint(1, 250)}", f"{rng.uniform(0, 40):.1f}", f"{rng.uniform(0, 9):.2f}"])
        return f"{value} {rng.choice(UNITS)}" if rng.random() < 0.7 else f"{value}{rng.choice(UNITS)}"
    if r < 0.80:  # a name (invented, so the vocabulary keeps growing)
        name = "".join(rng.choices(syll, k=rng.randint(2, 4))).capitalize()
        return rng.choice(["Dr. ", "Mr. ", "Ms. ", "", ""]) + name
    if r < 0.90:  # an identifier or a code
        kind = rng.randrange(6)
        if kind == 0:
            return f"MRN{rng.randint(0, 10**8 - 1):08d}"
        if kind == 1:
            return f"{rng.choice('ABCDEGIJKNR')}{rng.randint(0, 99):02d}.{rng.randint(0, 999)}"  # ICD-10
        if kind == 2:
            return f"ACC-{rng.randint(2015, 2026)}-{rng.randint(0, 999999):06d}"
        if kind == 3:
            return f"0x{rng.getrandbits(32):08x}"
        if kind == 4:
            return f"{rng.randint(1000, 99999)}-{rng.randint(0, 9)}"  # LOINC-like
        return f"LOT#{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.randint(10, 99)}{rng.choice('XYZ')}{rng.randint(1, 9)}"
    if r < 0.95:  # a date or a time
        return rng.choice([f"{rng.randint(2015, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                           f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
                           f"{rng.randint(1, 12)}/{rng.randint(1, 28)}/{rng.randint(15, 26)}"])
    return "".join(rng.choices(syll, k=rng.randint(1, 4)))  # an unknown word


def make_long_tail_corpus(path: Path, target_mb: int, seed: int = 0) -> int:
    """Write ~target_mb of JSONL clinical-note-like documents with a long-tail vocabulary (see the module
    doc). Returns the number of documents."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "tra", "ph", "ox", "zy", "en", "ul", "ri", "che", "qu", "os", "ia", "ber",
            "son", "ski", "ova", "ng", "wa", "dh", "el", "ah", "ito"]
    punct = ["", "", "", "", "", ",", ".", ";", ":", "\n", ".\n"]
    target = target_mb * 1_000_000
    written = n_docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            words = [_long_tail_token(rng, syll) + rng.choice(punct) for _ in range(rng.randint(40, 1500))]
            line = json.dumps({"text": " ".join(words), "id": n_docs}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n_docs += 1
    return n_docs


def corpus_texts(path: Path, text_field: str = "text", max_chars: float = float("inf")) -> list[str]:
    """The texts ``prepare pretrain`` would write from ``path``, in order (any input format, bad lines
    skipped), stopping after ``max_chars`` characters."""
    from clinmega.data.readers import iter_records, plan_chunks

    out, chars = [], 0
    for chunk in plan_chunks([path], 1):
        for rec in iter_records(chunk, text_field, []):
            if rec.reason is None:
                out.append(rec.value)
                chars += len(rec.value)
                if chars >= max_chars:
                    return out
    return out


def vocabulary_stats(texts: list[str]) -> str:
    """Whitespace-word statistics of ``texts``: how long the corpus' tail is."""
    counts: dict[str, int] = {}
    chars = sum(map(len, texts))
    for t in texts:
        for w in t.split():
            counts[w] = counts.get(w, 0) + 1
    total = sum(counts.values())
    once = sum(1 for v in counts.values() if v == 1)
    top = sum(sorted(counts.values(), reverse=True)[:1000])
    return (f"vocabulary (first {chars / 1e6:.0f} M chars): {total:,} words, {len(counts):,} distinct "
            f"({len(counts) / max(total, 1):.1%}), {once / max(len(counts), 1):.0%} of them seen once; "
            f"the 1,000 most frequent cover {top / max(total, 1):.0%} of the text")


def cli_startup_seconds(root: Path, workers: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the real CLI on a one-document corpus: interpreter, imports, tokenizer, pool."""
    tiny = root / "startup.jsonl"
    tiny.write_text(json.dumps({"text": "one short clinical note"}) + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "clinmega.cli", "prepare", "pretrain", "--inputs", str(tiny), "--output-prefix",
           str(root / "startup"), "--workers", str(workers), "--no-progress", "--overwrite"]
    t0, c0 = time.perf_counter(), _cpu_seconds()
    subprocess.run(cmd, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return time.perf_counter() - t0, _cpu_seconds() - c0


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _raw_worker(args: tuple[str, int, int, str, str]) -> tuple[int, float, float]:
    """Encode this worker's share of documents (loaded before timing); returns (tokens, seconds, CPU s)."""
    from clinmega.data.tokenizers import load_tokenizer

    path, rank, world, backend, text_field = args
    tok = load_tokenizer("mistral-v1", backend=backend)
    texts = corpus_texts(Path(path), text_field)[rank::world]
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = 0
    for i in range(0, len(texts), 1024):
        flat, _ = tok.encode_flat(texts[i : i + 1024])
        tokens += flat.size
    return tokens, time.perf_counter() - t0, time.process_time() - c0


def raw_throughput(path: Path, workers: int, backend: str, text_field: str = "text") -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds) of ``workers`` processes encoding the corpus; wall = slowest."""
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.map(_raw_worker, [(str(path), r, workers, backend, text_field) for r in range(workers)])
    return sum(r[0] for r in results), max(r[1] for r in results), sum(r[2] for r in results)


def sentencepiece_slice(texts: list[str], max_docs: int) -> tuple[int, float]:
    """Single-process ``sentencepiece`` library speed on the first documents, for reference."""
    from clinmega.data.tokenizers import load_tokenizer

    tok = load_tokenizer("mistral-v1", backend="sentencepiece")
    texts = texts[:max_docs]
    t0 = time.perf_counter()
    tokens = sum(len(x) for x in tok.encode_batch(texts))
    return tokens, time.perf_counter() - t0


def check_exact(prefix: Path, texts: list[str], samples: int = 300) -> tuple[int, bool]:
    """Compare sampled written documents with sentencepiece's [BOS] + ids + [EOS]."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from clinmega.data.tokenizers import load_tokenizer

    sp = load_tokenizer("mistral-v1", backend="sentencepiece")
    wanted = sorted(random.Random(1).sample(range(len(texts)), min(samples, len(texts))))
    ds = IndexedDataset(str(prefix))
    bad = 0
    for i in wanted:
        bad += ds[i].tolist() != [sp.bos_id, *sp.encode(texts[i]), sp.eod_id]
    bos_written = int(ds[0][0]) == sp.bos_id
    del ds
    return bad, bos_written


# ---- side-by-side runs against Megatron-LM and decontaminate (speed) ----------------------------------

MEGATRON_HOWTO = (
    "Megatron-LM is not on PyPI: git clone https://github.com/NVIDIA/Megatron-LM /work/scratch/megatron-lm "
    "(outside this repo) and pass --megatron-lm /work/scratch/megatron-lm"
)


def _pss_mib(pid: int) -> float:
    """Proportional set size of one process (shared pages split between their users), from smaps_rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_tree(cmd: list[str], env: dict[str, str], out_file: Path, interval: float = 0.1) -> dict[str, float]:
    """Run ``cmd`` as a fresh process and sample its whole process tree (parent + workers) every
    ``interval`` s: wall seconds, CPU seconds of the tree (wait4: the process and its reaped children),
    peak of the summed RSS (counts pages shared by forked workers once per process: an upper bound),
    peak of the summed PSS (shared pages split: what the tree really holds) and the largest process."""
    import threading

    import psutil

    peaks = {"rss_sum": 0.0, "pss_sum": 0.0, "largest": 0.0}
    with open(out_file, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    tree = [root, *root.children(recursive=True)]
                    rss = []
                    for p in tree:
                        with contextlib.suppress(psutil.Error):
                            rss.append(p.memory_info().rss / 2**20)
                    pss = sum(_pss_mib(p.pid) for p in tree)
                    peaks["rss_sum"] = max(peaks["rss_sum"], sum(rss))
                    peaks["pss_sum"] = max(peaks["pss_sum"], pss)
                    peaks["largest"] = max(peaks["largest"], max(rss, default=0.0))
                except psutil.Error:
                    pass
                done.wait(interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{out_file.read_text()[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, **peaks}


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


# The evaluation sets decontaminate is run against in the side-by-side table: the public sets clinmega evaluates
# on, at their published sizes (MMLU: the dataset card's) and lengths in whitespace words. (set, split, items,
# mean question words, mean option words); sources and layouts in make_eval_sets' docstring.
MEDMCQA_SPLITS = (("train", 182_822, 12.77), ("dev", 4_183, 14.09), ("test", 6_150, 9.93))
MEDMCQA_OPTION_WORDS, MEDMCQA_EXP_WORDS = 2.7, 66.2
MEDQA_SPLITS = (("train", 10_178), ("dev", 1_272), ("test", 1_273))
MEDQA_QUESTION_WORDS, MEDQA_OPTION_WORDS = 116.6, 3.5
PUBMEDQA_ITEMS, PUBMEDQA_QUESTION_WORDS, PUBMEDQA_CONTEXT_WORDS, PUBMEDQA_LONG_ANSWER_WORDS = 1_000, 14.4, 238.9, 43.2
# subject: (test, validation, dev items; question words, option words). The counts are the cais/mmlu dataset card's
# num_examples; the lengths are estimates from its num_bytes per test item (about 6.3 characters per word, less
# ~32 bytes of Arrow overhead, about 4 words per option), not published statistics.
MMLU_SUBJECTS = {
    "anatomy": (135, 14, 5, 18, 4),
    "clinical_knowledge": (265, 29, 5, 17, 4),
    "college_biology": (144, 16, 5, 33, 4),
    "college_medicine": (173, 22, 5, 54, 4),
    "medical_genetics": (100, 11, 5, 14, 3.5),
    "professional_medicine": (272, 31, 5, 110, 3),
}
PUBMEDQA_LABELS = ("BACKGROUND", "OBJECTIVE", "METHODS", "RESULTS", "PURPOSE", "DESIGN", "SETTING", "PATIENTS")


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _lognormal_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float) -> np.ndarray:
    """``n`` word counts >= 1 with the given mean, spread like real text lengths (log-normal)."""
    return np.maximum(1, np.rint(mean * rng.lognormal(-sigma * sigma / 2, sigma, n))).astype(np.int64)


def _short_lengths(rng: np.random.Generator, n: int, mean: float) -> np.ndarray:
    """``n`` word counts >= 1 with the given mean (1 + Poisson): answer options."""
    return 1 + rng.poisson(mean - 1, n)


class _Words:
    """Texts of given word counts drawn from a vocabulary, all words of a batch gathered at once."""

    def __init__(self, vocab: list[str], rng: np.random.Generator) -> None:
        self.vocab, self.rng = np.array(vocab, dtype=object), rng

    def texts(self, lengths: np.ndarray) -> list[str]:
        words = self.vocab[self.rng.integers(0, len(self.vocab), int(lengths.sum()))].tolist()
        ends = np.cumsum(lengths).tolist()
        return [" ".join(words[a:b]) for a, b in zip([0, *ends[:-1]], ends)]


def make_eval_sets(root: Path, corpus: Path, scale: float = 1.0, seed: int = 0) -> list[tuple[Path, dict]]:
    """Write the four evaluation files of the side-by-side table under ``root``, at ``scale`` times the published
    sizes, in the layouts of the public releases (which ``clinmega decontaminate`` and
    :func:`clinmega.benchmark_files.load_file` read), words drawn from the first corpus documents' vocabulary;
    some items hold a 30-word passage copied from a corpus document (so some training documents are
    contaminated): 50 MedMCQA questions, 10 MedQA questions, 10 PubMedQA contexts, 5 MMLU questions.
    Returns (path, realised statistics) per file.

    * ``medmcqa.jsonl`` -- MedMCQA (Pal, Umapathi, Sankarasubbu, CHIL 2022, Table 2): train 182,822 + dev 4,183
      + test 6,150 = 193,155 questions in one file, questions 12.77 / 14.09 / 9.93 words on average per split,
      options 2.7, explanations 66.2. Layout of the GitHub release: ``{"id", "question", "opa".."opd", "cop":
      1-4, "exp"}``; ``exp`` is not among decontaminate's default fields (not indexed) but is parsed, as in
      the real files (which also hold subject/topic names, left out here; every row has an answer and an
      explanation, where the real test split hides them).
    * ``medqa.jsonl`` -- MedQA USMLE 4-option (Jin et al., Applied Sciences 2021, Table 2): train 10,178 + dev
      1,272 + test 1,273 = 12,723 questions, 116.6 words per question, 3.5 per option. Layout of jind11/MedQA
      ``US/4_options``: ``{"question", "answer", "options": {"A".."D"}, "meta_info", "answer_idx"}`` (the
      release's ``metamap_phrases`` lists are left out; they are not indexed).
    * ``pubmedqa.jsonl`` -- PubMedQA PQA-L (Jin et al., EMNLP 2019, Table 1): 1,000 items, questions 14.4 words,
      contexts (the abstract without its conclusion) 238.9 words in 2-5 labelled sections, long answers 43.2.
      Layout of the HF ``pubmed_qa`` pqa_labeled rows: ``{"pubid", "question", "context": {"contexts": [...],
      "labels": [...]}, "long_answer", "final_decision"}``; decontaminate walks the whole ``context`` object
      (section texts and labels), not ``long_answer``.
    * ``mmlu_clinical.jsonl`` -- the MMLU subsets MultiMedQA uses (Hendrycks et al., ICLR 2021; counts from the
      cais/mmlu dataset card): anatomy, clinical_knowledge, college_biology, college_medicine,
      medical_genetics, professional_medicine, test + validation + dev = 1,242 questions; the lengths are
      estimates (see ``MMLU_SUBJECTS``). Layout of cais/mmlu rows as JSON lines: ``{"question", "subject",
      "choices": [4], "answer": 0-3}``.
    """
    if scale <= 0:
        raise ValueError(f"--eval-scale must be > 0, got {scale}")
    rng = np.random.default_rng(seed)
    with open(corpus, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
    words = _Words([w for d in docs[:200] for w in d.split()], rng)
    plant_no = itertools.count()

    def passage() -> str:  # 30 consecutive words of a corpus document
        doc = docs[next(plant_no) * 7 % len(docs)].split()
        a = int(rng.integers(0, max(1, len(doc) - 30)))
        return " ".join(doc[a : a + 30])

    def mean_words(texts: list[str]) -> float:
        return sum(t.count(" ") + 1 for t in texts) / max(len(texts), 1)

    def write(path: Path, rows: list[dict]) -> None:
        with open(path, "wb") as f:
            f.write(b"".join(orjson.dumps(r) + b"\n" for r in rows))

    out = []
    # MedMCQA
    split_sizes = [_scaled(n, scale) for _, n, _ in MEDMCQA_SPLITS]
    n = sum(split_sizes)
    q_len = np.concatenate([_lognormal_lengths(rng, k, m, 0.55) for k, (_, _, m) in zip(split_sizes, MEDMCQA_SPLITS)])
    questions = words.texts(q_len)
    for i in range(min(50, n)):
        questions[i * (n // min(50, n))] = passage()
    options = words.texts(_short_lengths(rng, 4 * n, MEDMCQA_OPTION_WORDS))
    exps = words.texts(_lognormal_lengths(rng, n, MEDMCQA_EXP_WORDS, 0.8))
    cops = rng.integers(1, 5, n).tolist()
    rows = [{"id": f"mcq-{i:06d}", "question": questions[i], "opa": options[4 * i], "opb": options[4 * i + 1],
             "opc": options[4 * i + 2], "opd": options[4 * i + 3], "cop": cops[i], "exp": exps[i]} for i in range(n)]
    write(path := root / "medmcqa.jsonl", rows)
    out.append((path, {"name": "MedMCQA", "items": n, "question": mean_words(questions), "option": mean_words(options),
                       "exp (not indexed)": mean_words(exps)}))
    # MedQA
    n = sum(_scaled(k, scale) for _, k in MEDQA_SPLITS)
    questions = words.texts(_lognormal_lengths(rng, n, MEDQA_QUESTION_WORDS, 0.35))
    for i in range(min(10, n)):
        q = questions[i * (n // min(10, n))].split()
        questions[i * (n // min(10, n))] = " ".join([*q[: len(q) // 2], passage(), *q[len(q) // 2 :]])
    options = words.texts(_short_lengths(rng, 4 * n, MEDQA_OPTION_WORDS))
    answers = rng.integers(0, 4, n).tolist()
    rows = []
    for i in range(n):
        opts = dict(zip("ABCD", options[4 * i : 4 * i + 4]))
        letter = "ABCD"[answers[i]]
        rows.append({"question": questions[i], "answer": opts[letter], "options": opts,
                     "meta_info": "step1" if i % 2 else "step2&3", "answer_idx": letter})
    write(path := root / "medqa.jsonl", rows)
    out.append((path, {"name": "MedQA", "items": n, "question": mean_words(questions), "option": mean_words(options)}))
    # PubMedQA
    n = _scaled(PUBMEDQA_ITEMS, scale)
    questions = words.texts(_lognormal_lengths(rng, n, PUBMEDQA_QUESTION_WORDS, 0.35))
    ctx_len = _lognormal_lengths(rng, n, PUBMEDQA_CONTEXT_WORDS, 0.3)
    sections = rng.integers(2, 6, n)
    sec_len = []
    for total, k in zip(ctx_len.tolist(), sections.tolist()):  # each section >= 1 word, the rest shared at random
        share = rng.dirichlet(np.full(k, 3.0))
        sec = 1 + np.floor(share * max(total - k, 0)).astype(np.int64)
        sec[-1] += max(total, k) - sec.sum()
        sec_len.append(sec)
    sec_texts = words.texts(np.concatenate(sec_len))
    long_answers = words.texts(_lognormal_lengths(rng, n, PUBMEDQA_LONG_ANSWER_WORDS, 0.4))
    rows, at, contexts = [], 0, []
    for i in range(n):
        k = int(sections[i])
        ctx = sec_texts[at : at + k]
        at += k
        if i < min(10, n):
            ctx[-1] = f"{ctx[-1]} {passage()}"
        contexts.append(" ".join(ctx))
        labels = [PUBMEDQA_LABELS[j % len(PUBMEDQA_LABELS)] for j in range(k)]
        rows.append({"pubid": 10_000_000 + i, "question": questions[i],
                     "context": {"contexts": ctx, "labels": labels}, "long_answer": long_answers[i],
                     "final_decision": ("yes", "no", "maybe")[i % 3]})
    write(path := root / "pubmedqa.jsonl", rows)
    out.append((path, {"name": "PubMedQA", "items": n, "question": mean_words(questions),
                       "context": mean_words(contexts), "sections": float(sections.mean()),
                       "long_answer (not indexed)": mean_words(long_answers)}))
    # MMLU clinical subsets
    rows, all_q, all_o = [], [], []
    for subject, (test, val, dev, q_words, o_words) in MMLU_SUBJECTS.items():
        k = sum(_scaled(c, scale) for c in (test, val, dev))
        questions = words.texts(_lognormal_lengths(rng, k, q_words, 0.5))
        options = words.texts(_short_lengths(rng, 4 * k, o_words))
        answers = rng.integers(0, 4, k).tolist()
        rows += [{"question": questions[i], "subject": subject, "choices": options[4 * i : 4 * i + 4],
                  "answer": answers[i]} for i in range(k)]
        all_q += questions
        all_o += options
    for i in range(min(5, len(rows))):
        j = i * (len(rows) // min(5, len(rows)))
        rows[j]["question"] = all_q[j] = passage()
    write(path := root / "mmlu_clinical.jsonl", rows)
    out.append((path, {"name": "MMLU", "items": len(rows), "question": mean_words(all_q), "option": mean_words(all_o)}))
    return out


def eval_sets_line(sets: list[tuple[Path, dict]], scale: float) -> str:
    """One line describing the evaluation side: per file its items, realised mean words and MB."""
    parts = []
    for path, st in sets:
        lengths = ", ".join(f"{k} {v:.1f}" for k, v in st.items() if k not in ("name", "items"))
        parts.append(f"{st['name']} {st['items']:,} ({lengths} words; {path.stat().st_size / 1e6:.1f} MB)")
    total = sum(st["items"] for _, st in sets)
    mb = sum(p.stat().st_size for p, _ in sets) / 1e6
    return (f"evaluation side of decontaminate (--eval-scale {scale:g} of the published sizes): " + " + ".join(parts)
            + f" = {total:,} questions, {mb:.0f} MB, 13-grams")


DECON_BUILT, DECON_CACHED = "clinmega decontaminate (index built)", "clinmega decontaminate (index cached)"


def tool_commands(corpus: Path, root: Path, tag: str, workers: int, megatron_lm: Path | None,
                  evals: list[Path], index_cache: Path | None = None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The fresh-process commands of the table, each writing under ``root`` with ``tag`` in its names.

    The two decontaminate rows run the same command with ``--index-cache index_cache``: the first builds the
    evaluation index and stores it there, the second reuses it. Without ``index_cache`` (the start-up runs on
    a one-question evaluation file) both run without a cache."""
    me = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=me, OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "clinmega.cli"]
    rows: dict[str, tuple[list[str], dict[str, str]]] = {}
    if megatron_lm is not None:
        menv = dict(os.environ, PYTHONPATH=str(megatron_lm), OMP_NUM_THREADS="1")
        common = ["--input", str(corpus), "--json-keys", "text", "--tokenizer-type", "HuggingFaceTokenizer",
                  "--tokenizer-model", str(hf_tokenizer_dir(root)), "--append-eod"]
        rows["Megatron-LM preprocess_data.py"] = (
            [sys.executable, str(megatron_lm / "tools/preprocess_data.py"), *common, "--output-prefix",
             str(root / f"mslow-{tag}"), "--workers", str(workers)], menv)
        rows["Megatron-LM preprocess_data_fast.py --use-gigatoken"] = (
            [sys.executable, str(megatron_lm / "tools/preprocess_data_fast.py"), *common, "--output-prefix",
             str(root / f"mfast-{tag}"), "--use-gigatoken"], menv)
    rows["clinmega prepare pretrain"] = (
        [*cli, "prepare", "pretrain", "--inputs", str(corpus), "--output-prefix", str(root / f"clin-{tag}"),
         "--workers", str(workers), "--overwrite", "--no-progress"], env)
    cache = ["--index-cache", str(index_cache)] if index_cache is not None else []
    for name, out in ((DECON_BUILT, f"decon-{tag}"), (DECON_CACHED, f"decon-cached-{tag}")):
        rows[name] = (
            [*cli, "decontaminate", "--inputs", str(corpus), "--eval-sets", *map(str, evals), "--output-dir",
             str(root / out), "--mode", "report", "--workers", str(workers), "--overwrite", "--no-progress",
             *cache], env)
    return rows


def _raw_share(args: tuple[str, int, int]) -> tuple[int, float]:
    """Spawned worker: gigatoken batch-encodes its share of the corpus' texts (read, parsed and held in
    memory before timing); returns (tokens, seconds)."""
    from clinmega.data.readers import iter_records, plan_chunks
    from clinmega.data.tokenizers import load_tokenizer

    path, rank, world = args
    tok = load_tokenizer("mistral-v1", backend="gigatoken")
    texts = [r.value for c in plan_chunks([Path(path)], 1) for i, r in enumerate(iter_records(c, "text", []))
             if r.reason is None and i % world == rank]
    t0 = time.perf_counter()
    tokens = sum(tok.encode_flat(texts[i : i + 1024])[0].size for i in range(0, len(texts), 1024))
    return tokens, time.perf_counter() - t0


def raw_gigatoken_ceiling(corpus: Path, workers: int) -> tuple[int, float]:
    """(tokens, seconds of the slowest worker) of ``workers`` processes encoding the texts in memory."""
    with mp.get_context("spawn").Pool(workers) as pool:
        res = pool.map(_raw_share, [(str(corpus), r, workers) for r in range(workers)])
    return sum(r[0] for r in res), max(r[1] for r in res)


def token_streams(prefix: Path) -> tuple[np.ndarray, np.ndarray]:
    """(all tokens, document lengths) of a Megatron .bin/.idx pair."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    lengths = np.asarray(ds.index.sequence_lengths, dtype=np.int64)
    tokens = np.fromfile(str(prefix) + ".bin", dtype=ds.index.dtype)
    return tokens, lengths


def ceiling_row(corpus: Path, workers: int, size_mb: float) -> None:
    """Print the raw gigatoken ceiling: the same texts, already in memory, batch-encoded on ``workers``."""
    tokens, ceiling = raw_gigatoken_ceiling(corpus, workers)
    print(f"{'raw gigatoken ceiling (texts in memory, encode only)':52s} {'':7s} {'':7s} {ceiling:7.1f} "
          f"{size_mb / ceiling:6.1f}  {tokens / ceiling / 1e6:.1f} M tok/s on {workers} processes", flush=True)


def ids_check(root: Path, tag: str, corpus: Path, fast: bool, slow: bool) -> list[str]:
    """clinmega's written ids against Megatron-LM's (whole corpus: clinmega = BOS + Megatron's document)
    and against the sentencepiece library itself on sampled documents."""
    from clinmega.data.readers import iter_records, plan_chunks
    from clinmega.data.tokenizers import load_tokenizer

    lines = []
    tokens, lengths = token_streams(root / f"clin-{tag}")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    sp = load_tokenizer("mistral-v1", backend="sentencepiece")
    bos_everywhere = bool((tokens[starts] == sp.bos_id).all())
    others = [("preprocess_data_fast.py", f"mfast-{tag}_text_document")] * fast + \
        [("preprocess_data.py", f"mslow-{tag}_text_document")] * slow
    if others:
        no_bos = np.ones(len(tokens), dtype=bool)
        no_bos[starts] = False
        for name, prefix in others:
            other, other_lengths = token_streams(root / prefix)
            same = (np.array_equal(other_lengths, lengths - 1) and np.array_equal(other, tokens[no_bos]))
            lines.append(f"ids: clinmega (minus its BOS) == {name}, all {len(lengths):,} documents: {same}")
    wanted = set(random.Random(1).sample(range(len(lengths)), min(300, len(lengths))))
    bad = 0
    i = 0
    for chunk in plan_chunks([corpus], 1):
        for rec in iter_records(chunk, "text", []):
            if rec.reason is None:
                if i in wanted:
                    doc = tokens[starts[i] : starts[i] + lengths[i]].tolist()
                    bad += doc != [sp.bos_id, *sp.encode(rec.value), sp.eod_id]
                i += 1
    lines.append(f"ids: clinmega vs the sentencepiece library on {len(wanted)} sampled documents: {bad} differ; "
                 f"BOS on every document: {bos_everywhere}")
    return lines


def side_by_side(corpus: Path, root: Path, workers: int, megatron_lm: Path | None, eval_scale: float,
                 skip: list[str]) -> None:
    """One table of fresh-process runs on the same corpus and cores: wall, start-up (the same command on a
    one-document corpus and a one-question evaluation set, no index cache), work rate without start-up (by
    wall and by CPU seconds of the process tree, the latter barely moved by other load), peak memory of the
    process tree; ratios to preprocess_data_fast.py and to prepare; the ids check. Decontaminate runs against
    the evaluation sets of :func:`make_eval_sets` at ``eval_scale``, twice: building its evaluation index
    into a fresh cache directory, then reusing it."""
    import platform

    size_mb = corpus.stat().st_size / 1e6
    print(f"corpus {corpus} {size_mb:.1f} MB; {workers} workers; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; load average before {os.getloadavg()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if megatron_lm is None:
        print(MEGATRON_HOWTO)
    tiny = root / "tiny.jsonl"
    with open(corpus, encoding="utf-8") as f:
        tiny.write_text(f.readline(), encoding="utf-8")
    (root / "evals").mkdir()
    t0 = time.perf_counter()
    sets = make_eval_sets(root / "evals", corpus, eval_scale)
    made = time.perf_counter() - t0
    evals, tiny_evals = [p for p, _ in sets], root / "eval_one.jsonl"
    with open(evals[0], encoding="utf-8") as f:
        tiny_evals.write_text(f.readline(), encoding="utf-8")
    print(f"{eval_sets_line(sets, eval_scale)} (generated in {made:.1f}s)")
    starts = tool_commands(tiny, root, "tiny", workers, megatron_lm, [tiny_evals])
    runs = tool_commands(corpus, root, "full", workers, megatron_lm, evals, index_cache=root / "index-cache")
    slow = "Megatron-LM preprocess_data.py"
    order = [k for k in runs if k != slow] + [k for k in runs if k == slow]  # the slowest last
    results: dict[str, dict[str, float]] = {}
    print(f"\n{'':52s} {'wall s':>7s} {'start s':>7s} {'work s':>7s} {'MB/s':>6s} {'CPU s':>7s} {'work CPU':>8s} "
          f"{'MB/CPU-s':>8s} {'tree RSS':>8s} {'tree PSS':>8s} {'largest':>7s}  {'vs fast (wall / work / CPU)':>27s}  "
          f"{'vs prepare (wall / CPU)':>23s}  load")

    def row(name: str, r: dict[str, float]) -> None:
        fast = results.get("Megatron-LM preprocess_data_fast.py --use-gigatoken")
        prep = results.get("clinmega prepare pretrain")
        vs_fast = (f"{fast['wall'] / r['wall']:5.2f}x / {fast['work'] / r['work']:5.2f}x / "
                   f"{fast['work_cpu'] / r['work_cpu']:5.2f}x") if fast else ""
        vs_prep = f"{prep['wall'] / r['wall']:5.2f}x / {prep['work_cpu'] / r['work_cpu']:5.2f}x" if prep else ""
        print(f"{name:52s} {r['wall']:7.1f} {r['startup']:7.1f} {r['work']:7.1f} {size_mb / r['work']:6.1f} "
              f"{r['cpu']:7.1f} {r['work_cpu']:8.1f} {size_mb / r['work_cpu']:8.1f} {r['rss_sum']:6.0f}Mi "
              f"{r['pss_sum']:6.0f}Mi {r['largest']:5.0f}Mi  {vs_fast:>27s}  {vs_prep:>23s}  {os.getloadavg()[0]:.0f}",
              flush=True)

    for name in order:
        if any(k in name for k in skip):
            continue
        if name == DECON_CACHED and DECON_BUILT not in results:  # it would build the index itself
            print(f"{name:52s} left out: it reuses the index the row {DECON_BUILT!r} builds, which was skipped")
            continue
        if name == slow:  # the ceiling before the slowest row, so a cut-short run still has it
            ceiling_row(corpus, workers, size_mb)
        cmd, env = runs[name]
        start = run_tree(starts[name][0], starts[name][1], root / "log.txt")
        r = run_tree(cmd, env, root / "log.txt")
        r["startup"] = start["wall"]
        r["work"] = r["wall"] - start["wall"]  # wall: noisy on a shared machine (NaN where start-up took longer)
        if r["work"] <= 0:
            r["work"] = float("nan")
        r["work_cpu"] = max(r["cpu"] - start["cpu"], 1e-9)  # CPU seconds: what the load changes least
        results[name] = r
        row(name, r)
    if slow not in results:
        ceiling_row(corpus, workers, size_mb)
    fast = results.get("Megatron-LM preprocess_data_fast.py --use-gigatoken")
    prep = results.get("clinmega prepare pretrain")
    if prep:
        for line in ids_check(root, "full", corpus, fast is not None, slow in results):
            print(line)
    print(f"load average after: {os.getloadavg()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=None, help="any input prepare pretrain reads (default: generate)")
    ap.add_argument("--text-field", default="text", help="the text field of --corpus (dotted keys allowed)")
    ap.add_argument("--generator", choices=["long-tail", "zipf"], default="long-tail",
                    help="the generated corpus: long-tail clinical-note-like text (default) or the Zipf word list")
    ap.add_argument("--mb", type=int, default=200, help="size of the generated corpus")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="directory to keep the corpus/output in")
    ap.add_argument("--megatron-lm", type=Path, default=None, help="a Megatron-LM source tree (" + MEGATRON_HOWTO + ")")
    ap.add_argument("--eval-scale", type=float, default=1.0,
                    help="side-by-side decontaminate: evaluation sets at this fraction of the published sizes "
                         "(MedMCQA, MedQA, PubMedQA, MMLU clinical subsets; 1.0 = the real sizes, 0.1 for quick runs)")
    ap.add_argument("--side-by-side-only", action="store_true", help="only the fresh-process comparison table")
    ap.add_argument("--skip", action="append", default=[],
                    help="side-by-side: leave out the rows whose name contains this (repeatable)")
    args = ap.parse_args()
    if not args.eval_scale > 0:
        ap.error(f"--eval-scale must be > 0, got {args.eval_scale}")
    if args.side_by_side_only:
        root = Path(tempfile.mkdtemp(prefix="bench_prepare_", dir=args.keep))
        try:
            corpus = args.corpus or root / f"corpus-{args.generator}.jsonl"
            if args.corpus is None:
                (make_long_tail_corpus if args.generator == "long-tail" else make_corpus)(corpus, args.mb)
            side_by_side(corpus, root, args.workers, args.megatron_lm, args.eval_scale, args.skip)
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
    corpus = args.corpus or root / f"corpus-{args.generator}.jsonl"
    try:
        t0 = time.perf_counter()
        if not args.corpus and not (corpus.exists() and args.keep):  # a kept corpus is reused
            (make_long_tail_corpus if args.generator == "long-tail" else make_corpus)(corpus, args.mb)
        size_mb = corpus.stat().st_size / 1e6
        print(f"corpus: {corpus} ({'given' if args.corpus else args.generator}), {size_mb:.1f} MB, "
              f"ready in {time.perf_counter() - t0:.1f}s")
        print(vocabulary_stats(corpus_texts(corpus, args.text_field, max_chars=20e6)))
        startup, startup_cpu = cli_startup_seconds(root, args.workers)
        print(f"process start-up of `clinmega prepare pretrain` (one-document corpus; python, imports, tokenizer, "
              f"{args.workers} workers): {startup:.1f}s wall, {startup_cpu:.1f} CPU-s — not in the rates below")
        from clinmega.data.tokenizers import cached_tokenizer

        cached_tokenizer("mistral-v1", "auto")  # loaded before timing, as the start-up above already counts it

        t0, c0 = time.perf_counter(), _cpu_seconds()
        m = prepare_pretrain(
            PretrainPrepConfig(
                inputs=[str(corpus)],
                text_field=args.text_field,
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

        raw_tokens, raw_wall, raw_cpu = raw_throughput(corpus, args.workers, backend, args.text_field)
        raw_tps = raw_tokens / raw_wall
        print(
            f"raw {backend} batch encode, {args.workers} processes, texts in memory: "
            f"{raw_tokens / 1e6:.1f} M tokens in {raw_wall:.1f}s = {raw_tps / 1e6:.2f} M tok/s; "
            f"{raw_tokens / raw_cpu / 1e6:.2f} M tok per CPU-s"
        )
        texts = corpus_texts(corpus, args.text_field)  # after the measured run: not in its RSS
        sp_tokens, sp_wall = sentencepiece_slice(texts, 3000)
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
        bad, bos = check_exact(root / "out", texts)
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
