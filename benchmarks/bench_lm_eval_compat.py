"""clinmega's lm-eval prompt format vs lm-eval 0.4.13's own built-in tasks (offline, CPU).

Writes new items for every task of lm-eval's ``multimedqa`` group in each task's dataset schema, one task
file per task that ``include``s the installed lm-eval's built-in task and only points its data source at
those files (`tests/lm_eval_reference.py`), runs the built-in ``multimedqa`` group through lm-eval's HF
model and clinmega's default log-likelihood strategy on the same model, zero-shot and with ``--shots``
exemplars, and checks prompts, choices, per-item log-likelihoods, acc, acc_norm and the group's
size-weighted acc. Prints the wall times (lm-eval's include building its tasks from the files).

    PYTHONPATH=. python benchmarks/bench_lm_eval_compat.py [--model HF_DIR] [--items 20] [--shots 3]

Without ``--model`` a tiny random Mistral (hidden 64, 2 layers, real 32k tokenizer) is built.
Needs ``lm-eval==0.4.13`` (the ``dev`` or ``lmeval`` extra).
"""

from __future__ import annotations

import argparse
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

from lm_eval_reference import GROUP, compare, mismatches, run_clinmega, run_lm_eval, write_group  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF model folder (default: tiny random Mistral)")
    parser.add_argument("--items", type=int, default=20, help="test items per task")
    parser.add_argument("--shots", type=int, default=3, help="few-shot exemplars of the second run")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from lm_eval.models.huggingface import HFLM

    from clinmega.evaluation.backends.hf import HFBackend

    if args.model is None:
        from eval_fixtures import tiny_hf_model_dir

        args.model = tiny_hf_model_dir()
    work = Path(tempfile.mkdtemp(prefix="clinmega-lmeval-"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(work / "hf-datasets"))
    data, tasks = write_group(work, n_test=args.items, n_train=max(4, args.shots + 1))
    backend = HFBackend.from_pretrained(args.model, batch_size=args.batch_size)
    lm = HFLM(pretrained=backend.model, tokenizer=backend.tokenizer, batch_size=args.batch_size, device="cpu")
    print(f"model {args.model}; {args.items} new items per task; task files {tasks}")
    ok = True
    for shots in (0, args.shots):
        start = time.perf_counter()
        theirs = run_lm_eval(lm, tasks, shots)
        t_theirs = time.perf_counter() - start
        start = time.perf_counter()
        ours = run_clinmega(backend, data, shots)
        t_ours = time.perf_counter() - start
        rows = compare(theirs, ours, shots)
        print(f"\n{shots}-shot | task | n | prompts differing | max |ll diff| | acc clinmega / lm-eval | "
              "acc_norm clinmega / lm-eval")
        for task, r in rows.items():
            norm = r.get("acc_norm")
            print(f"  {task} | {r['n']} | {r.get('prompt_mismatch', '')} | {r.get('max_ll_diff', float('nan')):.1e} | "
                  f"{r['acc'][0]:.4f} / {r['acc'][1]:.4f} | "
                  + ("-" if norm is None else f"{norm[0]:.4f} / {norm[1]:.4f}"))
        bad = mismatches(rows)
        for line in bad:
            print("  MISMATCH", line)
        ok &= not bad
        print(f"  wall time clinmega {t_ours:.2f} s, lm-eval {t_theirs:.2f} s ({GROUP}, 9 tasks)")
    print("COMPATIBLE" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
