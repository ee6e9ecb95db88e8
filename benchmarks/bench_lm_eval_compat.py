"""clinmega zero-shot log-likelihood vs lm-eval on the same items, model and strings (offline, CPU).

Writes the synthetic test items of the chosen benchmarks to one JSON-lines file, registers a local
lm-eval ``multiple_choice`` task whose Jinja template renders exactly `prompts.question_block` with
``target_delimiter=" "``, with letter choices (clinmega ``zero_shot``) and with option-text choices
(``option_text``), scores the items with both tools (model loaded once, outside the timings), and checks
that the prompts are identical, the per-item log-likelihoods agree, and ``acc`` and ``acc_norm`` are equal
item by item. Prints
the wall-time ratio clinmega / lm-eval, best of two runs each (lm-eval's time includes building its task
from the file).

    PYTHONPATH=. python benchmarks/bench_lm_eval_compat.py [--model HF_DIR] [--benchmarks ...]

Without ``--model`` a tiny random Mistral (hidden 64, 2 layers, real 32k tokenizer) is built.
Needs ``lm-eval==0.4.13`` (``pip install lm-eval==0.4.13``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from clinmega.evaluation.benchmarks import LETTERS, expand_benchmark_names, load_benchmark  # noqa: E402
from clinmega.evaluation.prompts import build_prompt  # noqa: E402

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{% if context %}}Context: {{{{context}}}}\\n{{% endif %}}Question: {{{{question}}}}\\n\
{{% for o in options %}}{{{{letters[loop.index0]}}}}. {{{{o}}}}\\n{{% endfor %}}Answer:"
doc_to_choice: "{{{{{choices}}}}}"
doc_to_target: answer
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
num_fewshot: 0
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF model folder (default: tiny random Mistral)")
    parser.add_argument("--benchmarks", default="medqa,medqa_4options,medmcqa,pubmedqa,mmlu_clinical")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from clinmega.evaluation.backends.hf import HFBackend
    from clinmega.evaluation.scoring import run_strategy
    from clinmega.evaluation.strategies import PRESETS

    torch.manual_seed(0)
    if args.model is None:
        from eval_fixtures import tiny_hf_model_dir

        args.model = tiny_hf_model_dir()
    items = [i for b in expand_benchmark_names(args.benchmarks.split(",")) for i in load_benchmark(b)]
    work = Path(tempfile.mkdtemp(prefix="clinmega-lmeval-"))
    data = work / "items.jsonl"
    data.write_text("".join(json.dumps({"id": i.id, "question": i.question, "options": list(i.options),
                                        "answer": i.answer, "context": i.context or "",
                                        "letters": list(LETTERS[: len(i.options)])}) + "\n" for i in items))
    for target, choices in (("letter", "letters"), ("text", "options")):
        (work / f"task_{target}.yaml").write_text(TASK_YAML.format(task=f"clinmega_compat_{target}", data=data,
                                                                  choices=choices))

    backend = HFBackend.from_pretrained(args.model, batch_size=args.batch_size)
    lm = HFLM(pretrained=backend.model, tokenizer=backend.tokenizer, batch_size=args.batch_size, device="cpu")
    manager = TaskManager(include_path=str(work))
    print(f"items: {len(items)} ({args.benchmarks}); model: {args.model}")
    ok = True
    for target, strategy in (("letter", PRESETS["zero_shot"]), ("text", PRESETS["option_text"])):
        task = f"clinmega_compat_{target}"
        ours, t_ours = timed(lambda: run_strategy(backend, items, [], strategy))
        out, t_theirs = timed(lambda: simple_evaluate(
            model=lm, tasks=[task], task_manager=manager, num_fewshot=0, log_samples=True, bootstrap_iters=0,
            random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0))
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(items), (len(samples), len(items))
        prompts_differ = sum(s["arguments"][0][0] != build_prompt(i) for s, i in zip(samples, items))
        their_lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        max_diff = max(abs(a - b) for r, t in zip(ours, their_lls) for a, b in zip(r.outputs[0], t))
        print(f"\n[{target} continuations] prompts differing from lm-eval's: {prompts_differ}; "
              f"max |log-likelihood difference| {max_diff:.2e}")
        for metric, pred in (("acc", "pred"), ("acc_norm", "pred_norm")):
            same = sum(float(getattr(r, pred) == r.answer) == s[metric] for r, s in zip(ours, samples))
            value_ours = sum(getattr(r, pred) == r.answer for r in ours) / len(ours)
            value_theirs = out["results"][task][f"{metric},none"]
            print(f"  {metric}: clinmega {value_ours:.4f}  lm-eval {value_theirs:.4f}  "
                  f"per-item equal {same}/{len(items)}")
            ok &= same == len(items) and abs(value_ours - value_theirs) < 1e-12
        ok &= prompts_differ == 0
        print(f"  wall time clinmega {t_ours:.2f} s, lm-eval {t_theirs:.2f} s, "
              f"ratio clinmega/lm-eval {t_ours / t_theirs:.2f}")
    print("COMPATIBLE" if ok else "MISMATCH")
    return 0 if ok else 1


def timed(fn):
    """Result and best wall time of two runs (the second is warm: datasets cache, allocator)."""
    times, result = [], None
    for _ in range(2):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


if __name__ == "__main__":
    raise SystemExit(main())
