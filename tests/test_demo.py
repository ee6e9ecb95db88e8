"""`clinmega demo` end to end (short settings): every stage runs and leaves its outputs."""

import json
import subprocess
import sys


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "clinmega.cli", "demo", "--out", str(out),
                             "--cpt-steps", "4", "--sft-steps", "4", "--eval-limit", "2"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "not a clinical result" in result.stdout
    for path in ("hf-base/config.json", "megatron-base", "data/clinical.bin", "data/general.idx",
                 "data/sft", "cpt/curves.png", "sft/curves.png", "hf-sft/config.json",
                 "hf-sft/model.safetensors", "eval-sft/accuracy.png", "summary.md",
                 "commands.sh"):
        assert (out / path).exists(), path
    manifest = json.loads((out / "data" / "general.manifest.json").read_text())
    assert manifest["totals"]["documents_skipped"] >= 1  # the planted corrupt line is counted
    report = json.loads((out / "eval-sft" / "results.json").read_text())
    strategies = {row["strategy"] for row in report["summary"]}
    assert strategies == {"zero_shot", "cot", "self_consistency", "choice_shuffle"}
    losses = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in rec for rec in losses)
