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
