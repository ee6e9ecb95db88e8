"""lm-eval's own built-in tasks on local files, next to clinmega's ``lm-eval`` prompt format.

`write_group` writes new items (made here; neither tool ships them) for every task of lm-eval's
``multimedqa`` group, each in the schema of that task's Hugging Face dataset, into clinmega's benchmark
folder layout, plus one task file per task that ``include``s the built-in task YAML of the installed lm-eval
and only points ``dataset_path``/``dataset_name``/``data_files`` at the local files. `run_lm_eval` runs the
built-in ``multimedqa`` group through lm-eval's HF model; `run_clinmega` scores the same files with clinmega;
`compare` checks prompts, choices, per-item log-likelihoods, ``acc``/``acc_norm`` and the group aggregate.
Used by tests/test_eval_lm_eval_compat.py and benchmarks/bench_lm_eval_compat.py.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from clinmega.evaluation.benchmarks import BENCHMARK_GROUPS, load_benchmark

GROUP = "multimedqa"
WORDS = ("renal", "hepatic", "cardiac", "acute", "chronic", "dose", "lesion", "fever", "sodium", "insulin",
         "biopsy", "murmur", "ischemia", "anemia", "sepsis", "edema", "thyroid", "platelet", "retina", "valve")


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _question(rng: random.Random, k: int) -> str:
    text = f"Item {k}: which finding fits {_phrase(rng, rng.randint(3, 9))}?"
    return text + " " if k % 3 == 1 else text  # a trailing space: lm-eval keeps it (MMLU strips it)


def _rows(task: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for k in range(n):
        q, opts, gold = _question(rng, k), [_phrase(rng, rng.randint(1, 4)) for _ in range(4)], rng.randrange(4)
        if task == "medqa_4options":  # GBaker/MedQA-USMLE-4-options-hf
            rows.append({"id": f"mq{k}", "sent1": q, "sent2": "", **{f"ending{j}": o for j, o in enumerate(opts)},
                         "label": gold})
        elif task == "medmcqa":  # openlifescienceai/medmcqa
            rows.append({"id": f"mm{k}", "question": q, "opa": opts[0], "opb": opts[1], "opc": opts[2],
                         "opd": opts[3], "cop": gold if k else 0, "choice_type": "single", "exp": "",
                         "subject_name": "Medicine", "topic_name": ""})
        elif task == "pubmedqa":  # bigbio/pubmed_qa, pubmed_qa_labeled_fold0_source
            sections = [_phrase(rng, rng.randint(5, 12)) + "." for _ in range(rng.randint(1, 3))]
            rows.append({"QUESTION": q, "CONTEXTS": sections, "LABELS": ["BACKGROUND", "METHODS", "RESULTS"][:len(sections)],
                         "MESHES": [], "YEAR": "2021", "reasoning_required_pred": "yes",
                         "reasoning_free_pred": "yes", "final_decision": ("yes", "no", "maybe")[gold % 3],
                         "LONG_ANSWER": _phrase(rng, 6)})
        else:  # cais/mmlu
            rows.append({"question": (" " if k % 3 == 2 else "") + q, "subject": task[5:], "choices": opts,
                         "answer": gold})
    return rows


def _split_files(task: str) -> dict[str, str]:
    """lm-eval split name -> file name under clinmega's benchmark folder."""
    if task.startswith("mmlu_"):
        return {"test": f"mmlu/{task[5:]}_test.jsonl", "dev": f"mmlu/{task[5:]}_dev.jsonl"}
    if task == "medmcqa":
        return {"validation": "medmcqa/dev.jsonl", "train": "medmcqa/train.jsonl"}
    return {"test": f"{task}/test.jsonl", "validation": f"{task}/test.jsonl", "train": f"{task}/train.jsonl"}


def _builtin_yaml(task: str) -> Path:
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    return {"medqa_4options": root / "medqa/medqa.yaml", "medmcqa": root / "medmcqa/medmcqa.yaml",
            "pubmedqa": root / "pubmedqa/pubmedqa.yaml"}.get(task, root / f"mmlu/default/{task}.yaml")


def write_group(root: Path, n_test: int = 6, n_train: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """Data under ``root/data`` (clinmega's layout), task files under ``root/tasks``; returns both."""
    data, tasks = root / "data", root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for task in BENCHMARK_GROUPS[GROUP]:
        files = _split_files(task)
        eval_split = "validation" if task == "medmcqa" else "test"
        pool_split = "dev" if task.startswith("mmlu_") else "train"
        for split, n in ((eval_split, n_test), (pool_split, n_train)):
            path = data / files[split]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in _rows(task, n, rng)))
        data_files = "\n".join(f"    {split}: {data / name}" for split, name in files.items())
        (tasks / f"{task}.yaml").write_text(
            f"include: {_builtin_yaml(task)}\ntask: {task}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n{data_files}\n")
    return data, tasks


def run_lm_eval(lm, tasks_dir: Path, shots: int) -> dict:
    """lm-eval's ``multimedqa`` group (its own group and task definitions, local data) with ``shots``."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=[GROUP], task_manager=TaskManager(include_path=str(tasks_dir)),
                           num_fewshot=shots, log_samples=True, bootstrap_iters=0, random_seed=0,
                           numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=1234)


def run_clinmega(backend, data_dir: Path, shots: int) -> dict[str, tuple[list, list]]:
    """Per task: (items, ItemResults) of clinmega's default log-likelihood strategy (lm-eval format)."""
    from clinmega.evaluation.scoring import run_strategy
    from clinmega.evaluation.strategies import Strategy

    out = {}
    for task in BENCHMARK_GROUPS[GROUP]:
        test = load_benchmark(task, data_dir, "test", cop_base=0)
        train = load_benchmark(task, data_dir, "train", cop_base=0)
        out[task] = (test, train, run_strategy(backend, test, train, Strategy("lm", shots=shots)))
    return out


def _args(sample: dict) -> list[tuple[str, str]]:
    args = sample["arguments"]
    if isinstance(args, dict):  # {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
        return [(a["arg_0"], a["arg_1"]) for a in args.values()]
    return [tuple(a) for a in args]


def compare(theirs: dict, ours: dict[str, tuple], shots: int) -> dict:
    """Per task: items, prompts differing, max |log-likelihood difference|, per-item acc/acc_norm mismatches,
    and both accuracies; plus the group's aggregate from each tool."""
    from clinmega.evaluation.lm_eval_tasks import task_for
    from clinmega.evaluation.report import summarize
    from clinmega.evaluation.scoring import lm_eval_exemplars

    rows = {}
    for task, (test, train, results) in ours.items():
        samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        spec = task_for(task)
        exemplars = lm_eval_exemplars(test, train, shots)
        row = {"n": len(samples), "n_ours": len(results), "prompt_mismatch": 0, "max_ll_diff": 0.0}
        for s, item, ex, r in zip(samples, test, exemplars, results):
            ours_args = [(spec.prompt(item, [e.item for e in ex]), c) for c in spec.continuations(item)]
            row["prompt_mismatch"] += _args(s) != ours_args
            lls = [float(x[0][0]) if isinstance(x[0], (list, tuple)) else float(x[0]) for x in s["resps"]]
            row["max_ll_diff"] = max(row["max_ll_diff"], max(abs(a - b) for a, b in zip(lls, r.outputs[0])))
        for metric, pred in (("acc", "pred"), ("acc_norm", "pred_norm")):
            if f"{metric},none" not in theirs["results"][task]:
                continue
            row[f"{metric}_item_mismatch"] = sum(float(getattr(r, pred) == r.answer) != s[metric]
                                                 for r, s in zip(results, samples))
            row[metric] = (sum(getattr(r, pred) == r.answer for r in results) / len(results),
                           theirs["results"][task][f"{metric},none"])
        rows[task] = row
    summary = summarize([r for _, _, res in ours.values() for r in res], n_resamples=10)
    group = next(r for r in summary if r["benchmark"] == GROUP)
    rows[GROUP] = {"acc": (group["acc"]["value"], theirs["results"][GROUP]["acc,none"]),
                   "n": group["n"]}
    return rows


def mismatches(rows: dict) -> list[str]:
    bad = []
    for task, row in rows.items():
        for key, value in row.items():
            if key.endswith("mismatch") and value:
                bad.append(f"{task}: {key} {value}")
        if "max_ll_diff" in row and row["max_ll_diff"] > 1e-4:
            bad.append(f"{task}: log-likelihoods differ by {row['max_ll_diff']:.2e}")
        if row.get("n", 0) != row.get("n_ours", row.get("n")):
            bad.append(f"{task}: {row['n']} lm-eval items, {row['n_ours']} clinmega items")
        for metric in ("acc", "acc_norm"):
            if metric in row and abs(row[metric][0] - row[metric][1]) > 1e-12:
                bad.append(f"{task}: {metric} clinmega {row[metric][0]} lm-eval {row[metric][1]}")
    return bad


__all__ = ["GROUP", "write_group", "run_lm_eval", "run_clinmega", "compare", "mismatches"]
