"""``clinmega demo``: every arrow of the pipeline on a tiny random Mistral, on CPU, in minutes.

    random HF checkpoint --import-hf--> Megatron checkpoint --CPT (clinical 0.8 / general 0.2)-->
    --SFT + NEFTune--> --export-hf--> HF checkpoint --eval (zero-shot, CoT, self-consistency,
    choice shuffle)--> report

Each stage runs as its own ``clinmega`` command in a subprocess, printed before it runs, exactly as a
user would type it; the recipes it trains with are written next to the outputs. The model is tiny
and randomly initialised and the data synthetic: the numbers are a smoke test of the machinery, not
clinical results.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from clinmega.demo import synthetic

PRESET = "tiny-mistral-v0.1"
STRATEGIES = ("zero_shot", "cot", "self_consistency", "choice_shuffle")
BENCHMARKS = "medqa_4options,medmcqa,pubmedqa,mmlu_clinical_knowledge"


@dataclass
class DemoOptions:
    out: Path
    cpt_steps: int = 30
    sft_steps: int = 30
    seq_length: int = 128
    eval_limit: int = 8
    seed: int = 1234


class StageFailed(RuntimeError):
    """A stage's command failed; ``clinmega demo`` exits with its exit code (clinmega.cli.run_verb)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Stage:
    """Runs the pipeline's commands, timing each, stopping at the first failure."""

    def __init__(self, out: Path):
        self.out = out
        self.timings: list[tuple[str, float]] = []
        self.log = out / "commands.sh"
        self.log.write_text("#!/bin/bash\n# The commands `clinmega demo` ran, in order.\nset -e\n")

    def run(self, title: str, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "clinmega.cli", *map(str, args)]
        shown = "clinmega " + " ".join(shlex.quote(str(a)) for a in args)
        print(f"\n=== {title}\n$ {shown}", flush=True)
        with open(self.log, "a") as f:
            f.write(shown + "\n")
        start = time.monotonic()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        result = subprocess.run(cmd, env=env)
        self.timings.append((title, time.monotonic() - start))
        if result.returncode != 0:
            raise StageFailed(f"stage '{title}' failed (exit {result.returncode}): {shown}", result.returncode)


def _write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text("# Written by `clinmega demo`.\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


def _train_recipe(opts: DemoOptions, stage: str, run_dir: Path, data: dict, load_weights: Path,
                  steps: int, lr: float, neftune: float | None) -> dict:
    return {
        "run_dir": str(run_dir),  # no model section: the model is the one load_weights records
        "precision": {"dtype": "fp32"},
        "runtime": {"seed": opts.seed},
        "train": {"stage": stage, "steps": steps, "global_batch_size": 8, "micro_batch_size": 4,
                  "seq_length": opts.seq_length, "lr": lr, "min_lr": lr / 10,
                  "warmup_steps": max(1, steps // 10), "decay_style": "cosine",
                  "rewarm": stage == "cpt", "weight_decay": 0.1, "save_interval": 0,
                  "eval_interval": steps, "eval_iters": 1, "neftune_alpha": neftune},
        "data": data,
        "checkpoint": {"load_weights": str(load_weights), "keep_last": 1},
        "logging": {"progress": False},
    }


def run_demo(opts: DemoOptions) -> dict:
    from clinmega.evaluation.benchmarks import SYNTHETIC_DIR
    from clinmega.evaluation.synthetic_data import synthetic_files
    from clinmega.models import get_preset
    from clinmega.demo.hf_checkpoint import save_random_hf_checkpoint

    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    print("clinmega demo: a TINY, RANDOMLY INITIALISED Mistral on SYNTHETIC data, on CPU.\n"
          "Every number below is a smoke test of the pipeline, not a clinical result.", flush=True)
    stage = Stage(out)
    started = time.monotonic()

    hf_base = out / "hf-base"
    print(f"\n=== random-initialised HF checkpoint of {PRESET} with the real Mistral v1 tokenizer "
          f"-> {hf_base}", flush=True)
    save_random_hf_checkpoint(get_preset(PRESET), hf_base, seed=opts.seed)

    raw = out / "data" / "raw"
    clinical = synthetic.write_jsonl(synthetic.clinical_documents(400), raw / "clinical.jsonl",
                                     corrupt_lines=2)
    general = synthetic.write_jsonl(synthetic.general_documents(200), raw / "general.jsonl",
                                    corrupt_lines=1)
    chat = synthetic.write_jsonl(synthetic.chat_examples(240), raw / "chat.jsonl")
    eval_sets = [str(SYNTHETIC_DIR / rel) for rel in synthetic_files()
                 if "train" not in rel and rel.endswith((".jsonl", ".json"))]

    stage.run("import the HF checkpoint into a megatron-core distributed checkpoint",
              ["import-hf", hf_base, out / "megatron-base", "--overwrite", "--no-progress"])
    stage.run("decontaminate the clinical corpus against the evaluation sets (13-grams)",
              ["decontaminate", "--inputs", clinical, "--eval-sets", *eval_sets,
               "--output-dir", out / "data" / "decontam", "--mode", "remove", "--overwrite"])
    prefixes = {}
    for name, path in (("clinical", out / "data" / "decontam" / clinical.name), ("general", general)):
        prefixes[name] = out / "data" / name
        stage.run(f"tokenize the {name} corpus into an indexed dataset",
                  ["prepare", "pretrain", "--inputs", path, "--output-prefix", prefixes[name],
                   "--tokenizer", "mistral-v1", "--workers", "1", "--overwrite", "--no-progress"])
    stage.run("template, mask and pack the chat set for SFT",
              ["prepare", "sft", "--inputs", chat, "--output-dir", out / "data" / "sft",
               "--tokenizer", "mistral-v1", "--seq-length", opts.seq_length, "--workers", "1",
               "--overwrite", "--no-progress"])

    cpt_dir, sft_dir = out / "cpt", out / "sft"
    cpt = _write_recipe(out / "recipe_cpt.yaml", _train_recipe(
        opts, "cpt", cpt_dir, {"kind": "indexed",
                               "prefixes": [str(prefixes["clinical"]), str(prefixes["general"])],
                               "weights": [0.8, 0.2]},
        out / "megatron-base", opts.cpt_steps, 1e-3, None))
    stage.run("continuous pretraining: clinical 0.8 / general 0.2", ["train", cpt])
    sft = _write_recipe(out / "recipe_sft.yaml", _train_recipe(
        opts, "sft", sft_dir, {"kind": "sft", "sft_path": str(out / "data" / "sft")},
        cpt_dir, opts.sft_steps, 5e-4, 5.0))
    stage.run("instruct tuning with NEFTune (alpha 5)", ["train", sft])
    for run_dir in (cpt_dir, sft_dir):
        stage.run(f"plot the {run_dir.name.upper()} loss/LR curves", ["plot", run_dir])

    hf_sft = out / "hf-sft"
    stage.run("export the instruct-tuned checkpoint to Hugging Face safetensors",
              ["export-hf", sft_dir, hf_sft, "--overwrite", "--no-progress"])
    reports = {}
    for name, model in (("base", hf_base), ("sft", hf_sft)):
        stage.run(f"evaluate the {name} model with prompt strategies",
                  ["eval", model, "--backend", "hf", "--benchmarks", BENCHMARKS,
                   "--strategies", ",".join(STRATEGIES), "--limit", opts.eval_limit,
                   "--samples", 3, "--max-new-tokens", 24, "--seed", opts.seed,
                   "--out", out / f"eval-{name}"])
        reports[name] = json.loads((out / f"eval-{name}" / "results.json").read_text())
    summary = summarize(reports, stage.timings, time.monotonic() - started)
    (out / "summary.md").write_text(summary)
    print("\n" + summary, flush=True)
    return reports


def _accuracy_rows(report: dict) -> dict[tuple[str, str], float]:
    rows = {}
    for entry in report["summary"]:
        rows[(entry["benchmark"], entry["strategy"])] = entry["acc"]["value"]
    return rows


def summarize(reports: dict, timings: list[tuple[str, float]], total: float) -> str:
    base, sft = (_accuracy_rows(reports[k]) for k in ("base", "sft"))
    lines = ["# clinmega demo summary", "",
             "Tiny random-initialised model, synthetic data: a smoke test, not clinical results.", "",
             "| benchmark | strategy | base acc | CPT+SFT acc |", "|---|---|---|---|"]
    for key in sorted(base):
        lines.append(f"| {key[0]} | {key[1]} | {base[key]:.3f} | {sft.get(key, float('nan')):.3f} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {title} | {seconds:.1f} |" for title, seconds in timings]
    lines += [f"| total | {total:.1f} |", ""]
    return "\n".join(lines)
