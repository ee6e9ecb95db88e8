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
    for verb in ("models", "info", "plan", "prepare", "decontaminate", "eval"):
        assert verb in text


def test_console_script_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "clinmega.cli", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.startswith("clinmega ")
