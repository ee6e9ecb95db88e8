"""Prompting strategies as composable settings, plus exemplar selection and option permutations.

A `Strategy` is a set of orthogonal knobs; presets name common combinations and ``+`` composes them
(``"knn_few_shot+cot+choice_shuffle"`` equals the ``medprompt`` preset):

* ``prompt_format``: ``lm-eval`` (each benchmark's built-in lm-eval task, `lm_eval_tasks`), ``unified``
  (clinmega's one layout, `prompts`) or ``auto`` (default): ``lm-eval`` for log-likelihood scoring of
  letters, ``unified`` for option-text targets and generation strategies (chain of thought needs it);
  with ``lm-eval``, ``fixed`` few-shot selection is lm-eval's own sampler;
* ``target``: log-likelihood scoring of the option letters (default) or of the option texts (then
  ``acc_norm`` differs from ``acc``);
* ``shots`` / ``selection``: few-shot exemplars from the train split, ``fixed`` (the first ones),
  ``random`` (seeded per item) or ``knn`` (nearest by TF-IDF cosine similarity, `clinmega.evaluation.tfidf.TfidfIndex`);
* ``cot``: chain of thought (generation); few-shot CoT exemplars use the item's explanation when the
  release has one, else a rationale the model generated itself and that reached the right answer
  (Medprompt's self-generated CoT);
* ``samples`` > 1: self-consistency, that many sampled paths (``temperature``, ``top_p``), majority vote;
* ``permutations`` > 1: choice-shuffle ensemble, the same question with the options in that many
  orders (the first is the original), votes mapped back to the original options.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, fields, replace
from typing import Literal, Sequence

from clinmega.benchmark_files import Item


PROMPT_FORMATS = ("auto", "lm-eval", "unified")


@dataclass(frozen=True)
class Strategy:
    name: str = "zero_shot"
    scoring: Literal["loglikelihood", "generate"] = "loglikelihood"
    target: Literal["letter", "text"] = "letter"  # log-likelihood of " A" or of " <option text>"
    shots: int = 0
    selection: Literal["fixed", "random", "knn"] = "fixed"
    cot: bool = False
    samples: int = 1
    permutations: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 0  # 0: 384 with chain of thought, else 16
    seed: int = 1234
    prompt_format: Literal["auto", "lm-eval", "unified"] = "auto"

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"strategy {self.name}: prompt format {self.prompt_format!r} is not one of {PROMPT_FORMATS}")
        if self.prompt_format == "lm-eval" and (self.cot or self.target == "text"):
            raise ValueError(f"strategy {self.name}: the lm-eval prompt format has no chain of thought and scores "
                             "each task's own choices (target='letter'); use prompt format 'unified'")
        if self.cot and self.scoring != "generate":
            raise ValueError(f"strategy {self.name}: chain of thought needs scoring='generate'")
        if self.target == "text" and self.scoring != "loglikelihood":
            raise ValueError(f"strategy {self.name}: target='text' applies to log-likelihood scoring")
        if self.samples > 1 and self.scoring != "generate":
            raise ValueError(f"strategy {self.name}: self-consistency (samples>1) needs scoring='generate'")
        if self.shots < 0 or self.samples < 1 or self.permutations < 1:
            raise ValueError(f"strategy {self.name}: shots>=0, samples>=1, permutations>=1 required")

    @property
    def format(self) -> str:
        """The prompt format used: ``auto`` resolved (see the module docstring)."""
        if self.prompt_format != "auto":
            return self.prompt_format
        return "lm-eval" if self.scoring == "loglikelihood" and self.target == "letter" else "unified"

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or (384 if self.cot else 16)


PRESETS: dict[str, Strategy] = {
    "zero_shot": Strategy("zero_shot"),
    "option_text": Strategy("option_text", target="text"),
    "few_shot": Strategy("few_shot", shots=5),
    "random_few_shot": Strategy("random_few_shot", shots=5, selection="random"),
    "knn_few_shot": Strategy("knn_few_shot", shots=5, selection="knn"),
    "generate": Strategy("generate", scoring="generate"),
    "cot": Strategy("cot", scoring="generate", cot=True),
    "few_shot_cot": Strategy("few_shot_cot", scoring="generate", cot=True, shots=3),
    "self_consistency": Strategy("self_consistency", scoring="generate", cot=True, samples=5),
    "choice_shuffle": Strategy("choice_shuffle", permutations=5),
    "medprompt": Strategy("medprompt", scoring="generate", cot=True, shots=5, selection="knn", permutations=5),
}


def parse_strategy(spec: str) -> Strategy:
    """A preset name, or presets joined by ``+``: each part contributes the knobs it sets."""
    parts = [p.strip() for p in spec.split("+")]
    unknown = [p for p in parts if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; known: {', '.join(PRESETS)} (compose with '+')")
    if len(parts) == 1:
        return PRESETS[parts[0]]
    default, merged = Strategy(), {}
    for part in parts:
        merged.update({f.name: getattr(PRESETS[part], f.name) for f in fields(Strategy)
                       if f.name != "name" and getattr(PRESETS[part], f.name) != getattr(default, f.name)})
    return Strategy(name=spec, **merged)


# ------------------------------------------------------------------------------------ exemplar choice
def item_text(item: Item) -> str:
    return " ".join(filter(None, [item.context, item.question]))


def candidate_exemplars(items: Sequence[Item], train: Sequence[Item], strategy: Strategy) -> list[list[int]]:
    """Per item, train indices in order of preference (the first ``shots`` usable ones are used).

    Train items with the same question as the test item are never used (no leakage).
    """
    if strategy.shots == 0:
        return [[] for _ in items]
    if not train:
        raise ValueError(f"strategy {strategy.name} needs a train split for {strategy.shots} shots")
    from clinmega.evaluation.tfidf import TfidfIndex  # numpy: loaded when exemplars are chosen, not by --help

    index = TfidfIndex([item_text(t) for t in train]) if strategy.selection == "knn" else None
    out = []
    for n, item in enumerate(items):
        if strategy.selection == "knn":
            order = index.ranking(item_text(item))
        elif strategy.selection == "random":
            order = random.Random(f"{strategy.seed}:{item.benchmark}:{item.id}:{n}").sample(range(len(train)), len(train))
        else:
            order = list(range(len(train)))
        out.append([i for i in order if train[i].question.strip() != item.question.strip()])
    return out


# --------------------------------------------------------------------------------- choice shuffling
def option_orders(n_options: int, count: int, rng: random.Random) -> list[tuple[int, ...]]:
    """``count`` distinct option orders, the original first (fewer when n_options! < count).

    ``order[j]`` is the original index of the option shown at position j.
    """
    orders = [tuple(range(n_options))]
    budget = min(count, math.factorial(n_options))
    while len(orders) < budget:
        order = tuple(rng.sample(range(n_options), n_options))
        if order not in orders:
            orders.append(order)
    return orders


def permute(item: Item, order: Sequence[int]) -> Item:
    """The item with its options shown in ``order`` (answer re-indexed)."""
    return replace(item, options=tuple(item.options[i] for i in order), answer=list(order).index(item.answer))


def majority_vote(votes: Sequence[int | None]) -> int | None:
    """Most frequent non-None vote; ties go to the option voted first (the original order's vote)."""
    counted = Counter(v for v in votes if v is not None)
    if not counted:
        return None
    best = max(counted.values())
    return next(v for v in votes if v is not None and counted[v] == best)
