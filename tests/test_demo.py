"""`clinmega demo` end to end (short settings): every stage runs, leaves its outputs, and reads like a
tutorial (the real command, a one-line result) with no third-party warning line on stderr."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from clinmega.cli import parse_args
from clinmega.utils.quiet import CPP_LOG_LINE

ROOT = Path(__file__).resolve().parents[1]
# A line a third-party warning leaves on stderr: Python's warning format (its source line names the
# library's file or, through cpu_compat's TorchFunctionMode, ours), a library logger's message
# (megatron-core's GPTModel deprecation, TE/apex fallbacks, DDP's layout notice), or a C++ log line.
LIBRARY_LINE = re.compile(r"site-packages|Warning:|warnings\.warn|return func\(|DEPRECATED|deprecated|Apex|"
                          r"Transformer Engine|ProcessGroupGloo|DistributedDataParallel|BlendedDataset|"
                          r"Loading weights")
OURS = re.compile(r"^WARNING clinmega\.")  # clinmega's own warnings (here: the planted corrupt lines)
TRAIN_START = re.compile(r"^training \S+ \((cpt|sft)\) from step 0 to 4; checkpoints in ")  # train's own line


def test_demo_runs_every_stage_as_a_tutorial(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "clinmega.cli", "demo", "--out", str(out),
                             "--cpt-steps", "4", "--sft-steps", "4", "demo.eval_limit=2"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "not a clinical result" in result.stdout
    for path in ("hf-base/config.json", "megatron-base", "data/clinical.bin", "data/general.idx",
                 "data/sft", "cpt/curves.png", "sft/curves.png", "hf-sft/config.json",
                 "hf-sft/model.safetensors", "eval-sft/accuracy.png", "summary.md",
                 "commands.sh", "logs/07-train.log"):
        assert (out / path).exists(), path
    manifest = json.loads((out / "data" / "general.manifest.json").read_text())
    assert manifest["totals"]["documents_skipped"] >= 1  # the planted corrupt line is counted
    report = json.loads((out / "eval-sft" / "results.json").read_text())
    strategies = {row["strategy"] for row in report["summary"]}
    assert strategies == {"zero_shot", "cot", "self_consistency", "choice_shuffle"}
    losses = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in rec for rec in losses)

    # a tutorial: each stage's header, the command as typed, and a one-line result
    lines = result.stdout.splitlines()
    headers = [n for n, line in enumerate(lines) if re.match(r"^\[\d+/13\] ", line)]
    assert len(headers) == 13, result.stdout
    commands = [line[2:] for line in lines if line.startswith("$ clinmega ")]
    assert len(commands) == 12 and commands == (out / "commands.sh").read_text().splitlines()[3:]
    results = [line for line in lines if line.startswith("  -> ")]
    assert len(results) == 13, result.stdout
    cpt = next(line for line in results if "steps, loss" in line)
    assert re.search(r"4 steps, loss \d+\.\d\d -> \d+\.\d\d; checkpoint .*iter_0000004", cpt), cpt
    assert any("documents, " in line and "tokens" in line and "malformed_json: 1" in line for line in results)
    assert any(line.startswith("  -> mean accuracy zero_shot ") for line in results)
    # the printed commands are real: each parses as typed, and one of them runs
    for command in commands:
        args = parse_args(shlex.split(command)[1:])
        assert callable(args.func), command
    plot = next(c for c in commands if c.startswith("clinmega plot "))
    rerun = subprocess.run([sys.executable, "-m", "clinmega.cli", *shlex.split(plot)[1:]],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and rerun.stdout.strip().endswith("curves.png"), rerun.stderr

    # quiet: no third-party warning line on stderr, one count at the end; our own warnings stay
    err = result.stderr.splitlines()
    assert [line for line in err if LIBRARY_LINE.search(line) or CPP_LOG_LINE.match(line)] == [], err
    assert sum(bool(OURS.match(line)) for line in err) == 3, err  # 2 + 1 planted corrupt lines
    assert re.fullmatch(r"\d+ library warnings; --verbose to show", err[-1]), err
    assert sum(bool(TRAIN_START.match(line)) for line in err) == 2, err
    assert len(err) == 3 + 2 + 1, err  # nothing else: no library line, no blank line, no library bar
