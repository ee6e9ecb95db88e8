"""The ``lm-eval`` prompt format: lm-eval 0.4.13's built-in tasks, rendered from clinmega `Item`s.

Each benchmark maps to the built-in task a leaderboard number comes from, with that task's text
(``doc_to_text``), choices (``doc_to_choice``), target and few-shot delimiters, description, few-shot source
split and sampler, and metrics:

* ``medqa_4options``: ``Question: {q}\\nA. {o}\\n...D. {o}\\nAnswer:``; choices A-D; exemplars from train, random;
* ``medmcqa``: ``Question: {q}\\nChoices:\\nA. {o}\\n...D. {o}\\nAnswer:``; choices A-D; train, random;
* ``pubmedqa``: ``Abstract: {sections joined by \\n}\\nQuestion: {q}\\nAnswer:``; choices yes/no/maybe; train, random;
* ``mmlu_<subject>``: the description ``The following are multiple choice questions (with answers) about
  {subject}.\\n\\n``, then ``{q.strip()}\\nA. {o}\\n...D. {o}\\nAnswer:``; choices A-D; dev, first n.

A prompt is ``description + (text + " " + choice[gold] + "\\n\\n") per exemplar + text``; each choice is
scored as the continuation ``" " + choice``; ``acc`` takes the argmax of the summed log-likelihoods,
``acc_norm`` of the log-likelihoods divided by the choice's character length (lm-eval reports ``acc``
only for pubmedqa and MMLU; clinmega reports both everywhere). lm-eval's random sampler is one
``random.Random(1234)`` per task drawing ``n`` exemplars for each test document in order (`LmEvalSampler`), so the first N items get the same exemplars with any ``--limit``.
The ``multimedqa`` group reports the size-weighted mean ``acc`` of its nine tasks (`report`).

Fields are used as written, as lm-eval does (only MMLU strips its question). Benchmarks without a built-in
lm-eval task (5-option ``medqa``, ``custom``) use the ``unified`` layout. Checked against lm-eval itself in
``tests/test_eval_lm_eval_compat.py`` (lm-eval's own task files, pointed at local data).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

from clinmega.benchmark_files import LETTERS, PUBMEDQA_OPTIONS, Item
from clinmega.evaluation.benchmarks import MMLU_CLINICAL

LM_EVAL_VERSION = "0.4.13"
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class LmEvalTask:
    """One built-in lm-eval task as clinmega renders it."""

    name: str  # the lm-eval task name
    text: Callable[[Item], str]
    letters: bool  # choices are the option letters (else the option texts, pubmedqa)
    description: str = ""
    sampler: Literal["default", "first_n"] = "default"
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    n_options: int | None = 4

    def choices(self, item: Item) -> list[str]:
        return list(LETTERS[: len(item.options)]) if self.letters else list(item.options)

    def check(self, item: Item) -> None:
        if self.n_options is not None and len(item.options) != self.n_options:
            raise ValueError(f"{item.benchmark or self.name} item {item.id}: lm-eval's {self.name} task has "
                             f"{self.n_options} options, the item {len(item.options)}")
        if not self.letters and sorted(item.options) != sorted(PUBMEDQA_OPTIONS):  # any order (choice shuffle)
            raise ValueError(f"item {item.id}: {self.name} scores the choices {PUBMEDQA_OPTIONS}, "
                             f"the item has {item.options}")

    def prompt(self, item: Item, exemplars: Sequence[Item] = ()) -> str:
        self.check(item)
        shots = []
        for ex in exemplars:
            self.check(ex)
            shots.append(self.text(ex) + TARGET_DELIMITER + self.choices(ex)[ex.answer] + FEWSHOT_DELIMITER)
        return self.description + "".join(shots) + self.text(item)

    def continuations(self, item: Item) -> list[str]:
        return [TARGET_DELIMITER + c for c in self.choices(item)]


def _lettered(item: Item) -> str:
    return "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(item.options))


def _medqa_text(item: Item) -> str:  # lm_eval/tasks/medqa/preprocess_medqa.py
    return f"Question: {item.question}\n{_lettered(item)}Answer:"


def _medmcqa_text(item: Item) -> str:  # lm_eval/tasks/medmcqa/utils_medmcqa.py
    return "Question: " + item.question + "\nChoices:\n" + _lettered(item) + "Answer:"


def _pubmedqa_text(item: Item) -> str:  # lm_eval/tasks/pubmedqa/preprocess_pubmedqa.py
    if not item.passages:
        raise ValueError(f"pubmedqa item {item.id}: no abstract sections (CONTEXTS)")
    return "Abstract: {}\nQuestion: {}\nAnswer:".format("\n".join(item.passages), item.question)


def _mmlu_text(item: Item) -> str:  # lm_eval/tasks/mmlu/default/_default_template_yaml
    return f"{item.question.strip()}\n{_lettered(item)}Answer:"


TASKS: dict[str, LmEvalTask] = {
    "medqa_4options": LmEvalTask("medqa_4options", _medqa_text, letters=True),
    "medmcqa": LmEvalTask("medmcqa", _medmcqa_text, letters=True),
    "pubmedqa": LmEvalTask("pubmedqa", _pubmedqa_text, letters=False, metrics=("acc",), n_options=3),
    **{f"mmlu_{s}": LmEvalTask(
        f"mmlu_{s}", _mmlu_text, letters=True, sampler="first_n", metrics=("acc",),
        description=f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n")
       for s in MMLU_CLINICAL},
}


def task_for(benchmark: str) -> LmEvalTask | None:
    """The built-in lm-eval task of ``benchmark``, None when lm-eval has none (then: the unified layout)."""
    return TASKS.get(benchmark)


class LmEvalSampler:
    """lm-eval's few-shot exemplar choice for one task: ``first_n`` (MMLU: the first n of the dev split) or
    ``default`` (one ``random.Random(FEWSHOT_SEED)`` drawing ``rnd.sample(pool, n)`` per test document, in
    document order; the pool is the train split, never the test split, so nothing is excluded)."""

    def __init__(self, task: LmEvalTask, pool_size: int, shots: int):
        if shots > pool_size:
            raise ValueError(f"{task.name}: {shots} shots requested, the few-shot split has {pool_size} items")
        self.task, self.pool_size, self.shots = task, pool_size, shots
        self.rnd = random.Random(FEWSHOT_SEED)

    def next(self) -> list[int]:
        """Pool indices of the exemplars of the next test document."""
        if self.shots == 0:
            return []
        if self.task.sampler == "first_n":
            return list(range(self.shots))
        return self.rnd.sample(range(self.pool_size), self.shots)  # same draws as sampling the docs themselves
