"""``train.eval_benchmarks``: MCQ log-likelihood accuracy of the live model during training.

Every ``train.eval_benchmark_interval`` steps (and at the last step) the training loop scores the
configured benchmarks with a log-likelihood strategy of ``clinmega eval`` (``zero_shot`` by default:
the same prompts, tokenisation and scoring as ``clinmega eval``) on the model it is training, on the
same ranks and layout (TP/PP/VPP/EP): :class:`clinmega.evaluation.backends.megatron.MegatronBackend`
over the trainer's DDP-wrapped chunks, i.e. the layout-agnostic scorer of the Megatron evaluation
backend. Every rank computes the same accuracy; rank 0 logs ``eval/<benchmark>/acc``,
``eval/seconds`` (wall time of the evaluation) and ``tokens`` (training tokens seen) to
metrics.jsonl and TensorBoard; ``clinmega plot`` draws accuracy against tokens seen.

The evaluation never changes the training trajectory (:func:`training_state_kept`): it runs under
``torch.no_grad`` in eval mode (no dropout, no NEFTune noise) and afterwards restores every
module's train/eval flag and every RNG state (python, numpy, torch CPU and CUDA, megatron-core's
tensor-parallel RNG tracker); the data position is a function of the step alone
(``GlobalBatchSampler``) and is not touched; the MoE router statistics of the evaluation forwards
are dropped by the loop. tests/test_training_benchmark_eval.py checks the losses with and without
it are bit-identical.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from clinmega.config.errors import ConfigError


@contextlib.contextmanager
def training_state_kept(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run the body with ``chunks`` in eval mode; afterwards every module's ``training`` flag and all
    RNG states are what they were before."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    modes = [(m, m.training) for chunk in chunks for m in chunk.modules()]
    tracker = get_cuda_rng_tracker()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
              {k: v.clone() if torch.is_tensor(v) else v for k, v in tracker.get_states().items()})
    try:
        for chunk in chunks:
            chunk.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        python, numpy_state, cpu, cuda, tracked = states
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        tracker.set_states(tracked)


@dataclass
class BenchmarkEvaluator:
    """The benchmarks' items (loaded once, before training starts), the strategy and tokenizer."""

    data: dict[str, tuple[list, list]]  # benchmark -> (test items, train items for few-shot)
    strategy: Any
    tokenizer: Any
    max_length: int
    batch_size: int

    @classmethod
    def from_config(cls, cfg, assets: str | Path | None) -> "BenchmarkEvaluator | None":
        """None without ``train.eval_benchmarks``; ``assets``: the loaded checkpoint's hf_assets
        folder (the tokenizer when ``train.eval_benchmark_tokenizer`` is not set)."""
        from transformers import AutoTokenizer

        from clinmega.evaluation.benchmarks import expand_benchmark_names, load_benchmark
        from clinmega.evaluation.strategies import parse_strategy

        t = cfg.train
        if not t.eval_benchmarks:
            return None
        tokenizer = t.eval_benchmark_tokenizer or assets
        if tokenizer is None:
            raise ConfigError("train.eval_benchmark_tokenizer: train.eval_benchmarks needs a tokenizer; "
                              "the run loads no checkpoint with one (hf_assets), so give a folder "
                              "AutoTokenizer reads")
        strategy = parse_strategy(t.eval_benchmark_strategy)
        data = {}
        for name in expand_benchmark_names(list(t.eval_benchmarks)):
            test = load_benchmark(name, t.eval_benchmark_data_dir, "test")[: t.eval_benchmark_limit]
            train = load_benchmark(name, t.eval_benchmark_data_dir, "train") if strategy.shots else []
            data[name] = (test, train)
        return cls(data, strategy, AutoTokenizer.from_pretrained(str(tokenizer)),
                   cfg.model.max_position_embeddings, t.micro_batch_size)

    def evaluate(self, chunks: Sequence[torch.nn.Module]) -> dict[str, float]:
        """``eval/<benchmark>/acc`` of the model in ``chunks`` and ``eval/seconds``; collective (every
        rank of the model calls it, in step)."""
        from clinmega.evaluation.backends.megatron import MegatronBackend
        from clinmega.evaluation.scoring import run_strategy

        start = time.perf_counter()
        out = {}
        with training_state_kept(chunks):
            backend = MegatronBackend(chunks, self.tokenizer, self.max_length, self.batch_size)
            for name, (test, train) in self.data.items():
                results = run_strategy(backend, test, train, self.strategy)
                out[f"eval/{name}/acc"] = sum(r.correct for r in results) / len(results)
        out["eval/seconds"] = time.perf_counter() - start
        return out
