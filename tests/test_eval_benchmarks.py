"""Benchmark loaders: every public layout, the synthetic set, and malformed records reported by file:line."""

import json

import pytest

from clinmega.benchmark_files import PUBMEDQA_OPTIONS, BenchmarkFormatError, load_file
from clinmega.evaluation.benchmarks import BENCHMARKS, SYNTHETIC_DIR, expand_benchmark_names, load_benchmark
from clinmega.evaluation.synthetic_data import synthetic_files


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_shipped_synthetic_set_matches_generator():
    files = synthetic_files()
    shipped = {str(p.relative_to(SYNTHETIC_DIR)) for p in SYNTHETIC_DIR.rglob("*") if p.is_file()}
    assert shipped == set(files)
    for rel, text in files.items():
        assert (SYNTHETIC_DIR / rel).read_text(encoding="utf-8") == text, rel
        assert "synthetic" in rel


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_synthetic_benchmarks_load(name):
    test, train = load_benchmark(name, split="test"), load_benchmark(name, split="train")
    assert len(test) == 20 and len(train) >= 5
    n_options = {"medqa": 5, "pubmedqa": 3}.get(name, 4)
    for item in test + train:
        assert item.benchmark == name and len(item.options) == n_options and 0 <= item.answer < n_options
    assert len({i.id for i in test}) == len(test)
    assert not {i.question for i in test} & {i.question for i in train}
    if name == "pubmedqa":
        assert all(i.context and i.options == PUBMEDQA_OPTIONS for i in test)


def test_medqa_layout(tmp_path):
    row = {"question": "Q?", "answer": "Beta", "options": {"A": "Alpha", "B": "Beta", "C": "C", "D": "D", "E": "E"},
           "meta_info": "step1", "answer_idx": "B"}
    [item] = load_file(write(tmp_path, "us_test.jsonl", jsonl([row])))
    assert item.options == ("Alpha", "Beta", "C", "D", "E") and item.answer == 1


@pytest.mark.parametrize("cops,base,expected", [([1, 4, 2], None, [0, 3, 1]),  # GitHub release: 1-based
                                                ([0, 3, 2], None, [0, 3, 2]),  # HF export: 0-based
                                                ([1, 2], 1, [0, 1]), ([1, 2], 0, [1, 2])])
def test_medmcqa_cop_base(tmp_path, cops, base, expected):
    rows = [{"id": f"m{k}", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": c, "exp": "why"}
            for k, c in enumerate(cops)]
    items = load_file(write(tmp_path, "dev.json", jsonl(rows)), cop_base=base)
    assert [i.answer for i in items] == expected and items[0].explanation == "why"


def test_medmcqa_ambiguous_or_hidden_answers_are_errors(tmp_path):
    rows = [{"id": "m", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": c} for c in (1, 2)]
    with pytest.raises(BenchmarkFormatError, match="fit both 0-based"):
        load_file(write(tmp_path, "dev.json", jsonl(rows)))
    rows = [{"id": "m", "question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": c} for c in (0, -1)]
    with pytest.raises(BenchmarkFormatError, match=r"test\.json:2: no usable answer"):
        load_file(write(tmp_path, "test.json", jsonl(rows)))


def test_pubmedqa_layouts(tmp_path):
    ori = {"12345": {"QUESTION": "Does X work?", "CONTEXTS": ["We did.", "It did."], "LABELS": ["METHODS", "RESULTS"],
                     "final_decision": "maybe", "LONG_ANSWER": "Perhaps."}}
    [item] = load_file(write(tmp_path, "ori_pqal.json", json.dumps(ori, indent=2)))
    assert (item.id, item.answer, item.context) == ("12345", 2, "METHODS: We did.\nRESULTS: It did.")
    hf = {"pubid": 7, "question": "Does Y work?", "context": {"contexts": ["c1"], "labels": ["BACKGROUND"]},
          "long_answer": "No.", "final_decision": "no"}
    [item] = load_file(write(tmp_path, "pqa_labeled.jsonl", jsonl([hf])))
    assert (item.id, item.answer, item.context) == ("7", 1, "BACKGROUND: c1")


def test_mmlu_csv_and_hf_choices_and_normalized(tmp_path):
    csv_text = '"Which, with a comma?",one,two,"three ""quoted""",four,C\nSecond?,a,b,c,d,A\n'
    items = load_file(write(tmp_path, "anatomy_test.csv", csv_text))
    assert items[0].question == "Which, with a comma?" and items[0].options[2] == 'three "quoted"'
    assert [i.answer for i in items] == [2, 0] and items[1].id == "anatomy_test.csv:2"
    hf = [{"question": "Q?", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 3}]
    assert load_file(write(tmp_path, "cais.jsonl", jsonl(hf)))[0].answer == 3
    norm = [{"id": "n1", "question": "Q?", "options": ["p", "q", "r"], "answer": 1, "context": "ctx"}]
    [item] = load_file(write(tmp_path, "x.jsonl", jsonl(norm)))
    assert (item.id, item.options, item.answer, item.context) == ("n1", ("p", "q", "r"), 1, "ctx")


def test_malformed_records_reported_with_file_and_line(tmp_path):
    good = {"id": "ok", "question": "Q?", "options": ["a", "b"], "answer": 0}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "answer": 5}), json.dumps({"question": "Q?"}),
             "", json.dumps({**good, "options": "ab"})]
    path = write(tmp_path, "bad_test.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(BenchmarkFormatError) as err:
        load_file(path)
    problems = err.value.problems
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in (2, 3, 4, 6)]
    assert "invalid JSON" in problems[0] and "outside the 2 options" in problems[1]
    assert "unrecognised record layout" in problems[2] and "list of non-empty strings" in problems[3]
    assert f"{path}:2" in str(err.value)


def test_malformed_csv_and_pubmedqa(tmp_path):
    path = write(tmp_path, "anatomy_test.csv", "Q?,a,b,c,d,A\nQ2?,a,b,c,d,F\nshort,A\n")
    with pytest.raises(BenchmarkFormatError) as err:
        load_file(path)
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{path}:2", f"{path}:3"]
    ori = {"1": {"QUESTION": "Q", "CONTEXTS": ["c"], "final_decision": "probably"}}
    with pytest.raises(BenchmarkFormatError, match=r"\[1\]: final_decision 'probably'"):
        load_file(write(tmp_path, "test_set.json", json.dumps(ori)))


def test_load_benchmark_from_data_dir(tmp_path):
    row = {"question": "Q?", "options": {"A": "x", "B": "y", "C": "z", "D": "w"}, "answer_idx": "D"}
    write(tmp_path, "medqa_4options/phrases_no_exclude_test.jsonl", jsonl([row, row]))
    write(tmp_path, "mmlu/data/test/anatomy_test.csv", "Q?,a,b,c,d,B\n")
    assert [i.answer for i in load_benchmark("medqa_4options", tmp_path)] == [3, 3]
    assert load_benchmark("mmlu_anatomy", tmp_path)[0].benchmark == "mmlu_anatomy"
    with pytest.raises(FileNotFoundError, match="medmcqa/test"):
        load_benchmark("medmcqa", tmp_path)


def test_benchmark_names():
    assert expand_benchmark_names(["medqa", "mmlu_clinical"])[:2] == ["medqa", "mmlu_anatomy"]
    assert len(expand_benchmark_names(["mmlu_clinical"])) == 6
    with pytest.raises(ValueError, match="unknown benchmark 'medqaa'"):
        expand_benchmark_names(["medqaa"])
