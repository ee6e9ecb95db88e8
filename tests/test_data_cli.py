"""The data verbs through argparse, as the main clinmega CLI registers them."""

import argparse
import json

import pytest
from data_utils import write_jsonl

from clinmega.data import cli
from clinmega.data.config import BlendConfig


def _parser():
    parser = argparse.ArgumentParser(prog="clinmega")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv):
    from clinmega.cli import run_verb  # the one error handler: user errors -> message + exit 2

    args = _parser().parse_args(argv)
    return run_verb(args)


def test_prepare_pretrain_yaml_plus_cli_override_then_blend(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"body": f"note {i} about sepsis"} for i in range(50)])
    (tmp_path / "r.yaml").write_text(
        f"pretrain:\n  inputs: {tmp_path / 'a.jsonl'}\n  text_field: body\n  workers: 1\n  progress: false\n"
    )
    assert (
        _run(
            [
                "prepare",
                "pretrain",
                "--config",
                str(tmp_path / "r.yaml"),
                "--output-prefix",
                str(tmp_path / "o"),
                "--no-add-bos",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "o.manifest.json").read_text())
    assert manifest["config"]["add_bos"] is False and manifest["config"]["text_field"] == "body"
    assert manifest["totals"]["documents_written"] == 50
    capsys.readouterr()
    assert (
        _run(
            [
                "prepare",
                "blend",
                "--source",
                f"c={tmp_path / 'o'}:weight=1",
                "--train-samples",
                "20",
                "--seq-length",
                "8",
                "--split",
                "100,0,0",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    assert '"effective_epochs"' in capsys.readouterr().out


def test_exit_codes_and_errors_name_the_problem(tmp_path, capsys):
    write_jsonl(tmp_path / "bad.jsonl", [{"other": 1}])
    assert (
        _run(
            [
                "prepare",
                "pretrain",
                "--inputs",
                str(tmp_path / "bad.jsonl"),
                "--output-prefix",
                str(tmp_path / "o"),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 1
    )  # finished, wrote nothing
    assert (
        _run(
            ["prepare", "pretrain", "--inputs", str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "p")]
        )
        == 2
    )
    assert "missing.jsonl" in capsys.readouterr().err
    (tmp_path / "src.yaml").write_text("blend:\n  sources: [{name: a, prefx: /x, weight: 1}]\n")
    assert _run(["prepare", "blend", "--config", str(tmp_path / "src.yaml")]) == 2
    assert "blend.sources[0]" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text("sft:\n  seq_lenght: 10\n")
    assert _run(["prepare", "sft", "--config", str(tmp_path / "typo.yaml")]) == 2
    assert "seq_lenght" in capsys.readouterr().err


def test_sft_and_decontaminate_verbs(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [{"input": "Dose of X?", "output": "10 mg daily."}] * 5)
    assert (
        _run(
            [
                "prepare",
                "sft",
                "--inputs",
                str(tmp_path / "chat.jsonl"),
                "--output-dir",
                str(tmp_path / "sft"),
                "--tokenizer",
                "mistral-v3",
                "--seq-length",
                "128",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "sft" / "manifest.json").read_text())["packing"]["bins"] == 1
    write_jsonl(tmp_path / "eval.jsonl", [{"question": "one two three four five"}])
    write_jsonl(tmp_path / "train.jsonl", [{"text": "zero one two three four five six"}, {"text": "unrelated"}])
    assert (
        _run(
            [
                "decontaminate",
                "--inputs",
                str(tmp_path / "train.jsonl"),
                "--eval-sets",
                str(tmp_path / "eval.jsonl"),
                "--output-dir",
                str(tmp_path / "clean"),
                "--ngram",
                "3",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "clean" / "train.jsonl").read_text().count("\n") == 1


def test_source_syntax():
    assert cli.parse_source("clin=/d/clin:tokens=2e9").tokens == 2_000_000_000
    with pytest.raises(ValueError, match="NAME=PREFIX"):
        cli.parse_source("nonsense")
    ns = _parser().parse_args(["prepare", "blend", "--source", "a=/x:weight=0.3", "--train-samples", "5"])
    cfg = cli.load_config(BlendConfig, ns, "blend")
    assert cfg.sources[0].weight == 0.3 and cfg.train_samples == 5


def test_example_recipe_sections_load_into_the_dataclasses():
    from pathlib import Path

    from clinmega.data.config import DecontamConfig, PretrainPrepConfig, SFTPrepConfig

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "data-tiny.yaml"
    for verb, cls in (("pretrain", PretrainPrepConfig), ("blend", BlendConfig), ("sft", SFTPrepConfig),
                      ("decontaminate", DecontamConfig)):
        argv = ["prepare", verb] if verb != "decontaminate" else [verb]
        cfg = cli.load_config(cls, _parser().parse_args([*argv, "--config", str(recipe)]), verb)
        assert isinstance(cfg, cls)
    assert cfg.text_field == "messages"
