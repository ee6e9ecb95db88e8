"""`clinmega eval` end to end on a tiny HF model and the synthetic set; report contents."""

import argparse
import json

import pytest

from eval_fixtures import tiny_hf_model_dir
from clinmega.cli import main as clinmega_main
from clinmega.evaluation import cli
from clinmega.evaluation.report import bootstrap_ci, markdown_table, summarize
from clinmega.evaluation.scoring import ItemResult


def test_register_adds_eval_subcommand():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "m", "--out", "o", "--strategies", "cot,medprompt"])
    assert args.func is cli.run and args.backend == "auto" and args.data_dir is None
    hf = tiny_hf_model_dir()
    assert cli.resolve_model("auto", hf) == ("hf", hf)  # no megatron-core checkpoint there


def test_eval_writes_json_markdown_and_chart(tmp_path):
    out = tmp_path / "report"
    rc = clinmega_main(["eval", str(tiny_hf_model_dir()), "--benchmarks", "medqa_4options,mmlu_anatomy",
                   "--strategies", "zero_shot,knn_few_shot+choice_shuffle,cot", "--limit", "4",
                   "--max-new-tokens", "4", "--out", str(out), "--bootstrap", "200"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert len(data["items"]) == 2 * 3 * 4
    assert {(r["benchmark"], r["strategy"]) for r in data["summary"]} == {
        (b, s) for b in ("medqa_4options", "mmlu_anatomy") for s in ("zero_shot", "knn_few_shot+choice_shuffle", "cot")}
    for row in data["summary"]:
        low, high = row["acc"]["ci95"]
        assert row["n"] == 4 and low <= row["acc"]["value"] <= high
    shuffled = [i for i in data["items"] if i["strategy"] == "knn_few_shot+choice_shuffle"]
    assert all(len(i["votes"]) == 5 and len(i["exemplars"]) == 5 for i in shuffled)
    lines = (out / "results.md").read_text().splitlines()
    table = lines[: lines.index("")] if "" in lines else lines  # the accuracy table comes first
    assert table[0].startswith("| benchmark | strategy |") and len(table) == 2 + 6
    assert any(line.startswith("Answer-order bias") for line in lines)  # choice_shuffle ran
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp"))


def test_rerun_resumes_from_finished_parts(tmp_path, monkeypatch, capsys):
    def command(limit):
        return ["eval", str(tiny_hf_model_dir()), "--benchmarks", "pubmedqa", "--strategies", "zero_shot,option_text",
                "--limit", str(limit), "--out", str(tmp_path), "--bootstrap", "50"]

    args = command(3)
    assert clinmega_main(args) == 0
    first = json.loads((tmp_path / "results.json").read_text())
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["pubmedqa.option_text.json",
                                                                       "pubmedqa.zero_shot.json"]

    def no_model(_):
        raise AssertionError("the model was loaded although every part was finished")

    monkeypatch.setattr(cli, "build_backend", no_model)
    capsys.readouterr()
    assert clinmega_main(args) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    assert json.loads((tmp_path / "results.json").read_text())["items"] == first["items"]
    with pytest.raises(AssertionError, match="the model was loaded"):
        clinmega_main(command(4))  # other items: recomputed
    with pytest.raises(AssertionError, match="the model was loaded"):
        clinmega_main(args + ["--no-resume"])


def test_bad_inputs_fail_before_loading_a_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "build_backend", lambda _: pytest.fail("a model was loaded"))
    assert clinmega_main(["eval", str(tmp_path), "--benchmarks", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert clinmega_main(["eval", str(tmp_path), "--strategies", "zero_shot+nope", "--out", str(tmp_path)]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    bad = tmp_path / "data" / "medqa"
    bad.mkdir(parents=True)
    (bad / "test.jsonl").write_text('{"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "C"}\n')
    args = ["eval", str(tmp_path), "--benchmarks", "medqa", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path)]
    assert clinmega_main(args) == 2
    assert f"{bad / 'test.jsonl'}:1: answer_idx 'C'" in capsys.readouterr().err
    assert clinmega_main(args[:-4] + ["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    assert "medqa/test: no file under" in capsys.readouterr().err


def test_bootstrap_and_summary():
    correct = [True] * 30 + [False] * 70
    low, high = bootstrap_ci(correct, n_resamples=4000, seed=1)
    assert low < 0.3 < high and 0.19 < low < 0.23 and 0.37 < high < 0.41  # normal approx: 0.3 +- 0.09
    assert bootstrap_ci(correct, seed=1) == bootstrap_ci(correct, seed=1) != bootstrap_ci(correct, seed=2)
    results = [ItemResult("b", "s", str(k), 0, 0 if k < 3 else None, k < 3) for k in range(4)]
    [row] = summarize(results, n_resamples=100)
    assert row["acc"]["value"] == 0.75 and row["unanswered"] == 1 and "acc_norm" not in row
    assert "| b | s | 4 | 0.750 |" in markdown_table([row])
