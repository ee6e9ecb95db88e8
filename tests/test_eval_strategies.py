"""Strategies through a fake backend with planted outputs: votes map back to the original options."""

import math
import random
import re

import numpy as np
import pytest

from clinmega.benchmark_files import LETTERS, Item
from clinmega.evaluation.benchmarks import load_benchmark
from clinmega.evaluation.prompts import ANSWER_PHRASE, COT_INSTRUCTION, COT_TRIGGER, Exemplar, build_prompt
from clinmega.evaluation.scoring import argmax_predictions, rationale_from, run_strategy
from clinmega.evaluation.tfidf import TfidfIndex
from clinmega.evaluation.strategies import (PRESETS, Strategy, candidate_exemplars, majority_vote,
                                            option_orders, parse_strategy, permute)

ITEM = Item("q1", "Which vitamin prevents scurvy?", ("Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K"), 1)


def shown_options(prompt):
    """Options of the last question block of a prompt, in the order shown."""
    block = prompt.split("\n\n")[-1]
    return re.findall(r"^([A-Z])\. (.*)$", block, flags=re.M)


class FakeBackend:
    """Implements the backend interface; answers via a rule on the last shown options and logs calls."""

    def __init__(self, pick, texts=None):
        self.pick, self.texts, self.calls = pick, texts, []

    def loglikelihood(self, requests):
        self.calls.append(("loglikelihood", requests))
        out = []
        for prompt, cont in requests:
            options = shown_options(prompt)
            chosen_letter = options[self.pick([o for _, o in options])][0]
            out.append(-1.0 if cont.strip() == chosen_letter else -5.0)
        return out

    def generate(self, prompts, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, stop=()):
        self.calls.append(("generate", prompts, temperature))
        if self.texts is not None:
            return [self.texts[i % len(self.texts)] for i in range(len(prompts))]
        return [f"Reasoning. The answer is ({LETTERS[self.pick([o for _, o in shown_options(p)])]})." for p in prompts]


def by_text(text):
    return lambda options: options.index(text)


def first_position(options):
    return 0


@pytest.mark.parametrize("scoring", ["loglikelihood", "generate"])
def test_choice_shuffle_votes_map_back(scoring):
    strategy = Strategy("shuffle", scoring=scoring, permutations=5)
    [r] = run_strategy(FakeBackend(by_text("Vitamin C")), [ITEM], [], strategy)
    assert len(r.orders) == 5 and len({tuple(o) for o in r.orders}) == 5 and r.orders[0] == [0, 1, 2, 3]
    assert r.votes == [1] * 5 and r.pred == 1 and r.correct  # the right text wins wherever it is shown
    [r] = run_strategy(FakeBackend(first_position), [ITEM], [], strategy)
    assert r.votes == [order[0] for order in r.orders]  # "always A" maps to whatever option was shown first


def test_self_consistency_majority_vote_and_sampling():
    texts = ["Step... the answer is (B).", "Answer: B", "So it's C.", "I am unsure.", "Therefore, the answer is (B)."]
    backend = FakeBackend(first_position, texts=texts)
    [r] = run_strategy(backend, [ITEM], [], PRESETS["self_consistency"])
    kind, prompts, temperature = backend.calls[-1]
    assert kind == "generate" and len(prompts) == 5 and len(set(prompts)) == 1 and temperature > 0
    assert prompts[0].startswith(COT_INSTRUCTION) and prompts[0].endswith("Answer:" + COT_TRIGGER)
    assert r.votes == [1, 1, 2, None, 1] and r.pred == 1 and r.correct and r.outputs == texts


def test_medprompt_votes_over_shuffled_cot_with_knn_shots():
    train = [Item(f"t{k}", q, ("w", "x", "y", "z"), k % 4, explanation=f"because {k}")
             for k, q in enumerate(["Which vitamin prevents scurvy in sailors?", "Which bone is longest?",
                                    "Which nerve is in the carpal tunnel?", "Which vitamin helps clotting?",
                                    "Which organ makes bile?", "Which valve is mitral?"])]
    backend = FakeBackend(by_text("Vitamin C"))
    [r] = run_strategy(backend, [ITEM], train, PRESETS["medprompt"])
    assert r.exemplars[:2] == ["t0", "t3"]  # nearest by TF-IDF ("vitamin", "scurvy")
    prompt = backend.calls[-1][1][0]
    assert "because 0 " + ANSWER_PHRASE.format(letter="A") in prompt
    assert len(r.votes) == 5 and r.votes == [1] * 5 and r.correct


def test_self_generated_rationales_keep_only_correct_ones():
    train = [Item("t0", "Alpha question?", ("p", "q"), 0), Item("t1", "Beta question?", ("p", "q"), 1),
             Item("t2", "Gamma question?", ("p", "q"), 0)]

    class Planted(FakeBackend):
        def generate(self, prompts, *args, **kwargs):
            self.calls.append(("generate", prompts))
            return ["Because alpha. Therefore, the answer is (A)." if "Alpha" in p.split("\n\n")[-1] else
                    "Because gamma. The answer is (B)." if "Gamma" in p.split("\n\n")[-1] else
                    "Because beta. The answer is (B)." for p in prompts]

    backend = Planted(first_position)
    [r] = run_strategy(backend, [ITEM], train, Strategy("fsc", scoring="generate", cot=True, shots=3))
    assert len(backend.calls[0][1]) == 3  # one rationale request per candidate exemplar
    assert r.exemplars == ["t0", "t1"]  # t2's self-generated answer was wrong: dropped
    prompt = backend.calls[-1][1][0]
    assert "Because alpha. Therefore, the answer is (A)." in prompt and "Because gamma" not in prompt
    assert rationale_from("x. So the answer is B. Then the answer is (C).") == "x. So the answer is B. Then"


def test_parse_and_compose_strategies():
    composed = parse_strategy("knn_few_shot+cot+choice_shuffle")
    medprompt = PRESETS["medprompt"]
    assert {k: v for k, v in composed.__dict__.items() if k != "name"} == \
        {k: v for k, v in medprompt.__dict__.items() if k != "name"}
    assert parse_strategy("few_shot+self_consistency").samples == 5
    with pytest.raises(ValueError, match="unknown strategy"):
        parse_strategy("cot+magic")
    with pytest.raises(ValueError, match="needs scoring='generate'"):
        Strategy(cot=True)


def test_few_shot_selection_fixed_random_and_leakage():
    train = [Item(f"t{k}", f"Question number {k}?", ("a", "b"), 0) for k in range(8)]
    items = [Item("x", "Question number 3?", ("a", "b"), 0, benchmark="b"), Item("y", "Other?", ("a", "b"), 0)]
    fixed = candidate_exemplars(items, train, Strategy(shots=2))
    assert fixed[0][:3] == [0, 1, 2] and 3 not in fixed[0] and fixed[1][:2] == [0, 1]  # same question excluded
    rnd = Strategy(shots=2, selection="random", seed=7)
    first, again = candidate_exemplars(items, train, rnd), candidate_exemplars(items, train, rnd)
    assert first == again and first[0] != first[1] and sorted(first[1]) == list(range(8))
    assert candidate_exemplars(items, train, Strategy(shots=2, selection="random", seed=8)) != first


def test_tfidf_matches_hand_computation():
    docs = ["fever cough", "fever fever rash", "fracture"]
    index = TfidfIndex(docs)
    idf = {t: math.log(4 / (1 + df)) + 1 for t, df in {"fever": 2, "cough": 1, "rash": 1, "fracture": 1}.items()}

    def vec(counts):
        v = {t: c * idf[t] for t, c in counts.items()}
        n = math.sqrt(sum(x * x for x in v.values()))
        return {t: x / n for t, x in v.items()}

    q = vec({"fever": 1, "rash": 1})
    expected = [sum(q.get(t, 0) * w for t, w in vec(c).items())
                for c in ({"fever": 1, "cough": 1}, {"fever": 2, "rash": 1}, {"fracture": 1})]
    np.testing.assert_allclose(index.similarities("Fever and rash!"), expected, rtol=1e-12)
    assert index.ranking("fever rash") == [1, 0, 2]
    assert index.similarities("unknown words").tolist() == [0.0, 0.0, 0.0]


def test_knn_on_synthetic_set_prefers_related_questions():
    test, train = load_benchmark("pubmedqa"), load_benchmark("pubmedqa", split="train")
    ranked = candidate_exemplars(test[:3], train, Strategy(shots=3, selection="knn"))
    for item, order in zip(test[:3], ranked):
        claim = item.question.split(" ", 3)[-1]  # the claim after "Does <kind> <code>"
        assert claim.split()[0] in train[order[0]].question


def test_option_orders_and_permute():
    rng = random.Random(0)
    orders = option_orders(3, 10, rng)
    assert len(orders) == 6 and orders[0] == (0, 1, 2) and len(set(orders)) == 6
    moved = permute(ITEM, (3, 1, 0, 2))
    assert moved.options == ("Vitamin K", "Vitamin C", "Vitamin A", "Vitamin D") and moved.answer == 1
    assert permute(ITEM, (2, 0, 1, 3)).answer == 2


def test_majority_vote_and_length_normalisation():
    assert majority_vote([2, 1, 1, 2]) == 2  # tie: the first voted wins
    assert majority_vote([None, 3, 0, 0]) == 0 and majority_vote([None, None]) is None
    # acc picks the highest sum; acc_norm divides by characters, acc_bytes by UTF-8 bytes (lm-eval)
    assert argmax_predictions([-4.0, -6.0], ["ab", "abcdef"]) == (0, 1, 1)
    assert argmax_predictions([-3.0, -3.3], ["é", "ab"]) == (0, 1, 0)  # "é": 1 character, 2 bytes


def test_prompt_layout():
    prompt = build_prompt(ITEM, [Exemplar(Item("e", "E?", ("x", "y"), 1, context="Ctx."))])
    assert prompt == ("Context: Ctx.\nQuestion: E?\nA. x\nB. y\nAnswer: B\n\n"
                      "Question: Which vitamin prevents scurvy?\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D\n"
                      "D. Vitamin K\nAnswer:")
    with pytest.raises(ValueError, match="has no rationale"):
        build_prompt(ITEM, [Exemplar(ITEM)], cot=True)
