"""Benchmark loaders: a benchmark's split under a data folder -> a list of `Item`.

Each file is read by :func:`clinmega.benchmark_files.load_file` (the accepted layouts of the public
releases are listed there; problems are raised together as one `BenchmarkFormatError`).

`load_benchmark(name, data_dir, split)` reads every file of a split under ``<data_dir>/<directory>/``
(patterns in `BENCHMARKS`; the layout of each file is detected, so any accepted layout works for any
benchmark):

    <data_dir>/medqa/*test*.jsonl, *train*.jsonl          (5 options, US)
    <data_dir>/medqa_4options/*test*.jsonl, *train*.jsonl
    <data_dir>/medmcqa/*dev*.json[l] (scored: the public test split has no answers), *train*.json[l]
    <data_dir>/pubmedqa/*test*.json[l], *train*.json[l]
    <data_dir>/mmlu/**/<subject>_test.csv, **/<subject>_dev.csv (few-shot pool), as in hendrycks' data.tar
                                                          (or <subject>_test.jsonl / _dev.jsonl: cais/mmlu rows)
    <data_dir>/custom/*test*.json[l], *train*.json[l]     (e.g. an in-house set in the normalized layout)

Without ``data_dir`` it reads the SYNTHETIC set shipped in `clinmega/evaluation/synthetic/` (same layout;
for tests and the demo only: not real benchmark items).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from clinmega.benchmark_files import Item, load_file

SYNTHETIC_DIR = Path(__file__).parent / "synthetic"


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark's files: glob patterns inside ``<data_dir>/<directory>/``, per split."""

    name: str
    directory: str
    test: tuple[str, ...]
    train: tuple[str, ...]


MMLU_CLINICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                 "medical_genetics", "professional_medicine")

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("medqa", "medqa", ("*test*.jsonl",), ("*train*.jsonl",)),
        BenchmarkSpec("medqa_4options", "medqa_4options", ("*test*.jsonl",), ("*train*.jsonl",)),
        BenchmarkSpec("medmcqa", "medmcqa", ("*dev*.json*", "*validation*.json*"), ("*train*.json*",)),
        BenchmarkSpec("pubmedqa", "pubmedqa", ("*test*.json*",), ("*train*.json*",)),
        *(BenchmarkSpec(f"mmlu_{s}", "mmlu", (f"**/{s}_test.csv", f"**/{s}_test.jsonl"),
                        (f"**/{s}_dev.csv", f"**/{s}_dev.jsonl")) for s in MMLU_CLINICAL),
        BenchmarkSpec("custom", "custom", ("*test*.json*",), ("*train*.json*",)),  # your own set, any layout
    )
}
BENCHMARK_GROUPS = {"mmlu_clinical": tuple(f"mmlu_{s}" for s in MMLU_CLINICAL),
                    # lm-eval's `multimedqa` group (its report row is the size-weighted mean, `report`)
                    "multimedqa": ("pubmedqa", "medmcqa", "medqa_4options",
                                   *(f"mmlu_{s}" for s in MMLU_CLINICAL))}


def expand_benchmark_names(names: list[str]) -> list[str]:
    """Expand groups (``mmlu_clinical``) and check that each name is known."""
    out: list[str] = []
    for name in names:
        for n in BENCHMARK_GROUPS.get(name, (name,)):
            if n not in BENCHMARKS:
                known = sorted([*BENCHMARKS, *BENCHMARK_GROUPS])
                raise ValueError(f"unknown benchmark {n!r}; known: {', '.join(known)}")
            out.append(n)
    return out


def load_benchmark(name: str, data_dir: str | Path | None = None, split: str = "test",
                   cop_base: int | None = None) -> list[Item]:
    """Load all files of one benchmark split (``test`` or ``train``) under ``data_dir/<directory>/``.

    ``data_dir=None`` reads the synthetic set shipped in `SYNTHETIC_DIR` (same layout).
    """
    spec = BENCHMARKS[name]
    root = Path(data_dir if data_dir is not None else SYNTHETIC_DIR) / spec.directory
    patterns = getattr(spec, split)
    paths = sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()})
    if not paths:
        raise FileNotFoundError(f"{name}/{split}: no file under {root} matches {list(patterns)}")
    return [replace(item, benchmark=name) for p in paths for item in load_file(p, cop_base=cop_base)]
