"""HF backend on a tiny random Mistral: log-likelihoods and accuracy against a hand computation from the
model's own logits; KV-cached batched generation against a plain loop."""

import pytest
import torch

from eval_fixtures import tiny_hf_model_dir
from clinmega.evaluation.backends.base import next_tokens
from clinmega.evaluation.backends.hf import HFBackend
from clinmega.evaluation.benchmarks import load_benchmark
from clinmega.evaluation.lm_eval_tasks import task_for
from clinmega.evaluation.prompts import build_prompt, choice_continuations
from clinmega.evaluation.scoring import run_strategy
from clinmega.evaluation.strategies import PRESETS, Strategy


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    return HFBackend.from_pretrained(tiny_hf_model_dir(), batch_size=4)


def reference_loglikelihood(model, tokenizer, context, continuation):
    """Independent computation: full-sequence logits, log-softmax, sum over the continuation tokens."""
    ctx_ids = tokenizer(context)["input_ids"]
    full_ids = tokenizer(context + continuation)["input_ids"]
    assert full_ids[: len(ctx_ids)] == ctx_ids
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[t - 1, full_ids[t]].item() for t in range(len(ctx_ids), len(full_ids)))


def test_loglikelihood_matches_hand_computation(backend):
    requests = [("Question: Which vitamin prevents scurvy?\nAnswer:", " Vitamin C"),
                ("Question: Which vitamin prevents scurvy?\nAnswer:", " B"),
                ("Short", " and a much longer continuation of several tokens"),
                ("Trailing space ", "moves")]
    got = backend.loglikelihood(requests)
    for (ctx, cont), value in zip(requests[:3], got):
        assert value == pytest.approx(reference_loglikelihood(backend.model, backend.tokenizer, ctx, cont), abs=1e-4)
    # lm-eval moves trailing context whitespace into the continuation
    assert got[3] == pytest.approx(reference_loglikelihood(backend.model, backend.tokenizer, "Trailing space", " moves"),
                                   abs=1e-4)
    one_by_one = HFBackend(backend.model, backend.tokenizer, batch_size=1).loglikelihood(requests)
    assert one_by_one == pytest.approx(got, abs=1e-4)  # padding/batching does not change scores


def test_zero_shot_accuracy_equals_reference(backend):
    items = load_benchmark("medqa_4options")[:8] + load_benchmark("pubmedqa")[:4]
    results = run_strategy(backend, items, [], PRESETS["zero_shot"])
    expected = []
    for item in items:  # zero_shot renders each benchmark as its lm-eval task
        task = task_for(item.benchmark)
        prompt, conts = task.prompt(item), task.continuations(item)
        lls = [reference_loglikelihood(backend.model, backend.tokenizer, prompt, c) for c in conts]
        expected.append(max(range(len(lls)), key=lls.__getitem__))
    assert [r.pred for r in results] == expected
    assert sum(r.correct for r in results) == sum(e == i.answer for e, i in zip(expected, items))
    assert len(set(expected)) > 1  # the tiny model's choices really depend on the prompt


def test_option_text_scoring_acc_and_acc_norm_equal_reference(backend):
    items = load_benchmark("pubmedqa")[:4] + load_benchmark("medqa")[:6]
    results = run_strategy(backend, items, [], PRESETS["option_text"])
    for item, r in zip(items, results):
        prompt = build_prompt(item, target="text")
        lls = [reference_loglikelihood(backend.model, backend.tokenizer, prompt, c)
               for c in choice_continuations(item, "text")]
        assert r.outputs[0] == pytest.approx(lls, abs=1e-4)
        assert r.pred == max(range(len(lls)), key=lls.__getitem__)
        normed = [ll / len(option) for ll, option in zip(lls, item.options)]
        assert r.pred_norm == max(range(len(lls)), key=normed.__getitem__)
    assert any(r.pred != r.pred_norm for r in results)  # length normalisation really changes choices


def plain_greedy(model, ids, n):
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(x).logits[0, -1].argmax().view(1, 1)], dim=1)
    return x[0, len(ids):].tolist()


def test_batched_cached_greedy_generation_matches_plain_loop(backend):
    prompts = ["Question: Which organ makes bile?\nAnswer:", "Hi", "Context: a b c d e f g.\nQuestion: yes?\nAnswer:"]
    texts = backend.generate(prompts, max_new_tokens=6)
    for prompt, text in zip(prompts, texts):
        expected = plain_greedy(backend.model, backend.encode(prompt), 6)
        assert text == backend.tokenizer.decode(expected, skip_special_tokens=True)


def test_sampling_is_seeded_per_prompt_and_stop_strings_cut(backend):
    prompts = ["Hello there", "Question: what?\nAnswer:"] * 2
    a = backend.generate(prompts, 8, temperature=1.0, top_p=0.9, seed=5)
    b = HFBackend(backend.model, backend.tokenizer, batch_size=1).generate(prompts, 8, temperature=1.0, top_p=0.9, seed=5)
    assert a == b  # independent of batch composition
    assert a[0] != a[2]  # the same prompt at another index is a different sample
    assert backend.generate(prompts, 8, temperature=1.0, seed=6) != a
    full = backend.generate(["Hi"], 8)[0]
    cut = backend.generate(["Hi"], 8, stop=[full[3:5]])[0]
    assert cut == full[: full.index(full[3:5])]


def test_nucleus_sampling_keeps_only_the_top_mass():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    draws = {next_tokens(logits, 1.0, 0.5, [torch.Generator().manual_seed(s)]).item() for s in range(50)}
    assert draws == {0}
    draws = {next_tokens(logits, 1.0, 0.85, [torch.Generator().manual_seed(s)]).item() for s in range(200)}
    assert draws == {0, 1}
    assert next_tokens(logits, 0.0, 1.0, [torch.Generator()]).item() == 0


def test_generation_strategies_run_end_to_end(backend):
    items = load_benchmark("medmcqa")[:2]
    train = load_benchmark("medmcqa", split="train")
    strategy = Strategy("sc", scoring="generate", cot=True, shots=1, samples=2, permutations=2, max_new_tokens=5)
    results = run_strategy(backend, items, train, strategy)
    for r in results:
        assert len(r.outputs) == 4 and len(r.votes) == 4 and len(r.exemplars) == 1
        assert all(isinstance(t, str) for t in r.outputs)
