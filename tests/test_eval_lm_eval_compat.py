"""clinmega's lm-eval prompt format against lm-eval 0.4.13 itself: the built-in `multimedqa` group and its
nine built-in task files (only their data source pointed at local files in each task's dataset schema), on
items neither tool ships, through lm-eval's HF model on a tiny random Mistral: prompts, choices, per-item
log-likelihoods, acc, acc_norm and the group's size-weighted acc are equal, zero-shot and few-shot."""

import pytest

pytest.importorskip("lm_eval")

from eval_fixtures import tiny_hf_model_dir  # noqa: E402

from clinmega.evaluation.benchmarks import BENCHMARK_GROUPS  # noqa: E402
from lm_eval_reference import GROUP, compare, mismatches, run_clinmega, run_lm_eval, write_group  # noqa: E402


@pytest.fixture(scope="module")
def models():
    from lm_eval.models.huggingface import HFLM

    from clinmega.evaluation.backends.hf import HFBackend

    backend = HFBackend.from_pretrained(tiny_hf_model_dir(), batch_size=8)
    return backend, HFLM(pretrained=backend.model, tokenizer=backend.tokenizer, batch_size=8, device="cpu")


@pytest.mark.parametrize("shots", [2])  # zero-shot too: benchmarks/bench_lm_eval_compat.py (slow)
def test_multimedqa_equals_lm_eval(tmp_path, monkeypatch, models, shots):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    backend, lm = models
    data, tasks = write_group(tmp_path, seed=shots)
    rows = compare(run_lm_eval(lm, tasks, shots), run_clinmega(backend, data, shots), shots)
    assert mismatches(rows) == []
    assert set(rows) == {*BENCHMARK_GROUPS[GROUP], GROUP} and rows[GROUP]["n"] == 9 * 6
    assert all("acc_norm" in rows[t] for t in ("medqa_4options", "medmcqa"))  # lm-eval reports it there
