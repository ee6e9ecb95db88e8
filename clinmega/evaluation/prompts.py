"""Prompt formats: clinmega's ``unified`` layout here, lm-eval's per-task layouts in `lm_eval_tasks`.

``unified``: one question layout for every benchmark, backend and strategy (fields stripped). Log-likelihood
scores the continuation ``" A"``, ``" B"``, ... after `question_block` (which ends in ``"Answer:"``); for
MedQA it equals lm-eval's ``medqa_4options`` prompt, for the other benchmarks it does not (use
``lm-eval``). Few-shot exemplars are complete blocks joined with ``"\\n\\n"``. Chain of thought adds an
instruction, a trigger after ``"Answer:"`` and, in exemplars, a rationale that ends in ``ANSWER_PHRASE``.

``lm-eval``: the prompt, choices, delimiters, description and few-shot sampler of lm-eval 0.4.13's built-in
task of each benchmark (`lm_eval_tasks`); the default for log-likelihood strategies with letter targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from clinmega.benchmark_files import LETTERS, Item

FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "
COT_INSTRUCTION = ("The following are multiple-choice questions about medicine. Think step by step, then "
                   "finish with \"Therefore, the answer is (X).\" where X is the letter of the best option.")
COT_TRIGGER = " Let's think step by step."
ANSWER_PHRASE = "Therefore, the answer is ({letter})."


@dataclass(frozen=True)
class Exemplar:
    """A solved example for few-shot prompts; ``rationale`` is required for chain-of-thought shots."""

    item: Item
    rationale: str | None = None


def question_block(item: Item) -> str:
    """Context (if any), question, lettered options, and the cue ``"Answer:"``."""
    lines = [f"Context: {item.context}"] if item.context else []
    lines.append(f"Question: {item.question.strip()}")
    lines += [f"{LETTERS[i]}. {option.strip()}" for i, option in enumerate(item.options)]
    lines.append("Answer:")
    return "\n".join(lines)


def choice_continuations(item: Item, target: str = "letter") -> list[str]:
    """What log-likelihood scoring appends to the prompt, one per option: ``" A"``, ``" B"``, ... or, with
    ``target="text"``, the option texts (``" yes"``, ``" no"``, ``" maybe"``, as lm-eval's pubmedqa)."""
    if target == "text":
        return [f"{TARGET_DELIMITER}{option.strip()}" for option in item.options]
    return [f"{TARGET_DELIMITER}{LETTERS[i]}" for i in range(len(item.options))]


def cot_answer(rationale: str, answer: int) -> str:
    return f"{COT_TRIGGER} {rationale.strip()} {ANSWER_PHRASE.format(letter=LETTERS[answer])}"


def build_prompt(item: Item, exemplars: Sequence[Exemplar] = (), cot: bool = False, target: str = "letter") -> str:
    """The full prompt for ``item``; with ``cot`` the model is expected to reason before answering;
    ``target`` is how exemplars state their answer (see `choice_continuations`)."""
    shots = []
    for ex in exemplars:
        if cot and not ex.rationale:
            raise ValueError(f"chain-of-thought exemplar {ex.item.id} has no rationale")
        answer = cot_answer(ex.rationale, ex.item.answer) if cot else choice_continuations(ex.item, target)[ex.item.answer]
        shots.append(question_block(ex.item) + answer)
    head = [COT_INSTRUCTION] if cot else []
    return FEWSHOT_DELIMITER.join([*head, *shots, question_block(item) + (COT_TRIGGER if cot else "")])
