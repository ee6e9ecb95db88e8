"""Answer extraction on real-world phrasings of multiple-choice answers."""

import pytest

from clinmega.evaluation.extraction import extract_answer

OPTS = ("Metformin", "Insulin glargine", "Glipizide", "Pioglitazone")
YNM = ("yes", "no", "maybe")

CASES = [
    ("The answer is (C).", OPTS, 2),
    ("The answer is C", OPTS, 2),
    ("the answer is c.", OPTS, 2),
    ("Answer: B", OPTS, 1),
    ("ANSWER: (D)", OPTS, 3),
    ("**Answer:** A", OPTS, 0),
    ("The correct answer is option C.", OPTS, 2),
    ("Correct answer - D", OPTS, 3),
    ("Final answer: B", OPTS, 1),
    ("The best answer is: **B. Insulin glargine**", OPTS, 1),
    ("Therefore, the answer is (A) Metformin.", OPTS, 0),
    ("Option A lowers glucose but causes lactic acidosis rarely; option B needs injections. "
     "Therefore, the answer is (C).", OPTS, 2),
    ("Let's think step by step. Glipizide is a sulfonylurea. The answer is C. Not A.", OPTS, 2),
    ("So the answer would be D", OPTS, 3),
    ("The most likely answer is [B]", OPTS, 1),
    ("The correct option is B.", OPTS, 1),
    ("$\\boxed{D}$", OPTS, 3),
    ("I would choose B.", OPTS, 1),
    ("I'd go with option C because it stimulates insulin release.", OPTS, 2),
    ("It's D.", OPTS, 3),
    ("(B) is correct.", OPTS, 1),
    ("Option D is the best choice here.", OPTS, 3),
    (" C", OPTS, 2),
    ("C.", OPTS, 2),
    ("(A)", OPTS, 0),
    ("D) Pioglitazone", OPTS, 3),
    ("B: Insulin glargine\n\nExplanation: basal insulin.", OPTS, 1),
    ("A Metformin", OPTS, 0),
    ("The answer is metformin.", OPTS, 0),
    ("Metformin is the first-line drug.", OPTS, 0),
    ("I believe pioglitazone fits best.", OPTS, 3),
    ("Yes", YNM, 0),
    ("No, the trial showed no difference.", YNM, 1),
    ("The answer is maybe.", YNM, 2),
    ("Answer: yes", YNM, 0),
    # no commitment, or letters that are not options
    ("A patient with diabetes needs careful assessment.", OPTS, None),
    ("I am not sure.", OPTS, None),
    ("The answer is E.", OPTS, None),
    ("Both metformin and glipizide lower glucose.", OPTS, None),
    ("", OPTS, None),
]


@pytest.mark.parametrize("text,options,expected", CASES)
def test_extract_answer(text, options, expected):
    assert extract_answer(text, options) == expected


def test_table_is_large_enough():
    assert len(CASES) >= 25
