"""Synthetic, clearly-labelled toy data for the CPU demo: clinical notes, general text, chat.

Nothing here is real patient data or a real benchmark: sentences are assembled from templates with
a seeded RNG so that the demo runs offline, reproducibly, in seconds. Every record carries
``"synthetic": true``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

AGES = range(18, 90)
SEXES = ("male", "female")
COMPLAINTS = {
    "chest pain radiating to the left arm": ("acute coronary syndrome", "troponin and an ECG",
                                             "aspirin and cardiology review"),
    "fever and productive cough": ("community-acquired pneumonia", "a chest radiograph",
                                   "oral amoxicillin"),
    "polyuria and polydipsia": ("type 2 diabetes mellitus", "HbA1c and fasting glucose",
                                "metformin and dietary advice"),
    "sudden unilateral weakness": ("ischaemic stroke", "an urgent CT head",
                                   "thrombolysis assessment"),
    "wheeze and shortness of breath": ("asthma exacerbation", "peak flow measurement",
                                       "nebulised salbutamol"),
    "right lower quadrant pain": ("acute appendicitis", "an abdominal ultrasound",
                                  "surgical review"),
    "fatigue and pallor": ("iron deficiency anaemia", "a full blood count and ferritin",
                           "oral iron supplementation"),
    "painful swollen calf": ("deep vein thrombosis", "a compression ultrasound",
                             "anticoagulation"),
}
GENERAL = (
    "The river crosses the valley before it reaches the old stone bridge.",
    "Libraries lend books, music and maps to anyone with a card.",
    "The committee met on Tuesday to discuss the new timetable.",
    "Autumn leaves turn red and yellow as the days grow shorter.",
    "A good loaf of bread needs flour, water, salt and patience.",
    "The museum opened a new wing dedicated to early photography.",
    "Trains to the coast leave every hour during the summer.",
    "She practised the piano every evening after dinner.",
)


def _note(rng: random.Random) -> str:
    complaint, (diagnosis, test, plan) = rng.choice(list(COMPLAINTS.items()))
    age, sex = rng.choice(AGES), rng.choice(SEXES)
    return (f"SYNTHETIC NOTE. A {age}-year-old {sex} presents with {complaint}. "
            f"Examination and history are consistent with {diagnosis}. "
            f"Investigations: {test}. Plan: {plan}. Follow-up in {rng.randint(1, 6)} weeks.")


def clinical_documents(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"clin-{i}", "synthetic": True,
             "text": " ".join(_note(rng) for _ in range(rng.randint(2, 5)))} for i in range(n)]


def general_documents(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"gen-{i}", "synthetic": True,
             "text": " ".join(rng.choice(GENERAL) for _ in range(rng.randint(3, 8)))}
            for i in range(n)]


def chat_examples(n: int, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        complaint, (diagnosis, test, plan) = rng.choice(list(COMPLAINTS.items()))
        age = rng.choice(AGES)
        messages = [
            {"role": "user", "content": f"A {age}-year-old presents with {complaint}. "
                                        "What is the most likely diagnosis?"},
            {"role": "assistant", "content": f"The most likely diagnosis is {diagnosis}."},
        ]
        if rng.random() < 0.5:  # multi-turn
            messages += [{"role": "user", "content": "Which investigation comes first?"},
                         {"role": "assistant", "content": f"Start with {test}, then {plan}."}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "You are a careful clinical assistant."})
        out.append({"id": f"chat-{i}", "synthetic": True, "messages": messages})
    return out


def write_jsonl(records: list[dict], path: Path, corrupt_lines: int = 0) -> Path:
    """Write records as JSONL; ``corrupt_lines`` malformed lines are appended to show that the
    data pipeline counts and reports them instead of dropping them silently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        for i in range(corrupt_lines):
            f.write('{"id": "broken-%d", "text": "unterminated\n' % i)
    return path
