"""``clinmega demo``: every arrow of the pipeline on a tiny random Mistral, on CPU, in minutes.

    random HF checkpoint --import-hf--> Megatron checkpoint --CPT (clinical 0.8 / general 0.2)-->
    --SFT + NEFTune--> --export-hf--> HF checkpoint --eval (zero-shot, CoT, self-consistency,
    choice shuffle)--> report

It reads like a tutorial: each stage is its own ``clinmega`` command in a subprocess, printed before it
runs exactly as a user would type it (and appended to ``OUT/commands.sh``), followed by a progress bar
(training steps, evaluation parts; elapsed time otherwise) and a one-line result read from what the
command wrote. A command's full output is kept in ``OUT/logs/NN-VERB.log``; its stderr (clinmega's own
warnings, errors) is shown, with C++ library warning lines counted into the one library-warning total
(:func:`clinmega.utils.quiet.relay_stderr`). The recipes it trains with are written next to the
outputs. The model is tiny and randomly initialised and the data synthetic: the numbers are a smoke
test of the machinery, not clinical results.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from clinmega.demo import synthetic
from clinmega.utils import quiet

PRESET = "tiny-mistral-v0.1"
STRATEGIES = ("zero_shot", "cot", "self_consistency", "choice_shuffle")
BENCHMARKS = "medqa_4options,medmcqa,pubmedqa,mmlu_clinical_knowledge"
STAGES = 13  # the random HF checkpoint and the 12 commands below


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


Progress = Callable[[], "tuple[int, int | None]"]  # (done, total) of a running stage


class Stage:
    """Runs the pipeline's commands in order, each with its header, progress bar and result line."""

    def __init__(self, out: Path):
        self.out = out
        self.n = 0
        self.timings: list[tuple[str, float]] = []
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log = out / "commands.sh"
        self.log.write_text("#!/bin/bash\n# The commands `clinmega demo` ran, in order.\nset -e\n")

    def header(self, title: str, command: str | None = None) -> None:
        self.n += 1
        print(f"\n[{self.n}/{STAGES}] {title}" + (f"\n$ {command}" if command else ""), flush=True)

    def result(self, title: str, seconds: float, line: str) -> None:
        self.timings.append((title, seconds))
        print(f"  -> {line} ({seconds:.1f} s)", flush=True)

    def run(self, title: str, args: list, result: Callable[[str], str], progress: Progress | None = None) -> str:
        """Run ``clinmega ARGS``; returns its stdout (also in ``OUT/logs/``)."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        args = [str(a) for a in args]
        shown = "clinmega " + " ".join(shlex.quote(a) for a in args)
        self.header(title, shown)
        with open(self.log, "a") as f:
            f.write(shown + "\n")
        verb = args[0] + (f"-{args[1]}" if args[0] == "prepare" else "")  # prepare's sub-verb too
        log_path = self.logs / f"{self.n:02d}-{verb}.log"
        # the demo draws the bar; the libraries' own (transformers' weight loading) would repeat it
        env = quiet.child_env({**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                               "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
        console = Console(stderr=True, soft_wrap=True)
        start = time.monotonic()
        columns = [TextColumn("  {task.description}"), BarColumn(), TimeElapsedColumn()]
        if progress is not None:
            columns.insert(2, MofNCompleteColumn())
        bar = Bar(*columns, console=console, transient=True) if console.is_terminal else None  # no bar in a log
        with open(log_path, "w") as stdout, bar or contextlib.nullcontext():
            task = bar.add_task(args[0], total=None) if bar is not None else None
            proc = subprocess.Popen([sys.executable, "-m", "clinmega.cli", *args], env=env, stdout=stdout,
                                    stderr=subprocess.PIPE, text=True, errors="replace")
            relay = threading.Thread(target=quiet.relay_stderr, daemon=True, args=(
                proc.stderr, lambda line: console.print(line.rstrip("\n"), markup=False, highlight=False,
                                                        emoji=False)))
            relay.start()
            while proc.poll() is None:
                if bar is not None and progress is not None:
                    done, total = progress()
                    bar.update(task, completed=done, total=total)
                time.sleep(0.3)
            relay.join()
        seconds = time.monotonic() - start
        if proc.returncode != 0:
            raise StageFailed(f"stage '{title}' failed (exit {proc.returncode}): {shown} (its output: {log_path})",
                              proc.returncode)
        text = log_path.read_text()
        self.result(title, seconds, result(text))
        return text


# ------------------------------------------------------------- one-line results, read from the outputs
def _json(text: str) -> dict:
    """The JSON object a data verb prints (after any progress line)."""
    start = text.index("{\n") if text.startswith("{\n") else text.index("\n{\n") + 1
    return json.JSONDecoder().raw_decode(text[start:])[0]


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def _decontam_result(text: str) -> str:
    report = _json(text)
    return (f"{report['totals']['documents_read']:,} documents read, {report['documents_flagged']:,} flagged, "
            f"{report['totals']['documents_written']:,} kept")


def _pretrain_result(text: str) -> str:
    report = _json(text)
    totals, skipped = report["totals"], report["totals"]["skipped"]
    why = f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""
    return (f"{totals['documents_written']:,} documents, {totals['tokens']:,} tokens, "
            f"{totals['documents_skipped']} skipped{why} -> {report['output']['prefix']}.bin/.idx")


def _sft_result(text: str) -> str:
    packing = _json(text)["packing"]
    return (f"{packing['samples']:,} examples packed into {packing['bins']:,} sequences of "
            f"{packing['capacity']} tokens ({packing['efficiency']:.0%} filled)")


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            pass
    return [r for r in records if "loss" in r]


def _train_progress(run_dir: Path, steps: int) -> Progress:
    return lambda: (max([r["step"] for r in _steps(run_dir)], default=0), steps)


def _train_result(run_dir: Path) -> Callable[[str], str]:
    def result(text: str) -> str:
        status, losses = json.loads(_last_line(text)), [r["loss"] for r in _steps(run_dir)]
        return (f"{status['step']} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f}; checkpoint "
                f"{status['checkpoint']}/iter_{status['latest']:07d}")
    return result


def _eval_progress(out: Path, parts: int) -> Progress:
    return lambda: (len(list((out / "parts").glob("*.json"))) if (out / "parts").is_dir() else 0, parts)


def _eval_result(out: Path) -> Callable[[str], str]:
    def result(text: str) -> str:
        rows = json.loads((out / "results.json").read_text())["summary"]
        mean = {s: sum(r["acc"]["value"] for r in rows if r["strategy"] == s) /
                max(1, sum(r["strategy"] == s for r in rows)) for s in STRATEGIES}
        return ("mean accuracy " + ", ".join(f"{s} {a:.3f}" for s, a in mean.items()) +
                f"; report {out / 'results.md'}")
    return result


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
    }


def run_demo(opts: DemoOptions) -> dict:
    from clinmega.evaluation.benchmarks import SYNTHETIC_DIR
    from clinmega.evaluation.synthetic_data import synthetic_files
    from clinmega.models import get_preset
    from transformers.utils import logging as hf_logging

    from clinmega.demo.hf_checkpoint import save_random_hf_checkpoint

    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    print("clinmega demo: a TINY, RANDOMLY INITIALISED Mistral on SYNTHETIC data, on CPU.\n"
          "Every number below is a smoke test of the pipeline, not a clinical result.", flush=True)
    stage = Stage(out)
    started = time.monotonic()

    hf_base = out / "hf-base"
    title = f"a random-initialised HF checkpoint of {PRESET} with the real Mistral v1 tokenizer"
    stage.header(title)
    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar of a one-shard save
    try:
        save_random_hf_checkpoint(get_preset(PRESET), hf_base, seed=opts.seed)
    finally:
        hf_logging.enable_progress_bar()
    stage.result(title, time.monotonic() - started, f"{hf_base} (config.json, model.safetensors, tokenizer)")

    raw = out / "data" / "raw"
    clinical = synthetic.write_jsonl(synthetic.clinical_documents(400), raw / "clinical.jsonl",
                                     corrupt_lines=2)
    general = synthetic.write_jsonl(synthetic.general_documents(200), raw / "general.jsonl",
                                    corrupt_lines=1)
    chat = synthetic.write_jsonl(synthetic.chat_examples(240), raw / "chat.jsonl")
    eval_sets = [str(SYNTHETIC_DIR / rel) for rel in synthetic_files()
                 if "train" not in rel and rel.endswith((".jsonl", ".json"))]

    stage.run("import the HF checkpoint into a megatron-core distributed checkpoint",
              ["import-hf", hf_base, out / "megatron-base", "--overwrite"], _last_line)
    stage.run("decontaminate the clinical corpus against the evaluation sets (13-grams)",
              ["decontaminate", "--inputs", clinical, "--eval-sets", *eval_sets,
               "--output-dir", out / "data" / "decontam", "--mode", "remove", "--overwrite"],
              _decontam_result)
    prefixes = {}
    for name, path in (("clinical", out / "data" / "decontam" / clinical.name), ("general", general)):
        prefixes[name] = out / "data" / name
        stage.run(f"tokenize the {name} corpus into an indexed dataset",
                  ["prepare", "pretrain", "--inputs", path, "--output-prefix", prefixes[name],
                   "--tokenizer", "mistral-v1", "--workers", "1", "--overwrite"], _pretrain_result)
    stage.run("template, mask and pack the chat set for SFT",
              ["prepare", "sft", "--inputs", chat, "--output-dir", out / "data" / "sft",
               "--tokenizer", "mistral-v1", "--seq-length", opts.seq_length, "--workers", "1",
               "--overwrite"], _sft_result)

    cpt_dir, sft_dir = out / "cpt", out / "sft"
    cpt = _write_recipe(out / "recipe_cpt.yaml", _train_recipe(
        opts, "cpt", cpt_dir, {"kind": "indexed",
                               "prefixes": [str(prefixes["clinical"]), str(prefixes["general"])],
                               "weights": [0.8, 0.2]},
        out / "megatron-base", opts.cpt_steps, 1e-3, None))
    stage.run("continuous pretraining: clinical 0.8 / general 0.2", ["train", cpt],
              _train_result(cpt_dir), _train_progress(cpt_dir, opts.cpt_steps))
    sft = _write_recipe(out / "recipe_sft.yaml", _train_recipe(
        opts, "sft", sft_dir, {"kind": "sft", "sft_path": str(out / "data" / "sft")},
        cpt_dir, opts.sft_steps, 5e-4, 5.0))
    stage.run("instruct tuning with NEFTune (alpha 5)", ["train", sft],
              _train_result(sft_dir), _train_progress(sft_dir, opts.sft_steps))
    for run_dir in (cpt_dir, sft_dir):
        stage.run(f"plot the {run_dir.name.upper()} loss/LR curves", ["plot", run_dir],
                  lambda text: f"curves in {_last_line(text)}")

    hf_sft = out / "hf-sft"
    stage.run("export the instruct-tuned checkpoint to Hugging Face safetensors",
              ["export-hf", sft_dir, hf_sft, "--overwrite"], _last_line)
    reports = {}
    parts = len(BENCHMARKS.split(",")) * len(STRATEGIES)
    for name, model in (("base", hf_base), ("sft", hf_sft)):
        eval_out = out / f"eval-{name}"
        stage.run(f"evaluate the {name} model with prompt strategies",
                  ["eval", model, "--backend", "hf", "--benchmarks", BENCHMARKS,
                   "--strategies", ",".join(STRATEGIES), "--limit", opts.eval_limit,
                   "--samples", 3, "--max-new-tokens", 24, "--seed", opts.seed,
                   "--out", eval_out], _eval_result(eval_out), _eval_progress(eval_out, parts))
        reports[name] = json.loads((eval_out / "results.json").read_text())
    assert stage.n == STAGES, stage.n
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
