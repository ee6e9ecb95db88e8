"""``train.eval_benchmarks``: accuracy of the live model during training, without changing it.

Single process, in this process: the tiny CPT recipe with dropout on (so the trajectory depends on
the RNG streams: hidden dropout draws from torch's generator, attention dropout from megatron-core's
tensor-parallel tracker) runs 6 steps with and without benchmark accuracy every 2 steps; the losses
must be bit-identical, the accuracy records appear at steps 2, 4, 6 with the tokens seen, the last
ones equal `clinmega eval`'s scoring of the saved step-6 checkpoint, and `clinmega plot` draws the
accuracy panel. The 2-rank (PP2 x VPP2) version is training_cases.pp2_vpp2_benchmark_eval.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from clinmega.config import ConfigError
from clinmega.training.config import TrainConfig, load_experiment
from eval_fixtures import write_tokenizer
from training_cases import BENCHMARKS, benchmark_overrides, dropout

ROOT = Path(__file__).resolve().parents[1]


def train_run(run_dir: Path, *overrides: str) -> list[dict]:
    from clinmega.training.logging import read_metrics
    from clinmega.training.loop import train

    cfg = load_experiment([ROOT / "recipes" / "tiny_cpu_cpt.yaml"],
                          [f"run_dir={run_dir}", "train.steps=6", "train.decay_steps=6", "train.save_interval=0",
                           "train.eval_interval=0", "logging.tensorboard=true", "logging.progress=false",
                           *overrides])
    with dropout():
        train(cfg)
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("benchmark_eval")
    write_tokenizer(root / "tokenizer")
    plain = train_run(root / "plain")
    scored = train_run(root / "scored", *benchmark_overrides(root / "tokenizer"))
    return root, plain, scored


def test_losses_are_bit_identical_with_and_without_benchmark_accuracy(runs):
    _, plain, scored = runs
    losses = lambda records: {r["step"]: r["loss"] for r in records if "loss" in r}  # noqa: E731
    assert sorted(losses(plain)) == [1, 2, 3, 4, 5, 6]
    assert losses(scored) == losses(plain)  # exact float equality, every step
    assert {r["step"]: r["grad_norm"] for r in scored if "grad_norm" in r} == \
        {r["step"]: r["grad_norm"] for r in plain if "grad_norm" in r}


def test_accuracy_rows_at_the_interval_with_tokens_seen_and_cost(runs):
    root, _, scored = runs
    rows = [r for r in scored if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert r["tokens"] == r["step"] * 8 * 32  # global batch x seq_length of the recipe
        assert r["eval/seconds"] > 0
        for name in BENCHMARKS:
            assert 0.0 <= r[f"eval/{name}/acc"] <= 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "scored" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "eval/medqa_4options/acc", "eval/pubmedqa/acc", "eval/seconds"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/pubmedqa/acc")] == [2, 4, 6]


def test_last_accuracy_equals_clinmega_eval_of_the_saved_checkpoint(runs):
    from clinmega.evaluation.backends.megatron import MegatronBackend
    from clinmega.evaluation.benchmarks import load_benchmark
    from clinmega.evaluation.scoring import run_strategy
    from clinmega.evaluation.strategies import PRESETS

    root, _, scored = runs
    backend = MegatronBackend.from_checkpoint(root / "scored", tokenizer=root / "tokenizer", batch_size=3)
    last = scored[-1]
    for name in BENCHMARKS:
        results = run_strategy(backend, load_benchmark(name)[:4], [], PRESETS["zero_shot"])
        assert last[f"eval/{name}/acc"] == sum(r.correct for r in results) / 4


def test_plot_draws_accuracy_against_tokens(runs):
    from PIL import Image

    from clinmega.training.logging import read_metrics
    from clinmega.training.plot import accuracy_series, plot_run

    root, _, _ = runs
    series = accuracy_series(read_metrics(root / "scored"))
    assert sorted(series) == sorted(BENCHMARKS)
    assert [tokens for tokens, _ in series["pubmedqa"]] == [512, 1024, 1536]
    with_acc, without = plot_run(root / "scored"), plot_run(root / "plain")
    assert Image.open(with_acc).size == (800, 900)  # a third panel: accuracy
    assert Image.open(without).size == (800, 600)


def test_evaluation_keeps_modes_rng_and_grads(tmp_path):
    """Directly: during the evaluation every module is in eval mode; afterwards the train flags,
    python/numpy/torch RNG, megatron's tracker states and the (absent) grads are as before."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from transformers import AutoTokenizer

    from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
    from clinmega.evaluation.benchmarks import load_benchmark
    from clinmega.evaluation.strategies import PRESETS
    from clinmega.models import build_model, get_preset
    from clinmega.runtime import initialize
    from clinmega.training.benchmark_eval import BenchmarkEvaluator

    write_tokenizer(tmp_path)
    initialize(ParallelConfig(), RuntimeConfig(seed=7))
    chunks = build_model(get_preset("tiny-mistral-v0.1", num_layers=2), ParallelConfig(), PrecisionConfig(dtype="fp32"),
                         hidden_dropout=0.1, attention_dropout=0.1)
    for chunk in chunks:
        chunk.train()
    seen_training = []
    hook = chunks[0].decoder.layers[0].register_forward_hook(lambda m, *_: seen_training.append(m.training))
    evaluator = BenchmarkEvaluator({"pubmedqa": (load_benchmark("pubmedqa")[:3], [])}, PRESETS["zero_shot"],
                                   AutoTokenizer.from_pretrained(str(tmp_path)), 4096, 2)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(),
              {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()})
    metrics = evaluator.evaluate(chunks)
    hook.remove()
    assert seen_training and not any(seen_training)  # no dropout during the evaluation
    assert all(m.training for chunk in chunks for m in chunk.modules())
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])
    after = get_cuda_rng_tracker().get_states()
    assert after.keys() == before[3].keys() and all(torch.equal(after[k], before[3][k]) for k in after)
    assert all(p.grad is None for chunk in chunks for p in chunk.parameters())
    assert set(metrics) == {"eval/pubmedqa/acc", "eval/seconds"}


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.eval_benchmarks: unknown benchmark 'medqa5'"):
        TrainConfig(eval_benchmarks=["medqa5"], eval_benchmark_interval=10)
    with pytest.raises(ConfigError, match="train.eval_benchmark_interval"):
        TrainConfig(eval_benchmarks=["pubmedqa"])
    with pytest.raises(ConfigError, match="train.eval_benchmark_strategy: 'cot' generates text"):
        TrainConfig(eval_benchmarks=["pubmedqa"], eval_benchmark_interval=10, eval_benchmark_strategy="cot")
    with pytest.raises(ConfigError, match="train.eval_benchmark_limit"):
        TrainConfig(eval_benchmark_limit=0)
