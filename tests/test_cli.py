"""The console script's foundation verbs."""

import subprocess
import sys

from clinmega.cli import build_parser, main
from clinmega.models import PUBLISHED_PARAMS


def test_models_lists_presets_with_published_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, count in PUBLISHED_PARAMS.items():
        assert name in out and f"{count:,}" in out


def test_info_reports_cpu_runtime(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "megatron-core" in out
    assert "rng_tracker" in out or "CUDA available: True" in out


def test_help_lists_every_verb():
    text = build_parser().format_help()
    for verb in ("demo", "import-hf", "export-hf", "prepare", "decontaminate", "train", "plot",
                 "eval", "plan", "models", "info"):
        assert verb in text


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "clinmega.cli", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.startswith("clinmega ")


def test_eval_recipe_args_file_parses_into_known_strategies(tmp_path):
    from pathlib import Path

    from clinmega.evaluation.benchmarks import expand_benchmark_names
    from clinmega.evaluation.strategies import parse_strategy

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "eval_prompt_strategies.args"
    args = build_parser().parse_args(["eval", "model-dir", f"@{recipe}", "--out", str(tmp_path),
                                      "--seed", "7"])
    assert args.command == "eval" and args.seed == 7  # later arguments override the file
    assert [parse_strategy(s).name for s in args.strategies.split(",")][-1] == "medprompt"
    assert "pubmedqa" in expand_benchmark_names(args.benchmarks.split(","))


def test_one_convention_keys_aliases_and_one_error_handler(tmp_path, capsys):
    import pytest

    from clinmega.cli import parse_args
    from clinmega.config.keys import config_from_args

    # --tp is only an alias of parallel.tensor_parallel; key=value words win over aliases and --config
    (tmp_path / "layout.yaml").write_text("parallel: {tensor_parallel: 4, pipeline_parallel: 2}\n")
    args = parse_args(["import-hf", "hf", "out", "--config", str(tmp_path / "layout.yaml"), "--tp", "2",
                       "parallel.expert_parallel=2"])
    keys = config_from_args(args)
    assert (keys.parallel.tensor_parallel, keys.parallel.pipeline_parallel, keys.parallel.expert_parallel) == (2, 2, 2)
    help_text = build_parser()._subparsers._group_actions[0].choices["import-hf"].format_help()
    assert "parallel.tensor_parallel = 1   (alias --tp)" in help_text
    # an unknown key: one line naming the nearest valid key, exit 2
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    argv = ["prepare", "pretrain", "--inputs", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "p"),
            "pretrain.worker=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pretrain.worker" in err[0] and "'workers'" in err[0], err
    assert main(["import-hf", "hf", "out", "parallel.tensor_paralel=2"]) == 2
    assert "Did you mean one of: 'tensor_parallel'" in capsys.readouterr().err
    # a verb without keys refuses key=value words; --debug shows the traceback instead of one line
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path), "parallel.tensor_parallel=2"])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        main(["plot", str(tmp_path), "--debug"])
    # one spelling per dtype: eval takes precision.dtype's names, old spellings map to them
    assert parse_args(["eval", "m", "--out", "o", "--dtype", "bfloat16"]).dtype == "bf16"
