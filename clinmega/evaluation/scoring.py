"""Run one strategy over a benchmark on a backend: variants -> backend requests -> votes -> per-item results.

Every item becomes ``permutations x samples`` variants (option order x sampled path). All variants of all
items go to the backend in one call (it batches), then each variant's choice is mapped back to the original
option index and the votes are combined by `majority_vote`.

Log-likelihood scoring (lm-eval's ``multiple_choice``): the choice of a variant is the argmax of the
summed log-probabilities of the continuations (``acc``); ``pred_norm`` uses the log-likelihood divided by
the character length of the choice string and ``pred_bytes`` by its UTF-8 byte length (lm-eval's
``acc_norm`` and ``acc_bytes``; with letter continuations all three agree, with option texts they differ).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from clinmega.evaluation.backends.base import Backend
from clinmega.benchmark_files import Item
from clinmega.evaluation.extraction import extract_answer
from clinmega.evaluation.lm_eval_tasks import LmEvalSampler, task_for
from clinmega.evaluation.prompts import Exemplar, build_prompt, choice_continuations
from clinmega.evaluation.strategies import Strategy, candidate_exemplars, majority_vote, option_orders, permute

STOP = ("\nQuestion:", "\nContext:")  # the model starting the next exemplar


@dataclass
class ItemResult:
    benchmark: str
    strategy: str
    id: str
    answer: int
    pred: int | None
    correct: bool
    pred_norm: int | None = None
    pred_bytes: int | None = None
    votes: list[int | None] = field(default_factory=list)
    outputs: list = field(default_factory=list)  # per variant: generated text, or the option log-likelihoods
    orders: list[list[int]] = field(default_factory=list)
    exemplars: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def argmax_predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int, int]:
    """(acc, acc_norm, acc_bytes) choices from option log-likelihoods, as lm-eval computes them."""
    lls = np.asarray(lls, dtype=np.float64)
    chars = np.array([len(c) for c in choices], dtype=np.float64)
    nbytes = np.array([len(c.encode("utf-8")) for c in choices], dtype=np.float64)
    return int(np.argmax(lls)), int(np.argmax(lls / chars)), int(np.argmax(lls / nbytes))


def run_strategy(backend: Backend, items: Sequence[Item], train: Sequence[Item], strategy: Strategy,
                 log: Callable[[str], None] = lambda _: None) -> list[ItemResult]:
    """Evaluate ``items`` with one strategy (exemplars from ``train``); one `ItemResult` per item, in order."""
    lm_eval = strategy.format == "lm-eval"
    if lm_eval and strategy.selection == "fixed":
        exemplars = lm_eval_exemplars(items, train, strategy.shots)
    else:
        exemplars = select_exemplars(backend, items, train, strategy, log)
    variants = []  # (item index, order, prompt, permuted item, continuations)
    for n, item in enumerate(items):
        rng = random.Random(f"{strategy.seed}:{item.benchmark}:{item.id}")  # per item: independent of --limit
        task = task_for(item.benchmark) if lm_eval else None
        for order in option_orders(len(item.options), strategy.permutations, rng):
            shown = permute(item, order)
            if task is not None:
                prompt = task.prompt(shown, [e.item for e in exemplars[n]])
                conts = task.continuations(shown)
            else:
                prompt = build_prompt(shown, exemplars[n], cot=strategy.cot, target=strategy.target)
                conts = choice_continuations(shown, strategy.target)
            variants += [(n, order, prompt, shown, conts)] * strategy.samples
    log(f"{strategy.name}: {len(items)} items, {len(variants)} prompts ({strategy.scoring}, {strategy.format} prompts)")
    if strategy.scoring == "loglikelihood":
        per_variant = _loglikelihood_choices(backend, variants)
    else:
        per_variant = _generated_choices(backend, variants, strategy)
    results = [ItemResult(item.benchmark, strategy.name, item.id, item.answer, None, False,
                          exemplars=[e.item.id for e in exemplars[n]]) for n, item in enumerate(items)]
    norm_votes: list[list[int | None]] = [[] for _ in items]
    bytes_votes: list[list[int | None]] = [[] for _ in items]
    for (n, order, *_), (choice, choice_norm, choice_bytes, output) in zip(variants, per_variant):
        def original(c: int | None) -> int | None:  # position shown -> original option index
            return None if c is None else order[c]

        results[n].votes.append(original(choice))
        results[n].outputs.append(output)
        results[n].orders.append(list(order))
        norm_votes[n].append(original(choice_norm))
        bytes_votes[n].append(original(choice_bytes))
    for n, r in enumerate(results):
        r.pred = majority_vote(r.votes)
        r.correct = r.pred == r.answer
        if strategy.scoring == "loglikelihood":
            r.pred_norm, r.pred_bytes = majority_vote(norm_votes[n]), majority_vote(bytes_votes[n])
    return results


def lm_eval_exemplars(items: Sequence[Item], train: Sequence[Item], shots: int) -> list[list[Exemplar]]:
    """Per item, the exemplars lm-eval's sampler gives it: one sampler per benchmark, items in order."""
    samplers: dict[str, LmEvalSampler] = {}
    out = []
    for item in items:
        task = task_for(item.benchmark)
        if task is None or shots == 0:  # no lm-eval task: the unified layout's fixed selection
            out.append([Exemplar(t) for t in train[:shots]])
            continue
        if item.benchmark not in samplers:
            samplers[item.benchmark] = LmEvalSampler(task, len(train), shots)
        out.append([Exemplar(train[i]) for i in samplers[item.benchmark].next()])
    return out


def _loglikelihood_choices(backend: Backend, variants: list) -> list[tuple]:
    requests, spans = [], []
    for _, _, prompt, _, conts in variants:
        spans.append((len(requests), conts))
        requests += [(prompt, c) for c in conts]
    lls = backend.loglikelihood(requests)
    out = []
    for start, conts in spans:
        option_lls = lls[start:start + len(conts)]
        out.append((*argmax_predictions(option_lls, [c[1:] for c in conts]), option_lls))  # minus the " "
    return out


def _generated_choices(backend: Backend, variants: list, strategy: Strategy) -> list[tuple]:
    temperature = strategy.temperature if strategy.samples > 1 else 0.0
    texts = backend.generate([v[2] for v in variants], strategy.new_tokens, temperature=temperature,
                             top_p=strategy.top_p, seed=strategy.seed, stop=STOP)
    return [(extract_answer(t, v[3].options), None, None, t) for v, t in zip(variants, texts)]


# ------------------------------------------------------------------------------------- exemplars
_FINAL = re.compile(r"(?:(?:therefore|thus|so|hence),?\s+)?(?:the\s+)?(?:final\s+|correct\s+|best\s+)?answer\s+is",
                    re.IGNORECASE)


def rationale_from(text: str) -> str:
    """The reasoning part of a chain-of-thought reply (before its last answer statement)."""
    cuts = list(_FINAL.finditer(text))
    return (text[: cuts[-1].start()] if cuts else text).strip()


def select_exemplars(backend: Backend, items: Sequence[Item], train: Sequence[Item], strategy: Strategy,
                     log: Callable[[str], None]) -> list[list[Exemplar]]:
    """The few-shot exemplars of each item; chain-of-thought shots need a rationale (see `strategies`)."""
    candidates = candidate_exemplars(items, train, strategy)
    rationales = {i: train[i].explanation for ranked in candidates for i in ranked} if strategy.cot else {}
    if strategy.cot:
        needed = sorted({i for ranked in candidates for i in ranked[: 2 * strategy.shots] if not rationales[i]})
        if needed:
            log(f"{strategy.name}: self-generating chain-of-thought rationales for {len(needed)} train items")
            texts = backend.generate([build_prompt(train[i], cot=True) for i in needed], strategy.new_tokens,
                                     temperature=0.0, seed=strategy.seed, stop=STOP)
            for i, text in zip(needed, texts):
                rationale = rationale_from(text)
                rationales[i] = rationale if rationale and extract_answer(text, train[i].options) == train[i].answer else None
    chosen = []
    for ranked in candidates:
        usable = [i for i in ranked if not strategy.cot or rationales.get(i)]
        chosen.append([Exemplar(train[i], rationales.get(i)) for i in usable[: strategy.shots]])
    return chosen
