"""Writes the SYNTHETIC benchmark set shipped in `clinmega/evaluation/synthetic/` (tests and demo only).

The items are simple textbook facts written for this project, rendered into the file layout of each
public release (see `benchmarks`); they are not items of MedQA, MedMCQA, PubMedQA or MMLU. Regenerate with
``python -m clinmega.evaluation.synthetic_data``; a test checks that the shipped files match this code.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from clinmega.benchmark_files import LETTERS
from clinmega.evaluation.benchmarks import MMLU_CLINICAL, SYNTHETIC_DIR

SOURCE = "SYNTHETIC clinmega test item (not from any real benchmark)"
N_TEST, N_TRAIN = 20, 10

# (question, correct answer, four distractors, explanation)
FACTS: list[tuple[str, str, tuple[str, str, str, str], str]] = [
    ("Deficiency of which vitamin causes scurvy?", "Vitamin C", ("Vitamin A", "Vitamin D", "Vitamin K", "Vitamin B12"),
     "Vitamin C is needed for collagen hydroxylation; its lack causes scurvy."),
    ("Which hormone lowers blood glucose?", "Insulin", ("Glucagon", "Cortisol", "Adrenaline", "Growth hormone"),
     "Insulin promotes glucose uptake and storage, lowering blood glucose."),
    ("Which organ produces bile?", "Liver", ("Gallbladder", "Pancreas", "Spleen", "Stomach"),
     "Hepatocytes produce bile; the gallbladder only stores it."),
    ("Which cranial nerve innervates the lateral rectus muscle?", "Abducens nerve",
     ("Oculomotor nerve", "Trochlear nerve", "Facial nerve", "Optic nerve"),
     "The abducens nerve (VI) supplies the lateral rectus."),
    ("What is the first-line drug for type 2 diabetes in most guidelines?", "Metformin",
     ("Insulin glargine", "Glipizide", "Pioglitazone", "Acarbose"),
     "Metformin is the usual first-line agent for type 2 diabetes."),
    ("Which blood cells carry oxygen?", "Erythrocytes", ("Neutrophils", "Platelets", "Lymphocytes", "Monocytes"),
     "Erythrocytes carry oxygen bound to haemoglobin."),
    ("Which bone is the longest in the human body?", "Femur", ("Tibia", "Humerus", "Fibula", "Radius"),
     "The femur is the longest bone."),
    ("Which valve lies between the left atrium and the left ventricle?", "Mitral valve",
     ("Tricuspid valve", "Aortic valve", "Pulmonary valve", "Eustachian valve"),
     "The mitral valve separates the left atrium from the left ventricle."),
    ("Which electrolyte disturbance produces peaked T waves on ECG?", "Hyperkalaemia",
     ("Hypokalaemia", "Hypercalcaemia", "Hyponatraemia", "Hypomagnesaemia"),
     "Peaked T waves are an early ECG sign of hyperkalaemia."),
    ("What is the inheritance pattern of cystic fibrosis?", "Autosomal recessive",
     ("Autosomal dominant", "X-linked recessive", "X-linked dominant", "Mitochondrial"),
     "Cystic fibrosis is autosomal recessive (CFTR)."),
    ("Which antidote is used for paracetamol overdose?", "N-acetylcysteine",
     ("Naloxone", "Flumazenil", "Atropine", "Vitamin K"),
     "N-acetylcysteine replenishes glutathione after paracetamol overdose."),
    ("Which antidote reverses opioid overdose?", "Naloxone", ("Flumazenil", "Protamine", "Digoxin Fab", "Glucagon"),
     "Naloxone is an opioid receptor antagonist."),
    ("Where is the sinoatrial node located?", "Right atrium",
     ("Left atrium", "Right ventricle", "Left ventricle", "Interventricular septum"),
     "The SA node lies in the wall of the right atrium."),
    ("Which organism causes tuberculosis?", "Mycobacterium tuberculosis",
     ("Staphylococcus aureus", "Streptococcus pneumoniae", "Escherichia coli", "Candida albicans"),
     "Tuberculosis is caused by Mycobacterium tuberculosis."),
    ("Which muscle is the main muscle of inspiration?", "Diaphragm",
     ("Pectoralis major", "Rectus abdominis", "Trapezius", "Latissimus dorsi"),
     "The diaphragm performs most of quiet inspiration."),
    ("Which chromosome abnormality causes Down syndrome?", "Trisomy 21",
     ("Trisomy 18", "Trisomy 13", "Monosomy X", "Deletion 22q11"),
     "Down syndrome is trisomy 21."),
    ("Which enzyme is deficient in phenylketonuria?", "Phenylalanine hydroxylase",
     ("Tyrosinase", "Homogentisate oxidase", "Hexosaminidase A", "Glucocerebrosidase"),
     "Classic PKU is phenylalanine hydroxylase deficiency."),
    ("Which part of the nephron is the main site of glucose reabsorption?", "Proximal convoluted tubule",
     ("Loop of Henle", "Distal convoluted tubule", "Collecting duct", "Glomerulus"),
     "Glucose is reabsorbed in the proximal convoluted tubule."),
    ("Which vitamin is needed to synthesise clotting factors II, VII, IX and X?", "Vitamin K",
     ("Vitamin C", "Vitamin E", "Vitamin B1", "Vitamin A"),
     "Vitamin K carboxylates factors II, VII, IX and X."),
    ("Which gland secretes thyroxine?", "Thyroid gland",
     ("Adrenal gland", "Pituitary gland", "Parathyroid gland", "Pineal gland"),
     "The thyroid secretes thyroxine (T4)."),
    ("Which class of drug is amoxicillin?", "Penicillin antibiotic",
     ("Macrolide antibiotic", "Fluoroquinolone antibiotic", "Tetracycline antibiotic", "Antifungal"),
     "Amoxicillin is an aminopenicillin."),
    ("Which nerve is compressed in carpal tunnel syndrome?", "Median nerve",
     ("Ulnar nerve", "Radial nerve", "Musculocutaneous nerve", "Axillary nerve"),
     "Carpal tunnel syndrome compresses the median nerve."),
    ("Which cells produce antibodies?", "Plasma cells", ("T helper cells", "Neutrophils", "Macrophages", "Mast cells"),
     "Plasma cells, derived from B cells, secrete antibodies."),
    ("What is the normal resting adult heart rate range in beats per minute?", "60 to 100",
     ("20 to 40", "40 to 50", "110 to 140", "150 to 180"),
     "A normal adult resting heart rate is 60-100 beats per minute."),
    ("Which lobe of the brain contains the primary visual cortex?", "Occipital lobe",
     ("Frontal lobe", "Parietal lobe", "Temporal lobe", "Insula"),
     "The primary visual cortex is in the occipital lobe."),
    ("Which organelle produces most cellular ATP?", "Mitochondrion",
     ("Ribosome", "Golgi apparatus", "Lysosome", "Nucleolus"),
     "Oxidative phosphorylation in mitochondria produces most ATP."),
    ("Which hormone is produced by the posterior pituitary?", "Oxytocin",
     ("Prolactin", "Growth hormone", "Thyroid-stimulating hormone", "Adrenocorticotropic hormone"),
     "The posterior pituitary releases oxytocin and vasopressin."),
    ("Which artery is most often involved in a myocardial infarction of the anterior wall?",
     "Left anterior descending artery", ("Right coronary artery", "Left circumflex artery",
                                         "Posterior descending artery", "Marginal artery"),
     "The LAD supplies the anterior wall of the left ventricle."),
    ("Which drug class ends in -pril?", "ACE inhibitors",
     ("Beta blockers", "Calcium channel blockers", "Statins", "Angiotensin receptor blockers"),
     "Drugs ending in -pril (e.g. lisinopril) are ACE inhibitors."),
    ("Which pancreatic cells secrete insulin?", "Beta cells", ("Alpha cells", "Delta cells", "Acinar cells", "PP cells"),
     "Beta cells of the islets of Langerhans secrete insulin."),
    ("Which mineral deficiency is the most common cause of anaemia worldwide?", "Iron",
     ("Zinc", "Copper", "Calcium", "Iodine"), "Iron deficiency is the commonest cause of anaemia."),
    ("Which vessel carries oxygenated blood from the lungs to the heart?", "Pulmonary vein",
     ("Pulmonary artery", "Superior vena cava", "Aorta", "Inferior vena cava"),
     "Pulmonary veins return oxygenated blood to the left atrium."),
    ("Which joint type is the shoulder joint?", "Ball and socket",
     ("Hinge", "Pivot", "Saddle", "Plane"), "The glenohumeral joint is a ball-and-socket joint."),
    ("Which test is used to screen for cervical cancer?", "Pap smear",
     ("Colonoscopy", "Mammography", "PSA test", "Spirometry"), "Cervical cytology (Pap smear) screens for cervical cancer."),
    ("Which virus causes chickenpox?", "Varicella-zoster virus",
     ("Measles virus", "Mumps virus", "Rubella virus", "Epstein-Barr virus"),
     "Chickenpox is primary varicella-zoster infection."),
    ("Which neurotransmitter is lost in Parkinson disease?", "Dopamine",
     ("Serotonin", "Acetylcholine", "GABA", "Glycine"),
     "Parkinson disease involves loss of dopaminergic neurons of the substantia nigra."),
    ("Which blood type is the universal red cell donor?", "O negative",
     ("AB positive", "A positive", "B negative", "AB negative"), "O negative red cells lack A, B and RhD antigens."),
    ("Which structure connects muscle to bone?", "Tendon", ("Ligament", "Cartilage", "Fascia", "Bursa"),
     "Tendons attach muscle to bone."),
    ("Which gas is exchanged for oxygen in the alveoli?", "Carbon dioxide",
     ("Nitrogen", "Carbon monoxide", "Helium", "Argon"), "Alveoli take up oxygen and release carbon dioxide."),
    ("Which mutation type causes sickle cell disease?", "Point mutation in the beta-globin gene",
     ("Deletion of alpha-globin genes", "Trinucleotide repeat expansion", "Chromosomal translocation",
      "Mitochondrial DNA deletion"), "Sickle cell disease is a single base substitution (Glu6Val) in beta-globin."),
]

# (question, context sentences, decision) for the PubMedQA-style set: yes / no / maybe
CLAIMS = [
    ("Does {x} lower systolic blood pressure in adults with hypertension?",
     ["In this synthetic trial {n} adults were randomised to {x} or placebo.",
      "Systolic pressure fell by 9 mmHg more with {x} (p<0.001)."], "yes"),
    ("Does {x} reduce 30-day mortality after hip fracture surgery?",
     ["This synthetic cohort followed {n} patients after hip fracture surgery.",
      "Mortality at 30 days was similar with and without {x} (risk ratio 1.01, 95% CI 0.92-1.10)."], "no"),
    ("Is {x} associated with fewer hospital admissions for asthma?",
     ["In this synthetic observational study of {n} patients, admissions were 12% lower with {x}.",
      "The confidence interval was wide and crossed no effect; confounding could not be excluded."], "maybe"),
]
DRUG_KINDS = ("drug", "compound", "agent", "therapy", "regimen", "tablet")


def _facts(seed: int) -> list[tuple[str, str, tuple[str, ...], str]]:
    facts = list(FACTS)
    random.Random(seed).shuffle(facts)
    return facts


def _options(fact: tuple, n_options: int, rng: random.Random) -> tuple[list[str], int]:
    question, correct, distractors, _ = fact
    options = [correct, *distractors[: n_options - 1]]
    rng.shuffle(options)
    return options, options.index(correct)


def _split(seed: int) -> dict[str, list[tuple]]:
    facts = _facts(seed)
    return {"test": facts[:N_TEST], "train": facts[N_TEST:N_TEST + N_TRAIN]}


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _medqa(n_options: int, seed: int) -> dict[str, str]:
    out = {}
    for split, facts in _split(seed).items():
        rng, rows = random.Random(seed + len(split)), []
        for fact in facts:
            options, answer = _options(fact, n_options, rng)
            rows.append({"source": SOURCE, "question": fact[0], "answer": options[answer],
                         "options": dict(zip(LETTERS, options)), "meta_info": "synthetic",
                         "answer_idx": LETTERS[answer]})
        out[split] = _jsonl(rows)
    return out


def _medmcqa(seed: int) -> dict[str, str]:
    out = {}
    for split, facts in _split(seed).items():
        rng, rows = random.Random(seed + len(split)), []
        for i, fact in enumerate(facts):
            options, answer = _options(fact, 4, rng)
            rows.append({"id": f"SYNTHETIC-medmcqa-{split}-{i:03d}", "question": fact[0],
                         **dict(zip(("opa", "opb", "opc", "opd"), options)), "cop": answer + 1,  # GitHub: 1-based
                         "choice_type": "single", "exp": fact[3], "subject_name": "synthetic"})
        out[split] = _jsonl(rows)
    return out


def _pubmedqa(seed: int) -> dict[str, str]:
    rng, out = random.Random(seed), {}
    for split, count in (("test", N_TEST), ("train", N_TRAIN)):
        records = {}
        for i in range(count):
            question, contexts, decision = CLAIMS[i % len(CLAIMS)]
            k = i + (N_TEST if split == "train" else 0)  # distinct interventions in test and train
            drug, n = f"{DRUG_KINDS[k % len(DRUG_KINDS)]} {LETTERS[k % 26]}-{101 + 37 * k}", rng.randint(80, 900)
            records[f"SYNTHETIC-{split}-{i:04d}"] = {
                "QUESTION": question.format(x=drug), "CONTEXTS": [c.format(x=drug, n=n) for c in contexts],
                "LABELS": ["METHODS", "RESULTS"], "MESHES": ["Synthetic Data"], "YEAR": "2026",
                "final_decision": decision, "LONG_ANSWER": f"Synthetic conclusion: {decision}.",
            }
        out[split] = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    return out


def _mmlu(subject: str, seed: int) -> dict[str, str]:
    out = {}
    for split, facts in _split(seed).items():
        rng, buf = random.Random(seed + len(split)), io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        for fact in facts[: N_TEST if split == "test" else 5]:  # MMLU dev sets hold 5 items
            options, answer = _options(fact, 4, rng)
            writer.writerow([f"[SYNTHETIC {subject}] {fact[0]}", *options, LETTERS[answer]])
        out["dev" if split == "train" else split] = buf.getvalue()
    return out


def _normalized(seed: int) -> dict[str, str]:
    out = {}
    for split, facts in _split(seed).items():
        rng, rows = random.Random(seed + len(split)), []
        for i, fact in enumerate(facts):
            options, answer = _options(fact, 4, rng)
            rows.append({"id": f"SYNTHETIC-normalized-{split}-{i:03d}", "question": fact[0], "options": options,
                         "answer": answer, "explanation": fact[3]})
        out[split] = _jsonl(rows)
    return out


def synthetic_files() -> dict[str, str]:
    """Relative path -> file text of the whole synthetic set."""
    files = {}
    for split, text in _medqa(5, seed=1).items():
        files[f"medqa/synthetic_medqa_5opt_{split}.jsonl"] = text
    for split, text in _medqa(4, seed=2).items():
        files[f"medqa_4options/synthetic_medqa_4opt_{split}.jsonl"] = text
    for split, text in _medmcqa(seed=3).items():
        files[f"medmcqa/synthetic_medmcqa_{'dev' if split == 'test' else split}.jsonl"] = text
    for split, text in _pubmedqa(seed=4).items():
        files[f"pubmedqa/synthetic_pubmedqa_{split}.json"] = text
    for k, subject in enumerate(MMLU_CLINICAL):
        for split, text in _mmlu(subject, seed=10 + k).items():
            files[f"mmlu/synthetic/{subject}_{split}.csv"] = text
    for split, text in _normalized(seed=5).items():
        files[f"custom/synthetic_normalized_{split}.jsonl"] = text
    return files


def write_synthetic(out_dir: str | Path = SYNTHETIC_DIR) -> list[Path]:
    paths = []
    for rel, text in synthetic_files().items():
        path = Path(out_dir) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_synthetic():
        print(p)
